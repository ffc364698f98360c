"""A published index version made searchable: exact on device or ScaNN on the host.

Training and inference both hold one `Searcher` over the current `IndexVersion`: exact search
on device (the table sharded over all devices, `mips.ExactIndex`) or ScaNN on the host when the
config asks for it and the version carries ScaNN files. (What a task makes of the ids — REALM's
candidates, ORQA's reader beam — is the task's: `tasks/`.)
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections
import numpy as np

from realm_jax import sharding as sharding_lib
from realm_jax.retrieval import mips
from realm_jax.retrieval.store import IndexVersion

log = logging.getLogger(__name__)


class Searcher:
    """Top-k search over one index version (see module docstring).

    Attributes:
      version: the `IndexVersion` searched (its `embeddings` [N, d] also stay on the host:
        inference scores a question against its retrieved blocks there).
      engine: "exact" or "scann": what actually answers `search`.
      device_index: the device-resident exact index (None for ScaNN, which searches on the
        host): a caller with queries still on the device searches it without a host round
        trip.
    """

    def __init__(self, version: IndexVersion, engine: str, index: Any, mesh=None,
                 rules: tuple = sharding_lib.DEFAULT_RULES, table_dtype: str = "float32"):
        self.version = version
        self.engine = engine
        self._index = index
        self.device_index: mips.ExactIndex | None = index if engine == "exact" else None
        self._mesh, self._rules, self._dtype = mesh, tuple(rules), table_dtype
        self._table: mips.ExactIndex | None = None

    def device_table(self) -> mips.ExactIndex:
        """The version's `[N, d]` table on the devices, row-sharded: the exact index itself, or
        for ScaNN (whose table is a host copy) one placed on first use. A train step that
        reads block embeddings (ORQA's retriever logits) gathers them there
        (`mips.sharded_gather_rows`) instead of receiving a host copy with every batch."""
        if self.device_index is not None:
            return self.device_index
        if self._table is None:
            if self._mesh is None:
                raise ValueError("this searcher was opened without a mesh: no device table")
            self._table = mips.ExactIndex.build(np.asarray(self.version.embeddings),
                                                self._mesh, dtype=self._dtype, rules=self._rules)
        return self._table

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
    rules = tuple(tuple(x) for x in config.rules)
    if r.engine not in ("exact", "scann"):
        raise ValueError(f"retrieval.engine={r.engine!r}; accepted: exact, scann")
    scann_dir = version.path / "scann"
    if r.engine == "scann":
        if scann_dir.exists():
            from realm_jax.retrieval.scann_index import ScannIndex

            table = np.asarray(version.embeddings, np.float32)
            return Searcher(version, "scann", ScannIndex.load(scann_dir, table=table), mesh,
                            rules, r.table_dtype)
        log.warning("index v%d has no ScaNN files (%s): searching it exactly", version.step,
                    scann_dir)
    index = mips.ExactIndex.build(
        np.asarray(version.embeddings), mesh, dtype=r.table_dtype, use_approx=r.use_approx,
        rules=rules,
    )
    return Searcher(version, "exact", index, mesh, rules, r.table_dtype)
