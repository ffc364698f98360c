"""grain loaders for pre-training and QA batches, sharded per host, resumable from a checkpoint.

The pipeline shuffles *indices*, not records: `MapDataset.range(N)` → global shuffle
(re-seeded every epoch) → global batches of indices → this host's slice of each batch → one
vectorised function that reads, tokenises and masks the host's rows. That keeps the state of an
iterator a small dict (`{"next_index": t}`), JSON-serialisable for the orbax checkpoint, and
makes global batch t a pure function of (seed, t): the same seed gives the same batches, and a
restored iterator continues exactly where the saved one stopped.

Multi-host: slicing *after* the global shuffle (rather than giving each host a strided shard to
shuffle on its own) makes the global batch independent of the number of hosts, and masking
draws each row's randomness from the batch's seed and the row's global position. So 2 hosts × 4
devices train on exactly the batches of 1 host × 8 devices, and a checkpoint written by one
topology resumes on another with the same data order. Each host still reads and tokenises only
its own `batch / hosts` rows, every host yields the same number of batches (remainders are
dropped in training and padded with weight-0 rows in evaluation), so no host waits in a
collective for another. Which slice is a host's comes from the mesh (`mesh_shard`: where
`jax.make_array_from_process_local_data` puts its rows), or `jax.process_index()` of
`jax.process_count()` by default. `to_global` turns the per-host numpy batch into global jax
Arrays.

Pre-training batch (B = per-host batch, Lq = query_len, M = max_masks):
  query_ids, query_mask, query_types  [B, Lq] int32   `[CLS] masked q [SEP]`
  query_len       [B] int32     tokens of [CLS] q [SEP] (the prefix of every MLM join)
  mlm_positions   [B, M] int32  positions of the masked wordpieces in the query (0-padded)
  mlm_labels      [B, M] int32  their original ids (0-padded)
  mlm_weights     [B, M] float32  1 for a real mask, 0 for padding
  source_block    [B] int32     corpus index of the sentence's own block (−1: none); its uid is
                                `corpus.uids[source_block]`, the trivial retrieval to refuse
  gold_blocks     [B] int32     block holding the masked fact (−1: unknown)
  index [B] int64, truncated [B] bool, fallback [B] bool (no salient span fitted: a random
  span was masked instead) — host-side bookkeeping.
QA batch:
  question_ids, question_mask, question_types [B, Lq] int32; question_len [B] int32;
  gold_blocks [B] int32; weights [B] float32 (0 = padding row); index [B] int64;
  truncated [B] bool; is_regex [B] bool (the row's answers are regular expressions:
  CuratedTrec); answers list[list[str]] and questions list[str] (host only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from grain.sharding import ShardByJaxProcess, ShardOptions

from realm_jax import multihost
from realm_jax import sharding as sharding_lib
from realm_jax.data import masking as masking_lib
from realm_jax.data.tokenizer import WordPiece

MASKINGS = ("salient", "random_token", "random_span")
HOST_KEYS = frozenset({"index", "truncated", "fallback", "answers", "is_regex", "questions"})


# --------------------------------------------------------------------------- batch makers


@dataclasses.dataclass
class PretrainBatcher:
    """Indices [B] + rng → a pre-training batch (module docstring). Thread-safe."""

    source: Any  # random access: source[i] -> {"text", "spans", "block", "gold_block"}
    tokenizer: WordPiece
    query_len: int = 96
    max_masks: int = 10
    masking: str = "salient"
    tagger: masking_lib.Tagger | None = None  # for examples stored without spans
    # Global position of this host's first row in every batch: row i masks with a generator
    # keyed by (batch seed, first_row + i), so masks do not depend on the split over hosts.
    first_row: int = 0
    mask_rate: float = 0.15  # "random_token": the share of the query's wordpieces masked

    def __post_init__(self):
        if self.masking not in MASKINGS:
            raise ValueError(f"masking={self.masking!r}; accepted: {MASKINGS}")
        if self.query_len < 3:
            raise ValueError("query_len must leave room for [CLS], a wordpiece and [SEP]")
        self._continuation = np.array(
            [t.startswith("##") for t in self.tokenizer._inverse], bool)

    def __call__(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        tok, lq, m = self.tokenizer, self.query_len, self.max_masks
        records = _get_many(self.source, indices)
        encoded = tok.tokenize_with_offsets([r["text"] for r in records])
        b = len(records)
        batch_seed = int(rng.integers(2**63))  # the same on every host for this batch
        out = {
            "query_ids": np.full((b, lq), tok.pad_id, np.int32),
            "query_mask": np.zeros((b, lq), np.int32),
            "query_types": np.zeros((b, lq), np.int32),
            "query_len": np.zeros(b, np.int32),
            "mlm_positions": np.zeros((b, m), np.int32),
            "mlm_labels": np.zeros((b, m), np.int32),
            "mlm_weights": np.zeros((b, m), np.float32),
            "source_block": np.array([r.get("block", -1) for r in records], np.int32),
            "gold_blocks": np.array([r.get("gold_block", -1) for r in records], np.int32),
            "index": np.asarray(indices, np.int64),
            "truncated": np.zeros(b, bool),
            "fallback": np.zeros(b, bool),
        }
        for i, (rec, (ids, offsets)) in enumerate(zip(records, encoded, strict=True)):
            q = ids[: lq - 2]
            out["truncated"][i] = len(q) < len(ids)
            n = len(q) + 2
            row = np.full(lq, tok.pad_id, np.int32)
            row[0], row[1: n - 1], row[n - 1] = tok.cls_id, q, tok.sep_id
            rng = np.random.default_rng((batch_seed, self.first_row + i))
            masked = self._mask(row, n, rec, offsets, rng)
            if masked is None:
                out["fallback"][i] = True
                masked = masking_lib.random_span_mask(row, n, self._continuation, tok.mask_id,
                                                      rng, m)
            out["query_ids"][i] = masked.input_ids
            out["query_mask"][i, :n] = 1
            out["query_len"][i] = n
            out["mlm_positions"][i] = masked.positions
            out["mlm_labels"][i] = masked.labels
            out["mlm_weights"][i] = masked.weights
        return out

    def _mask(self, row, n, rec, offsets, rng) -> masking_lib.Masked | None:
        tok = self.tokenizer
        if self.masking == "random_token":
            return masking_lib.random_token_mask(row, n, tok.mask_id, tok.vocab_size,
                                                 tok.special_ids, rng, self.max_masks,
                                                 rate=self.mask_rate)
        if self.masking == "random_span":
            return masking_lib.random_span_mask(row, n, self._continuation, tok.mask_id, rng,
                                                self.max_masks)
        spans = np.asarray(rec.get("spans", ()), np.int64).reshape(-1, 2)
        if not len(spans) and self.tagger is not None:
            spans = np.asarray(self.tagger(rec["text"]), np.int64).reshape(-1, 2)
        return masking_lib.salient_span_mask(row, n, offsets, [tuple(s) for s in spans],
                                             tok.mask_id, rng, self.max_masks)


@dataclasses.dataclass
class QaBatcher:
    """Indices [B] (−1 = padding row) → a QA batch (module docstring)."""

    source: Any  # random access: source[i] -> {"question", "answers", "gold_block"}
    tokenizer: WordPiece
    question_len: int = 64

    def __call__(self, indices: np.ndarray) -> dict[str, Any]:
        indices = np.asarray(indices, np.int64)
        real = indices >= 0
        records = _get_many(self.source, indices[real])
        rows: list[dict[str, Any]] = []
        it = iter(records)
        for r in real:
            rows.append(next(it) if r else {"question": "", "answers": [], "gold_block": -1})
        enc = self.tokenizer.encode_queries([r["question"] for r in rows], self.question_len)
        return {
            "question_ids": enc.input_ids, "question_mask": enc.attention_mask,
            "question_types": enc.token_type_ids, "question_len": enc.lengths,
            "gold_blocks": np.array([r["gold_block"] for r in rows], np.int32),
            "weights": real.astype(np.float32), "index": indices,
            "truncated": enc.truncated & real,
            "answers": [list(r["answers"]) for r in rows],
            "is_regex": np.full(len(rows), bool(getattr(self.source, "is_regex", False))),
            "questions": [r["question"] for r in rows],
        }


def _get_many(source: Any, indices: np.ndarray) -> list[Mapping[str, Any]]:
    idx = [int(i) for i in indices]
    if hasattr(source, "get_many"):
        return source.get_many(idx)
    return [source[i] for i in idx]


# --------------------------------------------------------------------------- datasets


def _shard(shard: ShardOptions | None) -> ShardOptions:
    return shard if shard is not None else ShardByJaxProcess(drop_remainder=True)


def _per_host(batch_size: int, shard: ShardOptions) -> int:
    if batch_size % shard.shard_count:
        raise ValueError(f"global batch {batch_size} is not divisible by "
                         f"{shard.shard_count} hosts")
    return batch_size // shard.shard_count


def _host_slice(global_batches: grain.MapDataset, shard: ShardOptions, per_host: int
                ) -> grain.MapDataset:
    """Global batches of indices → this host's rows of each (see module docstring)."""
    lo = shard.shard_index * per_host
    return global_batches.map(lambda idx: idx[lo: lo + per_host])


def mesh_shard(mesh: jax.sharding.Mesh,
               rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES) -> ShardOptions:
    """This host's slice of a global batch laid out on `mesh`, as grain ShardOptions.

    It is where `jax.make_array_from_process_local_data` puts the host's rows, so the rows a
    host reads are the rows its devices hold. On one host: (0, 1). If the batch axes do not
    span hosts (e.g. `model` across hosts), every host reads the whole batch (0, 1).
    """
    shards = sharding_lib.mesh_batch_size(mesh, rules)
    rows = multihost.process_rows(sharding_lib.batch_sharding(mesh, 1, rules), (shards,))
    per = rows.stop - rows.start
    return ShardOptions(shard_index=rows.start // per, shard_count=shards // per,
                        drop_remainder=True)


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def _seed(seed: int) -> int:
    return int(seed) % (2**32)


def pretrain_dataset(
    source: Any,
    tokenizer: WordPiece,
    *,
    batch_size: int,
    seed: int,
    query_len: int = 96,
    max_masks: int = 10,
    masking: str = "salient",
    tagger: masking_lib.Tagger | None = None,
    shard: ShardOptions | None = None,
    num_epochs: int | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Shuffled pre-training batches: this host's rows of each global batch (`batch_size` is
    global; see the module docstring).

    Iterate with `it = iter(ds)`; `it.get_state()` / `it.set_state(state)` save and restore
    the position (a JSON-serialisable dict). `num_epochs=None` repeats forever, each epoch in
    a new order.
    """
    shard = _shard(shard)
    per_host = _per_host(batch_size, shard)
    n = len(source)
    if n < batch_size:
        raise ValueError(f"{n} examples, fewer than one batch of {batch_size}")
    batcher = PretrainBatcher(source, tokenizer, query_len, max_masks, masking, tagger,
                              first_row=shard.shard_index * per_host)
    ds = (grain.MapDataset.range(n).shuffle(seed=_seed(seed)).repeat(num_epochs)
          .batch(batch_size, drop_remainder=True))
    ds = _host_slice(ds, shard, per_host).random_map(batcher, seed=_seed(seed + 1))
    return ds.to_iter_dataset(_read_options(num_threads, prefetch))


def qa_dataset(
    qa: Any,
    tokenizer: WordPiece,
    *,
    batch_size: int,
    seed: int = 0,
    question_len: int = 64,
    train: bool = True,
    shard: ShardOptions | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """QA batches: this host's rows of each global batch (`batch_size` is global).

    train=True: shuffled, repeated forever, remainders dropped. train=False (evaluation):
    one pass in order over every example, the last batch padded with weight-0 rows so
    every host yields the same number of batches.
    """
    shard = _shard(shard)
    per_host = _per_host(batch_size, shard)
    n = len(qa)
    batcher = QaBatcher(qa, tokenizer, question_len)
    if train:
        if n < batch_size:
            raise ValueError(f"{n} questions, fewer than one batch of {batch_size}")
        ds = grain.MapDataset.range(n).shuffle(seed=_seed(seed)).repeat(None)
    else:
        total = -(-n // batch_size) * batch_size  # every host: the same number of batches
        ds = grain.MapDataset.range(total).map(lambda i: i if i < n else -1)
    ds = _host_slice(ds.batch(batch_size, drop_remainder=True), shard, per_host)
    return ds.map(batcher).to_iter_dataset(_read_options(num_threads, prefetch))


# --------------------------------------------------------------------------- to devices


def to_global(
    batch: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES,
) -> dict[str, Any]:
    """Per-host numpy batch → global jax Arrays, batch dim over the mesh's `batch` axes.

    Host-only fields (HOST_KEYS, lists) are passed through unchanged. On one host this is a
    device_put; on a pod each host contributes its rows (`make_array_from_process_local_data`).
    """
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k in HOST_KEYS or not isinstance(v, np.ndarray):
            out[k] = v
            continue
        s = sharding_lib.batch_sharding(mesh, v.ndim, rules)
        out[k] = jax.make_array_from_process_local_data(s, v)
    return out
