"""Approximate MIPS on the host with ScaNN (pybind, no TensorFlow), same interface as mips.

The refresher builds one of these per index version (DESIGN §4) so that trainers and the
inference server can search 13M blocks without holding the table on accelerators:
  * a k-means tree (`num_leaves ≈ 2√N`) picks `num_leaves_to_search` partitions per query,
  * asymmetric hashing (2 dims per 16-centre codebook, anisotropic loss with threshold 0.2, as
    in the ScaNN paper) scores the points in them,
  * the best `reorder_k` are re-scored exactly against ScaNN's float32 copy of the table.

`ScannIndex.search(queries, k)` returns `(ids [B, k] int32, scores [B, k] float32)` like
`ExactIndex.search`. Scores are re-computed here with numpy from the float32 table, so they are
the same dot products the exact engine returns (ScaNN's reordered scores are also float32 dot
products, but summed in another order), and results are sorted by those scores.

Small tables (N < `ScannConfig.brute_force_below`) use ScaNN's exact brute-force scorer
instead of tree + hashing: k-means with √N leaves and 16-centre codebooks needs enough points
per leaf and per centre to train, and brute force over a few thousand rows is cheap anyway.

ScaNN quirks this module handles (scann 1.4):
  * `serialize(dir)` writes absolute asset paths unless `relative_path=True`; absolute paths
    break the refresher's stage-then-rename publish, so we always write relative ones.
  * `load_searcher` silently creates `scann_assets.pbtxt` when it is missing (back-compat shim)
    and unpickles `scann_docids.pkl` if one exists; we refuse both (no pickle, no writes on
    load).
  * When the searched leaves or `pre_reorder_num_neighbors` yield fewer than k candidates,
    ScaNN pads the result with id 0 and score NaN (id 0 is a real block!). We always ask for at
    least k pre-reorder candidates, and re-search any query that still comes back short over
    every leaf.
  * Queries of the wrong dimension raise a RuntimeError deep inside C++; we check first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import numpy as np
from scann.scann_ops.py import scann_ops_pybind

from realm_jax.retrieval.mips import check_k, check_queries, check_table

META_FILE = "scann_index.json"
_FORMAT_VERSION = 1
_SCANN_TABLE_FILE = "dataset.npy"  # ScaNN's own float32 copy, used for exact reordering


@dataclasses.dataclass(frozen=True)
class ScannConfig:
    """ScaNN build and search parameters; None fields are derived from N at build time.

    Attributes:
      num_leaves: k-means partitions; None → round(2√N). Measured on 100k clustered rows
        (`benchmarks/mips.py --scann-grid`, one run, 2 cores): 632 leaves searched 63 at a
        time, reorder 50, reach recall@10 0.954 at 32.6k QPS, 1.47× FAISS-HNSW's 22.2k at
        that recall; the ScaNN README's √N (316 leaves) needs 95 of them for recall 0.960,
        at 17.3k QPS (0.80× HNSW).
      num_leaves_to_search: partitions scored per query; None → ceil(num_leaves / 10).
      training_sample_size: points used to train the tree and the codebooks (clipped to N).
      dims_per_block: dimensions per asymmetric-hashing block (2 is ScaNN's recommendation
        for high recall; 128-d embeddings → 64 blocks).
      anisotropic_quantization_threshold: ScaNN's score-aware quantisation threshold (0.2 is
        the value the ScaNN paper and README use for MIPS).
      reorder_k: candidates re-scored exactly (at least k per search).
      num_neighbors: ScaNN's default final k baked into the searcher (searches pass k anyway).
      brute_force_below: tables with fewer rows use exact brute force (see module docstring).
      training_threads: threads for building (0 = ScaNN's default, all cores).
      parallel_search: use `search_batched_parallel` (multi-threaded over the batch).
    """

    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    training_sample_size: int = 100_000
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder_k: int = 100
    num_neighbors: int = 10
    brute_force_below: int = 4096
    training_threads: int = 0
    parallel_search: bool = False

    def __post_init__(self):
        for name in ("training_sample_size", "dims_per_block", "reorder_k", "num_neighbors"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScannConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("num_leaves", "num_leaves_to_search"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ScannConfig.{name} must be ≥ 1 or None, got {value}")
        if self.brute_force_below < 0 or self.training_threads < 0:
            raise ValueError("ScannConfig.brute_force_below and training_threads must be ≥ 0")


def _resolve(config: ScannConfig, n: int) -> dict[str, Any]:
    """The concrete tree parameters for an N-row table (recorded in the saved metadata)."""
    if n < config.brute_force_below:
        return {"brute_force": True}
    num_leaves = config.num_leaves or max(1, min(n, round(2 * math.sqrt(n))))
    if num_leaves > n:
        raise ValueError(f"ScannConfig.num_leaves={num_leaves} exceeds the table size N={n}")
    to_search = config.num_leaves_to_search or max(1, math.ceil(num_leaves / 10))
    if to_search > num_leaves:
        raise ValueError(
            f"ScannConfig.num_leaves_to_search={to_search} exceeds num_leaves={num_leaves}"
        )
    return {
        "brute_force": False,
        "num_leaves": int(num_leaves),
        "num_leaves_to_search": int(to_search),
        "training_sample_size": int(min(config.training_sample_size, n)),
    }


class ScannIndex:
    """A ScaNN searcher plus the float32 table it was built from (for exact scores).

    Build with `ScannIndex.build(table, config)`, or `ScannIndex.load(directory)` after `save`.
    """

    def __init__(
        self,
        searcher: scann_ops_pybind.ScannSearcher,
        table: np.ndarray,
        config: ScannConfig,
        resolved: dict[str, Any],
    ):
        self._searcher = searcher
        self._table = table  # [N, d] float32, possibly a read-only memory map
        self.config = config
        self.resolved = resolved

    @classmethod
    def build(cls, table: np.ndarray, config: ScannConfig | None = None) -> ScannIndex:
        """Train and build a searcher over the rows of `table`.

        Args:
          table: `[N, d]` finite embeddings; kept by reference (no copy if already float32).
          config: build/search parameters; defaults to `ScannConfig()`.

        Returns:
          The index.

        Raises:
          ValueError: empty, non-2-D or non-finite table, or tree sizes that do not fit N.
        """
        config = config or ScannConfig()
        table = np.ascontiguousarray(check_table(table))  # [N, d] float32
        n = table.shape[0]
        resolved = _resolve(config, n)
        builder = scann_ops_pybind.builder(table, config.num_neighbors, "dot_product")
        if resolved["brute_force"]:
            builder = builder.score_brute_force()
        else:
            builder = (
                builder.tree(
                    num_leaves=resolved["num_leaves"],
                    num_leaves_to_search=resolved["num_leaves_to_search"],
                    training_sample_size=resolved["training_sample_size"],
                )
                .score_ah(
                    config.dims_per_block,
                    anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
                    training_sample_size=resolved["training_sample_size"],
                )
                .reorder(config.reorder_k)
            )
        searcher = builder.set_n_training_threads(config.training_threads).build()
        return cls(searcher, table, config, resolved)

    @property
    def size(self) -> int:
        """N, the number of searchable rows."""
        return int(self._table.shape[0])

    @property
    def dim(self) -> int:
        return int(self._table.shape[1])

    @property
    def table(self) -> np.ndarray:
        """The `[N, d]` float32 table the scores are computed from (do not modify)."""
        return self._table

    def _raw_search(
        self, queries: np.ndarray, k: int, leaves: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """ScaNN's own answer: `(ids [B, k] uint32, scores [B, k] float32)`, NaN where short."""
        kw: dict[str, Any] = dict(final_num_neighbors=k)
        if not self.resolved["brute_force"]:
            # Fewer pre-reorder candidates than k would leave NaN-padded slots.
            kw["pre_reorder_num_neighbors"] = max(self.config.reorder_k, k)
            kw["leaves_to_search"] = leaves
        if self.config.parallel_search:
            ids, scores = self._searcher.search_batched_parallel(queries, **kw)
        else:
            ids, scores = self._searcher.search_batched(queries, **kw)
        return np.asarray(ids), np.asarray(scores, np.float32)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k ids for each query, with exact float32 scores for those ids.

        Args:
          queries: `[B, d]` array (numpy or jax); a single `[d]` vector is treated as `[1, d]`.
          k: results per query, 1 ≤ k ≤ N.

        Returns:
          `(ids [B, k] int32, scores [B, k] float32)` numpy arrays, sorted by score, best first.

        Raises:
          ValueError: k out of range, wrong query dimension, or non-finite queries.
        """
        k = check_k(k, self.size)
        queries = np.ascontiguousarray(check_queries(np.asarray(queries, np.float32), self.dim))
        ids, raw_scores = self._raw_search(queries, k, None)  # [B, k]
        short = np.isnan(raw_scores).any(axis=1) | (ids.shape[1] < k)
        if short.any():
            # The searched leaves held fewer than k points: search those queries everywhere.
            logging.warning(
                "ScaNN found fewer than k=%d results for %d of %d queries; re-searching them "
                "over all leaves (raise num_leaves_to_search if this is frequent)",
                k, int(short.sum()), queries.shape[0],
            )
            all_leaves = self.resolved.get("num_leaves")
            ids_retry, raw_retry = self._raw_search(queries[short], k, all_leaves)
            if np.isnan(raw_retry).any() or ids_retry.shape[1] < k:
                raise RuntimeError(f"ScaNN returned fewer than k={k} results over all leaves")
            ids = ids.copy()
            ids[short] = ids_retry
        ids = ids.astype(np.int32)  # [B, k]
        # Exact float32 scores of the returned rows: [B, k, d] · [B, d] → [B, k].
        scores = np.einsum("bkd,bd->bk", self._table[ids], queries, dtype=np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")  # ScaNN's order on exact ties
        return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)

    # ------------------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> None:
        """Write ScaNN's assets plus `scann_index.json` into a local directory.

        Asset paths are written relative to `directory`, so the directory can be staged under a
        temporary name and renamed (DESIGN §4). ScaNN writes with plain file I/O: `directory`
        must be local (copy to `gs://` afterwards). The table itself is saved by ScaNN as
        `dataset.npy` (it needs it for reordering); `load` reuses it when no table is given.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self._searcher.serialize(directory, relative_path=True)
        meta = {
            "format": _FORMAT_VERSION,
            "num_rows": self.size,
            "dim": self.dim,
            "config": dataclasses.asdict(self.config),
            "resolved": self.resolved,
        }
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, table: np.ndarray | None = None) -> ScannIndex:
        """Load an index written by `save`.

        Args:
          directory: a directory written by `ScannIndex.save`.
          table: the `[N, d]` table the index was built from, if the caller already holds it
            (e.g. the index store's embeddings); otherwise ScaNN's `dataset.npy` is memory-mapped.

        Returns:
          The index; searches give the same results as the index that was saved.

        Raises:
          ValueError: missing or inconsistent files, or a table of the wrong shape.
        """
        directory = os.fspath(directory)
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.isfile(meta_path):
            raise ValueError(f"{directory} holds no {META_FILE}: not written by ScannIndex.save")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format {meta.get('format')}, this code reads {_FORMAT_VERSION}"
            )
        if not os.path.isfile(os.path.join(directory, "scann_assets.pbtxt")):
            raise ValueError(f"{directory} holds no scann_assets.pbtxt")
        if os.path.exists(os.path.join(directory, "scann_docids.pkl")):
            raise ValueError(f"{directory} holds scann_docids.pkl; refusing to unpickle it")
        n, d = int(meta["num_rows"]), int(meta["dim"])
        if table is None:
            table = np.load(
                os.path.join(directory, _SCANN_TABLE_FILE), mmap_mode="r", allow_pickle=False
            )
        else:
            table = np.ascontiguousarray(np.asarray(table, np.float32))
        if table.shape != (n, d) or table.dtype != np.float32:
            raise ValueError(
                f"table has shape {table.shape} and dtype {table.dtype}; the index in "
                f"{directory} was built over [{n}, {d}] float32"
            )
        searcher = scann_ops_pybind.load_searcher(directory, assets_backcompat_shim=False)
        if searcher.size() != n:
            raise ValueError(f"ScaNN searcher in {directory} has {searcher.size()} rows, meta {n}")
        return cls(searcher, table, ScannConfig(**meta["config"]), meta["resolved"])
