"""Inverse Cloze Task batches (Lee et al. 2019, ORQA §5): a block's sentence is the query, the
rest of the block is its one relevant block.

ICT is the retriever's warm start: without it REALM's retriever fetches unrelated blocks, the
encoder learns to ignore them and the retriever gets no useful gradient (the cold start).
Per example, from one block of the corpus:
  * its body is split into sentences (`blocks.split_sentences`, the splitter the corpus was
    packed with) and one is drawn uniformly as the query;
  * with probability `mask_rate` (ORQA: 0.9) that sentence is removed from the body, else the
    body keeps it — so the retriever learns more than word overlap, yet still learns that
    overlap is evidence;
  * query `[CLS] sentence [SEP]`, block `[CLS] title [SEP] body [SEP]` (the block's layout
    everywhere else). A block of one sentence whose sentence is removed keeps its title alone.
Blocks with an empty body are never drawn (`nonempty_blocks`).

The randomness of row i of a global batch comes from (the batch's seed, i), as in
`pipeline.PretrainBatcher`: the same global batches for any number of hosts, and the iterator's
state (`{"next_index": t}`) in the checkpoint resumes them exactly.

ICT batch (B = per-host batch, Lq = query_len, Lb = block_len):
  query_ids, query_mask, query_types  [B, Lq] int32   `[CLS] sentence [SEP]`
  block_ids, block_mask, block_types  [B, Lb] int32   `[CLS] title [SEP] body [SEP]`
  block_index   [B] int32   the corpus index of the block (duplicates are not negatives)
  removed       [B] bool    the query sentence was removed from the block
  index [B] int64, truncated [B] bool (the query was cut to Lq) — host-side bookkeeping.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from grain.sharding import ShardOptions

from realm_jax.data.blocks import split_sentences
from realm_jax.data.joins import TokenizedBlocks
from realm_jax.data.pipeline import _get_many, _host_slice, _per_host, _read_options, _seed, _shard
from realm_jax.data.tokenizer import WordPiece

DEFAULT_MASK_RATE = 0.9  # ORQA's ICT: the query sentence is removed from 90% of the blocks


@dataclasses.dataclass(frozen=True)
class IctExample:
    """One ICT pair in text form.

    Attributes:
      query: the sentence drawn from the body.
      body: the body the block tower reads (without `query` when `removed`).
      sentence: the index of `query` among the body's sentences.
      removed: whether the sentence was taken out of `body`.
    """

    query: str
    body: str
    sentence: int
    removed: bool


def ict_example(body: str, rng: np.random.Generator, mask_rate: float = DEFAULT_MASK_RATE
                ) -> IctExample:
    """Draw a query sentence from `body` and remove it with probability `mask_rate`.

    Pure: the result depends on `body`, the generator's state and `mask_rate` only. Exactly two
    draws are taken from `rng` whatever the rate, so rates 0 and 1 are exact (never / always
    removed) and change nothing else.

    Raises:
      ValueError: the body has no sentence (empty or whitespace).
    """
    spans = split_sentences(body)
    if not spans:
        raise ValueError(f"ICT needs a block with a non-empty body, got {body!r}")
    s = int(rng.integers(len(spans)))
    removed = bool(rng.random() < mask_rate)
    a, b = spans[s]
    rest = " ".join(p for p in (body[:a].strip(), body[b:].strip()) if p) if removed else body
    return IctExample(body[a:b], rest, s, removed)


def nonempty_blocks(blocks: TokenizedBlocks) -> np.ndarray:
    """[n] int64 corpus indices of the blocks with at least one body wordpiece: the blocks ICT
    may draw (one without a body has no sentence to ask about)."""
    return np.flatnonzero(blocks.bodies.lengths > 0).astype(np.int64)


@dataclasses.dataclass
class IctBatcher:
    """Positions [B] into `block_index` + rng → an ICT batch (module docstring). Thread-safe."""

    corpus: Any  # random access: corpus[i] -> {"title", "text", ...} (a BlockCorpus)
    tokenizer: WordPiece
    block_index: np.ndarray  # [n] the corpus indices that may be drawn (nonempty_blocks)
    query_len: int = 64
    block_len: int = 288
    mask_rate: float = DEFAULT_MASK_RATE
    # Global position of this host's first row in every batch (see PretrainBatcher).
    first_row: int = 0

    def __post_init__(self):
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"ict.mask_rate={self.mask_rate} must be in [0, 1]")
        if self.query_len < 3:
            raise ValueError("query_len must leave room for [CLS], a wordpiece and [SEP]")

    def __call__(self, positions: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        block = self.block_index[np.asarray(positions, np.int64)]
        records = _get_many(self.corpus, block)
        batch_seed = int(rng.integers(2**63))  # the same on every host for this batch
        examples = [ict_example(r["text"], np.random.default_rng((batch_seed, self.first_row + i)),
                                self.mask_rate) for i, r in enumerate(records)]
        q = self.tokenizer.encode_queries([e.query for e in examples], self.query_len)
        z = self.tokenizer.encode_blocks([r["title"] for r in records],
                                         [e.body for e in examples], self.block_len)
        return {
            "query_ids": q.input_ids, "query_mask": q.attention_mask,
            "query_types": q.token_type_ids,
            "block_ids": z.input_ids, "block_mask": z.attention_mask,
            "block_types": z.token_type_ids,
            "block_index": block.astype(np.int32),
            "removed": np.array([e.removed for e in examples], bool),
            "index": np.asarray(positions, np.int64),
            "truncated": np.asarray(q.truncated, bool),
        }


def ict_dataset(
    corpus: Any,
    tokenizer: WordPiece,
    block_index: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    query_len: int = 64,
    block_len: int = 288,
    mask_rate: float = DEFAULT_MASK_RATE,
    shard: ShardOptions | None = None,
    num_epochs: int | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Shuffled ICT batches over the blocks `block_index`: this host's rows of each global
    batch (`batch_size` is global), resumable like `pipeline.pretrain_dataset`.

    Each epoch visits every block once, in a new order; `num_epochs=None` repeats forever.
    """
    shard = _shard(shard)
    per_host = _per_host(batch_size, shard)
    n = len(block_index)
    if n < batch_size:
        raise ValueError(f"{n} blocks with a body, fewer than one ICT batch of {batch_size}")
    batcher = IctBatcher(corpus, tokenizer, np.asarray(block_index, np.int64), query_len,
                         block_len, mask_rate, first_row=shard.shard_index * per_host)
    ds = (grain.MapDataset.range(n).shuffle(seed=_seed(seed)).repeat(num_epochs)
          .batch(batch_size, drop_remainder=True))
    ds = _host_slice(ds, shard, per_host).random_map(batcher, seed=_seed(seed + 1))
    return ds.to_iter_dataset(_read_options(num_threads, prefetch))
