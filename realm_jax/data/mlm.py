"""Plain masked-LM examples (task=mlm): `[CLS] text [SEP]` or a block, masked, no retrieval.

The knowledge-augmented encoder starts from a BERT with an MLM head; MiniLM ships none, so
`task=mlm` trains the encoder tower on masked text alone first (its warm start, and the
paper's "baseline encoder"). Its examples come from one of two sources (`mlm.source`):

  "corpus"     the retrieval corpus' blocks, laid out as the retriever reads them
               (`[CLS] title [SEP] body [SEP]`, `TokenizedBlocks.encode`); only the body is
               masked, the title stays as context — the encoder later reads bodies after a
               query, and a block's body is the text REALM retrieves;
  "sentences"  the pre-training sentences (`loaders.load_pretrain_sentences`) as
               `[CLS] sentence [SEP]`, masked by `pipeline.PretrainBatcher` (the REALM query
               layout without retrieval);
  "reading"    a sentence of a corpus block, masked, joined with that block's body as REALM
               joins a query with a candidate (`ReadingMlmBatcher`): the encoder learns to fill
               the span from the block it reads;
  "facts"      a pre-training sentence whose fact's block is known (`gold_block`: the
               generated KB knows it), masked as REALM masks its queries, joined with that
               block: reading a *restatement* of the fact, not a copy of the sentence — the
               supervised reading warm start a from-scratch encoder needs (see
               `ReadingMlmBatcher`).

Masking (`mlm.masking`) is `data/masking.py`'s: "random_token" (BERT: 15 %, 80/10/10),
"random_span" or "salient" (a sentence's own spans; a block's from the regex tagger), with
the same random-span fallback as REALM's queries when no salient span fits. A block's body is
masked as if it were a query row whose `[CLS]` is the title's `[SEP]`: the masking functions
only ever touch positions 1 … length−2 of the row they get, so they never hit a special token.

Batch (B = host batch, L = max_len, M = max_masks):
  input_ids, input_mask, input_types  [B, L] int32
  mlm_positions [B, M] int32, mlm_labels [B, M] int32 (original ids), mlm_weights [B, M] f32
  index [B] int64, truncated [B] bool, fallback [B] bool — host-side bookkeeping.

As in `pipeline.pretrain_dataset`, global batch t is a pure function of (seed, t), each row
masks with a generator keyed by (the batch's seed, its global row), and the iterator state is
`{"next_index": t}`, so runs resume exactly and any number of hosts sees the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from grain.sharding import ShardOptions

from realm_jax.data import masking as masking_lib
from realm_jax.data import pipeline
from realm_jax.data.joins import TokenizedBlocks, join_mlm
from realm_jax.data.tokenizer import WordPiece

SOURCES = ("corpus", "sentences", "reading", "facts")
DEVICE_KEYS = ("input_ids", "input_mask", "input_types", "mlm_positions", "mlm_labels",
               "mlm_weights")


@dataclasses.dataclass
class BlockMlmBatcher:
    """Block indices [B] + rng → an MLM batch of `[CLS] title [SEP] masked body [SEP]`."""

    corpus: Any  # random access: corpus[i] → {"title", "text"} (read for salient masking only)
    blocks: TokenizedBlocks  # the same corpus, tokenised (row i = block i)
    tokenizer: WordPiece
    max_len: int = 288
    max_masks: int = 10
    masking: str = "random_token"
    tagger: masking_lib.Tagger | None = None  # salient spans of a body; default RegexTagger
    first_row: int = 0  # global row of this host's first row (see PretrainBatcher)

    def __post_init__(self):
        if self.masking not in pipeline.MASKINGS:
            raise ValueError(f"masking={self.masking!r}; accepted: {pipeline.MASKINGS}")
        if self.max_len < 5:
            raise ValueError(f"max_len={self.max_len} leaves no room for a body")
        self.tagger = self.tagger or masking_lib.RegexTagger()
        self._continuation = np.array(
            [t.startswith("##") for t in self.tokenizer._inverse], bool)

    def __call__(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        tok, m = self.tokenizer, self.max_masks
        indices = np.asarray(indices, np.int64)
        enc = self.blocks.encode(indices, self.max_len)
        b = len(indices)
        batch_seed = int(rng.integers(2**63))  # the same on every host for this batch
        offsets: list[Any] = [None] * b
        bodies: list[str] = [""] * b
        if self.masking == "salient":
            bodies = [r["text"] for r in pipeline._get_many(self.corpus, indices)]
            offsets = [o for _, o in tok.tokenize_with_offsets(bodies)]
        out = {
            "input_ids": enc.input_ids.copy(), "input_mask": enc.attention_mask,
            "input_types": enc.token_type_ids,
            "mlm_positions": np.zeros((b, m), np.int32),
            "mlm_labels": np.zeros((b, m), np.int32),
            "mlm_weights": np.zeros((b, m), np.float32),
            "index": indices, "truncated": enc.truncated, "fallback": np.zeros(b, bool),
        }
        lengths = enc.lengths
        for i in range(b):
            row, n = out["input_ids"][i], int(lengths[i])
            sep = int(np.flatnonzero(row == tok.sep_id)[0])  # the title's [SEP]
            view = row[sep:]  # `[SEP] body [SEP] [PAD]…`: a query row to the masking functions
            rng_i = np.random.default_rng((batch_seed, self.first_row + i))
            masked = self._mask(view, n - sep, bodies[i], offsets[i], rng_i)
            if masked is None:
                out["fallback"][i] = True
                masked = masking_lib.random_span_mask(view, n - sep, self._continuation,
                                                      tok.mask_id, rng_i, m)
            row[sep:] = masked.input_ids
            out["mlm_positions"][i] = np.where(masked.weights > 0, masked.positions + sep, 0)
            out["mlm_labels"][i] = masked.labels
            out["mlm_weights"][i] = masked.weights
        return out

    def _mask(self, view, n, body, offsets, rng) -> masking_lib.Masked | None:
        tok = self.tokenizer
        if self.masking == "random_token":
            return masking_lib.random_token_mask(view, n, tok.mask_id, tok.vocab_size,
                                                 tok.special_ids, rng, self.max_masks)
        if self.masking == "random_span":
            return masking_lib.random_span_mask(view, n, self._continuation, tok.mask_id, rng,
                                                self.max_masks)
        return masking_lib.salient_span_mask(view, n, offsets, self.tagger(body), tok.mask_id,
                                             rng, self.max_masks)


@dataclasses.dataclass
class SentenceMlmBatcher:
    """Sentence indices [B] + rng → an MLM batch of `[CLS] masked sentence [SEP]`: REALM's
    query (`pipeline.PretrainBatcher`, the same masking) under the MLM batch's names."""

    source: Any  # random access: source[i] → {"text", "spans", …}
    tokenizer: WordPiece
    max_len: int = 288
    max_masks: int = 10
    masking: str = "random_token"
    tagger: masking_lib.Tagger | None = None
    first_row: int = 0

    def __post_init__(self):
        self._query = pipeline.PretrainBatcher(self.source, self.tokenizer, self.max_len,
                                               self.max_masks, self.masking, self.tagger,
                                               first_row=self.first_row)

    def __call__(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        q = self._query(indices, rng)
        return {"input_ids": q["query_ids"], "input_mask": q["query_mask"],
                "input_types": q["query_types"], "mlm_positions": q["mlm_positions"],
                "mlm_labels": q["mlm_labels"], "mlm_weights": q["mlm_weights"],
                "index": q["index"], "truncated": q["truncated"], "fallback": q["fallback"]}


@dataclasses.dataclass
class ReadingMlmBatcher:
    """Sentence indices [B] + rng → `[CLS] masked sentence [SEP] its block's body [SEP]`.

    Why: REALM's encoder must learn to *read* — to fill a masked span from the block joined
    after the query — before its per-block likelihood can teach the retriever anything. Plain
    MLM from MiniLM teaches the head but not that. Here the masked span is in the context
    (the sentence's own block, unlike REALM, which prohibits this trivial retrieval), so the
    only way to the answer is to find it there: the encoder learns the copy REALM's joins
    then ask for, from the corpus alone (no questions, no gold blocks). The layout is
    REALM's join (`joins.join_mlm`: no title, segment 1 on the body).

    With `block_key="gold_blocks"` (source "facts") the block is the one holding the fact a
    pre-training sentence restates. A sentence's own block teaches the copy of a verbatim
    context; measured on the from-scratch 2-layer start, that did not transfer to
    restatements (held-out gold gain −0.21 nats/token at REALM's start, ~0 after 400 more
    REALM steps), so REALM's teacher was noise. A BERT pre-trained on a web-sized corpus
    brings the reading of restatements with it; a 2-layer model trained on 1,500 blocks can
    only learn it from pairs like these (gold blocks of the train people only: the held-out
    people's sentences and questions stay unseen).
    """

    source: Any  # corpus sentences: source[i] → {"text", "spans", "block"} (examples.py)
    blocks: TokenizedBlocks
    tokenizer: WordPiece
    query_len: int = 96
    max_len: int = 384  # the join: query_len + the body
    max_masks: int = 10
    masking: str = "salient"
    tagger: masking_lib.Tagger | None = None
    first_row: int = 0
    # "random_token" masking of the sentence: every masked wordpiece is in the body, so a
    # high rate gives more to read per example (BERT's 0.15 leaves ~2 per sentence).
    mask_rate: float = 0.15
    block_key: str = "source_block"  # the block joined: the sentence's own, or "gold_blocks"

    def __post_init__(self):
        if self.max_len < self.query_len + 2:
            raise ValueError(f"mlm.max_len={self.max_len} leaves no room for a body after a "
                             f"{self.query_len}-wordpiece query")
        self._query = pipeline.PretrainBatcher(self.source, self.tokenizer, self.query_len,
                                               self.max_masks, self.masking, self.tagger,
                                               first_row=self.first_row,
                                               mask_rate=self.mask_rate)

    def __call__(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        q = self._query(indices, rng)
        block = q[self.block_key]
        if np.any(block < 0):
            raise ValueError(f"mlm: {int(np.sum(block < 0))} sentences of the batch have no "
                             f"{self.block_key} to read (-1)")
        join = join_mlm(q["query_ids"], q["query_len"], self.blocks, block[:, None],
                        self.max_len)
        return {"input_ids": join.input_ids[:, 0], "input_mask": join.attention_mask[:, 0],
                "input_types": join.token_type_ids[:, 0], "mlm_positions": q["mlm_positions"],
                "mlm_labels": q["mlm_labels"], "mlm_weights": q["mlm_weights"],
                "index": q["index"], "truncated": q["truncated"] | join.truncated[:, 0],
                "fallback": q["fallback"]}


def make_batcher(
    source: str, examples: Any, tokenizer: WordPiece, *, blocks: TokenizedBlocks | None = None,
    max_len: int = 288, max_masks: int = 10, masking: str = "random_token",
    tagger: masking_lib.Tagger | None = None, first_row: int = 0, query_len: int = 96,
    mask_rate: float = 0.15,
) -> BlockMlmBatcher | SentenceMlmBatcher | ReadingMlmBatcher:
    """The batcher of `source` ("corpus": `examples` is the BlockCorpus and `blocks` its
    tokenisation; "sentences": `examples` are pre-training sentences; "reading": `examples`
    are the corpus' sentences (`examples.corpus_sentences`), `blocks` the corpus tokenised,
    and `query_len` the length of the masked sentence inside the `max_len` join; "facts": as
    "reading" with pre-training sentences that know their gold block)."""
    if source in ("reading", "facts"):
        if blocks is None:
            raise ValueError(f"mlm source {source!r} needs the corpus' TokenizedBlocks")
        return ReadingMlmBatcher(examples, blocks, tokenizer, query_len, max_len, max_masks,
                                 masking, tagger, first_row, mask_rate,
                                 "source_block" if source == "reading" else "gold_blocks")
    if source == "corpus":
        if blocks is None:
            raise ValueError("mlm source 'corpus' needs the corpus' TokenizedBlocks")
        return BlockMlmBatcher(examples, blocks, tokenizer, max_len, max_masks, masking, tagger,
                               first_row)
    if source == "sentences":
        return SentenceMlmBatcher(examples, tokenizer, max_len, max_masks, masking, tagger,
                                  first_row)
    raise ValueError(f"mlm.source={source!r}; accepted: {SOURCES}")


def mlm_dataset(
    source: str,
    examples: Any,
    tokenizer: WordPiece,
    *,
    batch_size: int,
    seed: int,
    blocks: TokenizedBlocks | None = None,
    num_examples: int | None = None,
    max_len: int = 288,
    max_masks: int = 10,
    masking: str = "random_token",
    tagger: masking_lib.Tagger | None = None,
    query_len: int = 96,
    mask_rate: float = 0.15,
    shard: ShardOptions | None = None,
    num_epochs: int | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Shuffled MLM batches: this host's rows of each global batch (`batch_size` is global).

    `num_examples`: train on examples [0, num_examples) only (the rest held out for
    evaluation); default all. Iterate and checkpoint as `pipeline.pretrain_dataset`.
    """
    shard = pipeline._shard(shard)
    per_host = pipeline._per_host(batch_size, shard)
    n = len(examples) if num_examples is None else int(num_examples)
    if n < batch_size:
        raise ValueError(f"{n} MLM examples, fewer than one batch of {batch_size}")
    batcher = make_batcher(source, examples, tokenizer, blocks=blocks, max_len=max_len,
                           max_masks=max_masks, masking=masking, tagger=tagger,
                           first_row=shard.shard_index * per_host, query_len=query_len,
                           mask_rate=mask_rate)
    seed = pipeline._seed(seed)
    ds = (grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
          .batch(batch_size, drop_remainder=True))
    ds = pipeline._host_slice(ds, shard, per_host).random_map(
        batcher, seed=pipeline._seed(seed + 1))
    return ds.to_iter_dataset(pipeline._read_options(num_threads, prefetch))


def fixed_batch(batcher: BlockMlmBatcher | SentenceMlmBatcher, indices: np.ndarray, seed: int
                ) -> dict[str, Any]:
    """One batch of `indices` masked with a generator seeded by `seed`: held-out examples
    that are the same at every evaluation (and on every host, with first_row 0)."""
    return batcher(np.asarray(indices, np.int64), np.random.default_rng(seed))
