"""A published index version made searchable, and REALM's candidate selection on top of it.

Training and inference both hold one `Searcher` over the current `IndexVersion`: exact search
on device (the table sharded over all devices, `mips.ExactIndex`) or ScaNN on the host when the
config asks for it and the version carries ScaNN files. `realm_candidates` turns raw top-k ids
into the k candidates of a pre-training step (trivial retrievals dropped, null document first).
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections
import numpy as np

from realm_jax.data.joins import NULL_BLOCK
from realm_jax.retrieval import mips
from realm_jax.retrieval.store import IndexVersion

log = logging.getLogger(__name__)


class Searcher:
    """Top-k search over one index version (see module docstring).

    Attributes:
      version: the `IndexVersion` searched (its `embeddings` [N, d] stay on the host, so the
        ORQA step can gather frozen block embeddings of the searched ids).
      engine: "exact" or "scann": what actually answers `search`.
    """

    def __init__(self, version: IndexVersion, engine: str, index: Any):
        self.version = version
        self.engine = engine
        self._index = index

    @property
    def step(self) -> int:
        return self.version.step

    @property
    def num_blocks(self) -> int:
        return self.version.num_blocks

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`queries` [B, d] → (ids [B, k] int32, scores [B, k] float32), best first."""
        return self._index.search(np.asarray(queries, np.float32), k)

    def embeddings_of(self, ids: np.ndarray) -> np.ndarray:
        """Frozen block embeddings of `ids` [...] → [..., d] float32."""
        return np.asarray(self.version.embeddings[np.asarray(ids)], np.float32)


def open_searcher(
    version: IndexVersion, config: ml_collections.ConfigDict, mesh
) -> Searcher:
    """The searcher `config.retrieval` asks for over `version`.

    ScaNN is used when `retrieval.engine == "scann"` and the version was published with ScaNN
    files; a version without them (e.g. published by an exact-engine refresher) is searched
    exactly, with a warning, rather than rebuilt on the trainer's critical path.
    """
    r = config.retrieval
    if r.engine not in ("exact", "scann"):
        raise ValueError(f"retrieval.engine={r.engine!r}; accepted: exact, scann")
    scann_dir = version.path / "scann"
    if r.engine == "scann":
        if scann_dir.exists():
            from realm_jax.retrieval.scann_index import ScannIndex

            table = np.asarray(version.embeddings, np.float32)
            return Searcher(version, "scann", ScannIndex.load(scann_dir, table=table))
        log.warning("index v%d has no ScaNN files (%s): searching it exactly", version.step,
                    scann_dir)
    index = mips.ExactIndex.build(
        np.asarray(version.embeddings), mesh, dtype=r.table_dtype, use_approx=r.use_approx,
        rules=tuple(tuple(x) for x in config.rules),
    )
    return Searcher(version, "exact", index)


def realm_candidates(
    ids: np.ndarray, source_hashes: np.ndarray, block_hashes: np.ndarray, k: int
) -> np.ndarray:
    """Raw search results → the k candidates of a pre-training step, null document first.

    Prohibits trivial retrievals (DESIGN §1): a retrieved block whose uid equals the query's
    source block's uid is dropped (comparing uids, not indices, also drops duplicates of it).

    Args:
      ids: [B, k - 1 + extra] search results, best first.
      source_hashes: [B] int64 uid hash of each query's own block (`Uids.hashes()`), or any
        value not in `block_hashes` (e.g. 0) when the query has no source block.
      block_hashes: [N] int64 uid hashes of the corpus.
      k: candidates kept, including the null document.

    Returns:
      [B, k] int32 block ids; column 0 is `NULL_BLOCK` (−1). If fewer than k − 1 results
      survive, the row is padded with further null documents, which the marginal treats
      as ordinary (uninformative) candidates.
    """
    ids = np.asarray(ids, np.int64)
    b = ids.shape[0]
    trivial = block_hashes[ids] == np.asarray(source_hashes, np.int64)[:, None]  # [B, R]
    # Stable sort on the drop flag keeps the search order among the survivors.
    order = np.argsort(trivial, axis=1, kind="stable")
    kept = np.take_along_axis(ids, order, 1)
    kept = np.where(np.take_along_axis(trivial, order, 1), NULL_BLOCK, kept)[:, : k - 1]
    if kept.shape[1] < k - 1:
        kept = np.pad(kept, ((0, 0), (0, k - 1 - kept.shape[1])), constant_values=NULL_BLOCK)
    return np.concatenate([np.full((b, 1), NULL_BLOCK), kept], axis=1).astype(np.int32)
