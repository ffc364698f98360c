"""The one way token ids become embeddings on the mesh: training queries, evaluation
questions, every index build (the refresher, a trainer's first and frozen index, evaluation's
fresh index) and inference all go through `EmbedRunner`.

Why one runner: three copies padded three ways (zero rows, null documents, row 0 repeated) and
padded every block to `data.block_len`, though a real corpus's blocks are mostly far shorter
(a dictionary's: mean ≈ 25 wordpieces of 64). Padding is compute. So, for a set of rows:

  1. sort by length, longest first (stable: the same corpus gives the same batches), so a
     batch holds rows of about one length and the largest batch shows any memory limit first;
  2. cut into batches of `batch_size` rows (or of about `batch_tokens` padded tokens: more
     rows when they are short); pad each to its longest row rounded up to one of
     `length_buckets` equal steps of `max_len` (`bucket_length`) and, if short of rows, to a
     fixed row count by repeating its first row (a real row: no all-masked input);
  3. put the embeddings back in input order.

A row's embedding does not depend on its batch-mates or its padding beyond float rounding
(attention masks padding out), so bucketed and unbucketed tables agree to ~1e-6, and a given
corpus always gets the same buckets, so one index version is reproducible bitwise. Shapes are
bounded: per bucket, a full batch and a small one (the mesh's batch split) — at most
2 × `length_buckets` compilations per runner, shared by every runner of the same model and mesh
(`_embed_fn` is cached).

Training batches are the exception (`embed_host_rows`): each host holds its own rows of a
global batch, and a global array needs one shape on every host, so they keep their full length.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from realm_jax import defaults, multihost, sharding
from realm_jax.data.joins import TokenizedBlocks
from realm_jax.data.tokenizer import Encoded
from realm_jax.models import Embedder, RealmModelConfig
from realm_jax.retrieval import mips

log = logging.getLogger(__name__)
PyTree = Any
LOG_EVERY_S = 30.0  # a long index build logs its rate and ETA this often
BLOCK_WINDOW = 32  # batches of blocks encoded and sorted by length together


def bucket_length(n: int, full: int, buckets: int) -> int:
    """`n` tokens rounded up to the next of `buckets` equal steps of `full` (at most `full`)."""
    step = -(-full // max(1, buckets))
    return min(full, max(1, -(-n // step)) * step)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """The leading dim padded to `size` by repeating row 0 (a real row: no all-masked input)."""
    missing = size - len(x)
    return x if missing <= 0 else np.concatenate([x, np.repeat(x[:1], missing, axis=0)])


@functools.lru_cache(maxsize=8)
def _embed_fn(cfg: RealmModelConfig, mesh, rules) -> Callable:
    """[B, L] ids, mask, types → [B, d], jitted with the batch split over the mesh and the
    output replicated (every host can read all of it); cached, so every runner of one model
    and mesh shares its compilations."""
    module = Embedder(cfg)
    return sharding.jit_sharded(
        lambda p, ids, mask, types: module.apply({"params": p}, ids, mask, types),
        mesh, rules, out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=16)
def _retrieve_fn(cfg: RealmModelConfig, mesh, rules, index_rules, k: int, num_valid: int,
                 use_approx: bool, recall_target: float, chunk_rows: int | None) -> Callable:
    """[B, L] ids, mask, types + a row-sharded [N_padded, d] table → top-k (ids, scores)
    [B, k], replicated, and whether every query embedding was finite (the check the host
    search made): the query embeddings never leave the devices (one jitted call where
    embedding, a device → host copy, an upload and a search were four steps)."""
    module = Embedder(cfg)

    def retrieve(p, table, ids, mask, types):
        q = module.apply({"params": p}, ids, mask, types).astype(jnp.float32)  # [B, d]
        top_ids, scores = mips.sharded_exact_search(
            table, q, k, mesh=mesh, num_valid=num_valid, rules=index_rules,
            use_approx=use_approx, recall_target=recall_target, chunk_rows=chunk_rows)
        return top_ids, scores, jnp.all(jnp.isfinite(q))

    return sharding.jit_sharded(retrieve, mesh, rules, out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class HostQueries:
    """Query embeddings of a global batch whose rows are spread over hosts.

    Attributes:
      all: [B_global, d] float32, every host's rows (identical on every host), padding included.
      rows: where this host's rows sit in `all`.
    """

    all: np.ndarray
    rows: slice

    @property
    def mine(self) -> np.ndarray:
        """[B_host, d]: this host's rows, in the order of its batch."""
        return self.all[self.rows]


class Progress:
    """Rows done, rows/s and ETA of a long embedding: a tqdm bar on the console and, every
    LOG_EVERY_S and at the end, a log line (the logs of a pod job have no console)."""

    def __init__(self, total: int, what: str, console: bool):
        from tqdm import tqdm

        self.total, self.what = total, what
        self.done, self.t0 = 0, time.time()
        self._next_log = self.t0 + LOG_EVERY_S
        self._bar = tqdm(total=total, unit=what.split()[-1].rstrip("s"), desc=what,
                         disable=not console, smoothing=0.1, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        self._bar.update(n)
        now = time.time()
        if now >= self._next_log:
            self._next_log = now + LOG_EVERY_S
            rate = self.done / max(now - self.t0, 1e-9)
            log.info("%s: %d/%d, %.1f/s, ETA %.0fs", self.what, self.done, self.total, rate,
                     (self.total - self.done) / max(rate, 1e-9))

    def close(self) -> None:
        self._bar.close()
        dt = time.time() - self.t0
        log.info("%s: %d in %.1fs (%.1f/s)", self.what, self.done, dt, self.done / max(dt, 1e-9))


class EmbedRunner:
    """Token ids → embeddings with one tower, length-aware (see module docstring).

    Args:
      cfg, mesh, rules: the model (its `Embedder`), the devices and the sharding rules table.
      max_len: the longest row (data.query_len for questions, data.block_len for blocks).
      batch_size: rows per call, rounded up to a multiple of the mesh's batch split.
      length_buckets: how many lengths a batch may be padded to (1: always `max_len`).
      batch_tokens: if > 0, rows per call are chosen per bucket from tokens instead:
        `batch_tokens // bucket length` (a multiple of the batch split, at least one row per
        batch device), so short rows go in proportionally larger batches and every call
        computes about the same padded tokens; `batch_size` is then ignored.
    """

    def __init__(self, cfg: RealmModelConfig, mesh, rules, *, max_len: int, batch_size: int,
                 length_buckets: int = 4, batch_tokens: int = 0):
        if length_buckets < 1:
            raise ValueError(f"length_buckets={length_buckets} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if batch_tokens < 0:
            raise ValueError(f"batch_tokens={batch_tokens} must be >= 0 (0: batch by rows)")
        self.mesh = mesh
        self.rules = tuple(tuple(r) for r in rules)
        self.max_len = int(max_len)
        self.length_buckets = int(length_buckets)
        self.shards = sharding.mesh_batch_size(mesh, self.rules)
        self.batch_tokens = int(batch_tokens)
        self.batch_size = -(-int(batch_size) // self.shards) * self.shards
        if self.batch_tokens:
            self.batch_size = self.rows_for(self.max_len)  # the rows of a full-length call
        self._in = sharding.batch_sharding(mesh, 2, self.rules)
        self._cfg = cfg
        self._fn = _embed_fn(cfg, mesh, self.rules)

    @property
    def compilations(self) -> int:
        """Shapes compiled so far by this runner's (shared) function."""
        return self._fn.jitted._cache_size()

    def bucket(self, n: int) -> int:
        return bucket_length(n, self.max_len, self.length_buckets)

    def rows_for(self, length: int) -> int:
        """Rows per call of padded `length`: `batch_size`, or from `batch_tokens`."""
        if not self.batch_tokens:
            return self.batch_size
        return max(1, self.batch_tokens // (length * self.shards)) * self.shards

    def batches(self, lengths: np.ndarray) -> Iterator[tuple[np.ndarray, int, int]]:
        """(row indices, padded rows, padded length) of each call over rows of `lengths` [N]:
        longest first, `rows_for(bucket)` rows, each padded to its bucket (the bucket of its
        first, longest row). Per bucket two shapes: a full call and a small one."""
        lengths = np.asarray(lengths)
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            length = self.bucket(int(lengths[order[start]]))
            full = self.rows_for(length)
            rows = order[start:start + full]
            start += len(rows)
            yield rows, (self.shards if len(rows) <= self.shards else full), length

    def embed(self, params: PyTree, enc: Encoded, progress: Progress | None = None
              ) -> np.ndarray:
        """Rows `enc` [N, ≤max_len], the same on every host → float32 [N, d] in their order."""
        arrays = (enc.input_ids, enc.attention_mask, enc.token_type_ids)
        n = arrays[0].shape[0]
        if n == 0:
            return np.zeros((0, 0), np.float32)
        lengths = enc.lengths
        out: np.ndarray | None = None
        for rows, size, length in self.batches(lengths):
            placed = [multihost.put_global(pad_rows(np.asarray(a)[rows, :length], size),
                                           self._in) for a in arrays]
            emb = np.asarray(self._fn(params, *placed), np.float32)[:len(rows)]
            if out is None:
                out = np.empty((n, emb.shape[-1]), np.float32)
            out[rows] = emb
            if progress is not None:
                progress.update(len(rows))
        return out

    def embed_blocks(self, params: PyTree, blocks: TokenizedBlocks, console: bool = True
                     ) -> np.ndarray:
        """Every block as `[CLS] title [SEP] body [SEP]` of ≤ max_len → float32 [N, d], in
        corpus order, with blocks/s and an ETA shown (`Progress`).

        Blocks are encoded a window of BLOCK_WINDOW batches at a time (a paper-scale corpus
        does not fit in memory as padded ids) and sorted by length within it.
        """
        n = len(blocks)
        progress = Progress(n, "embedding blocks", console)
        out: np.ndarray | None = None
        window = self.batch_size * BLOCK_WINDOW
        for start in range(0, n, window):
            ids = np.arange(start, min(n, start + window))
            emb = self.embed(params, blocks.encode(ids, self.max_len), progress)
            if out is None:
                out = np.empty((n, emb.shape[-1]), np.float32)
            out[ids] = emb
        progress.close()
        return out if out is not None else np.zeros((0, 0), np.float32)

    def _place_host_rows(self, arrays: tuple[np.ndarray, ...]) -> tuple[list[jax.Array], slice]:
        """This host's [b, L] rows of a global batch → global arrays, and where its rows sit.

        Every host calls this at the same point with the same b (the data pipeline gives every
        host equal batches): one sharded call over the whole global batch, at full length.
        """
        b = arrays[0].shape[0]
        mine = multihost.process_rows(self._in, (self.shards,))  # this host's batch shards
        size = b + (-b) % (mine.stop - mine.start)
        placed = [jax.make_array_from_process_local_data(self._in, pad_rows(np.asarray(a), size))
                  for a in arrays]
        rows = multihost.process_rows(self._in, placed[0].shape)
        return placed, slice(rows.start, rows.start + b)

    def embed_host_rows(self, params: PyTree, ids: np.ndarray, mask: np.ndarray,
                        types: np.ndarray) -> HostQueries:
        """This host's [b, L] rows of a global batch (training) → all hosts' embeddings."""
        placed, rows = self._place_host_rows((ids, mask, types))
        embeddings = np.asarray(self._fn(params, *placed), np.float32)  # [B_global, d]
        return HostQueries(embeddings, rows)

    def retrieve_host_rows(self, params: PyTree, ids: np.ndarray, mask: np.ndarray,
                           types: np.ndarray, index: mips.ExactIndex, k: int
                           ) -> tuple[np.ndarray, np.ndarray]:
        """This host's [b, L] query rows → their top-k (ids, scores) [b, k] in `index`,
        embedded and searched in one call on the devices; only ids and scores come back.
        Equal to `embed_host_rows` then `index.search` (the same float32 scores).

        Raises:
          ValueError: k out of range, or a query embedding is not finite (a diverged query
            tower: its ids would be arbitrary).
        """
        k = mips.check_k(k, index.num_valid)
        placed, rows = self._place_host_rows((ids, mask, types))
        fn = _retrieve_fn(self._cfg, self.mesh, self.rules, tuple(index.rules), k,
                          index.num_valid, index.use_approx, index.recall_target,
                          index.chunk_rows)
        top_ids, scores, finite = fn(params, index.table, *placed)  # [B_global, k] each
        if not bool(finite):
            raise ValueError("query embeddings contain NaN or inf: the query tower has "
                             "diverged, so its search results would be arbitrary")
        return np.asarray(top_ids)[rows], np.asarray(scores)[rows]


def block_runner(config: ml_collections.ConfigDict, mesh) -> EmbedRunner:
    """The runner of every index build: `refresh.batch_size` blocks of ≤ data.block_len
    (or, with `refresh.batch_tokens` > 0, as many blocks as make that many padded tokens).

    Raises:
      ValueError: refresh.batch_size does not split over the mesh's batch devices (unless
        refresh.batch_tokens sizes the calls instead, which ignores it).
    """
    rules = tuple(tuple(r) for r in config.rules)
    batch_size, shards = int(config.refresh.batch_size), sharding.mesh_batch_size(mesh, rules)
    batch_tokens = int(config.refresh.get("batch_tokens", 0))
    if batch_size % shards and not batch_tokens:
        raise ValueError(f"refresh.batch_size={batch_size} is not a multiple of the {shards} "
                         "devices the batch is split over")
    return EmbedRunner(defaults.model_config(config), mesh, rules, max_len=config.data.block_len,
                       batch_size=batch_size, length_buckets=_buckets(config),
                       batch_tokens=batch_tokens)


def query_runner(config: ml_collections.ConfigDict, mesh, batch_size: int | None = None,
                 length_buckets: int | None = None) -> EmbedRunner:
    """The runner of questions and queries: `batch_size` (default eval.batch_size) rows of
    ≤ data.query_len, in `length_buckets` (default data.length_buckets) lengths."""
    return EmbedRunner(defaults.model_config(config), mesh, config.rules,
                       max_len=config.data.query_len,
                       batch_size=batch_size or int(config.eval.batch_size),
                       length_buckets=length_buckets or _buckets(config))


def _buckets(config: ml_collections.ConfigDict) -> int:
    return int(config.data.get("length_buckets", defaults.LENGTH_BUCKETS))
