"""Exact maximum-inner-product search on device, with the index sharded over every device.

REALM scores every block against each query (f(x, z) = Embed(x)·Embed(z)) and keeps the top k.
The `[num_blocks, dim]` table is far larger than one device's memory on a real corpus (13M × 128),
so it is split along the logical `blocks` axis over all devices (DESIGN §5): each device scores
its own rows, keeps its local top-k, and an all-gather of those `[batch, k]` candidates plus one
more top-k gives the global answer. Only `devices × k` candidates per query ever cross devices.

Two entry points share one kernel:
  * `exact_search` / `sharded_exact_search`: pure functions, safe to call inside a jitted train
    step (no host sync, no validation beyond shapes).
  * `ExactIndex`: a host-facing index built from a numpy table; it pads, places and validates,
    and its `search(queries, k)` matches `ScannIndex.search` (realm_jax.retrieval.scann_index).

Padding: N need not divide the device count. The table is padded with zero rows up to
`devices × rows_per_shard`; padded rows are scored −inf by their global id (`id >= num_valid`),
so they lose to every real row and, because k ≤ N is enforced, are never returned.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realm_jax import multihost
from realm_jax import sharding as sharding_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- kernel


def _merge_top_k(
    scores: jax.Array, ids: jax.Array, k: int, *, use_approx: bool, recall_target: float
) -> tuple[jax.Array, jax.Array]:
    """Top-k of `scores [B, M]` along the last axis, carrying `ids [B, M]` along."""
    if use_approx:
        top_scores, pos = jax.lax.approx_max_k(scores, k, recall_target=recall_target)
    else:
        top_scores, pos = jax.lax.top_k(scores, k)
    return top_scores, jnp.take_along_axis(ids, pos, axis=-1)


def _score_rows(rows: jax.Array, queries: jax.Array) -> jax.Array:
    """`queries [B, d] · rows [M, d]ᵀ → [B, M]` in float32.

    Queries are cast to the table's dtype (bf16 × bf16 is what the TPU MXU runs at full speed)
    but the products are accumulated in float32, so a bf16 table loses only its own rounding.
    """
    return jax.lax.dot_general(
        queries.astype(rows.dtype),
        rows,
        dimension_numbers=(((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def exact_search(
    table: jax.Array,
    queries: jax.Array,
    k: int,
    *,
    num_valid: int | jax.Array | None = None,
    id_offset: int | jax.Array = 0,
    use_approx: bool = False,
    recall_target: float = 0.95,
    chunk_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-k rows of one (unsharded or per-device) table by inner product; jit-friendly.

    This is the per-device kernel of `sharded_exact_search` and is also usable on its own for a
    replicated table. Nothing here syncs with the host, so bad inputs are not detected: use
    `ExactIndex.search` from host code.

    Args:
      table: `[M, d]` rows (float32 or bfloat16); rows whose global id is `>= num_valid` are
        padding.
      queries: `[B, d]` query embeddings.
      k: results per query; a static int. Clipped to M here (a device may hold fewer than k
        rows); the caller guarantees k ≤ the number of valid rows overall.
      num_valid: number of real rows across the whole (global) table; None means all rows of
        this table are real.
      id_offset: global id of `table[0]` (shard index × rows per shard).
      use_approx: use `jax.lax.approx_max_k` (TPU's fast partial reduction; exact on CPU/GPU).
      recall_target: recall target passed to `approx_max_k`.
      chunk_rows: if set, score the table in chunks of this many rows with a running top-k, so
        the `[B, M]` score matrix never exists at once (M must be a multiple of it).

    Returns:
      `(ids [B, k'] int32, scores [B, k'] float32)` with k' = min(k, M), best first; padding
      rows carry score −inf.
    """
    m = table.shape[0]
    k_local = min(k, m)
    if chunk_rows is None or chunk_rows >= m:
        scores = _score_rows(table, queries)  # [B, M]
        ids = id_offset + jnp.arange(m, dtype=jnp.int32)  # [M]
        if num_valid is not None:
            scores = jnp.where(ids[None, :] < num_valid, scores, -jnp.inf)
        ids = jnp.broadcast_to(ids, scores.shape)
        top_scores, top_ids = _merge_top_k(
            scores, ids, k_local, use_approx=use_approx, recall_target=recall_target
        )
        return top_ids, top_scores
    if m % chunk_rows:
        raise ValueError(f"table rows {m} are not a multiple of chunk_rows={chunk_rows}")
    chunks = table.reshape(m // chunk_rows, chunk_rows, table.shape[1])  # [C, chunk, d]
    starts = jnp.arange(m // chunk_rows, dtype=jnp.int32) * chunk_rows  # [C]
    kw = dict(num_valid=num_valid, use_approx=use_approx, recall_target=recall_target)

    def step(carry, xs):
        best_ids, best_scores = carry  # [B, k'] each
        rows, start = xs
        ids, scores = exact_search(rows, queries, k_local, id_offset=id_offset + start, **kw)
        # Carry first: on exact ties top_k keeps the earlier position, i.e. the lower id,
        # matching a stable argsort over the whole table.
        top_scores, top_ids = _merge_top_k(
            jnp.concatenate([best_scores, scores], axis=1),
            jnp.concatenate([best_ids, ids], axis=1),
            k_local, use_approx=False, recall_target=recall_target,
        )
        return (top_ids, top_scores), None

    # The first chunk seeds the carry (derived from the table, so inside shard_map it has the
    # table's per-device type); if a chunk holds fewer than k' rows, −inf fillers with an
    # out-of-range id pad it and lose to every real row.
    ids0, scores0 = exact_search(chunks[0], queries, k_local, id_offset=id_offset, **kw)
    missing = k_local - ids0.shape[1]
    if missing:
        b = queries.shape[0]
        fill_ids = jnp.full((b, missing), jnp.iinfo(jnp.int32).max, jnp.int32)
        fill_scores = jnp.full((b, missing), -jnp.inf, jnp.float32)
        ids0 = jnp.concatenate([ids0, fill_ids], axis=1)
        scores0 = jnp.concatenate([scores0, fill_scores], axis=1)
    (top_ids, top_scores), _ = jax.lax.scan(step, (ids0, scores0), (chunks[1:], starts[1:]))
    return top_ids, top_scores


def blocks_mesh_axes(rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES) -> tuple:
    """The mesh axes the logical `blocks` axis maps to, as a tuple (empty = replicated)."""
    axes = nn.logical_to_mesh_axes(("blocks", None), rules)[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def block_shards(mesh: Mesh, rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES
                 ) -> int:
    """How many shards the table's rows are split into (the `blocks` axes' devices)."""
    return math.prod(mesh.shape[a] for a in blocks_mesh_axes(rules))


def padded_rows(n: int, mesh: Mesh, rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES,
                chunk_rows: int | None = None) -> int:
    """N_padded: n rows rounded up to equal shards over the `blocks` axes (and, per shard, to
    a multiple of `chunk_rows` when a shard holds more than that)."""
    num_shards = block_shards(mesh, rules)
    rows_per_shard = -(-n // num_shards)
    if chunk_rows is not None and chunk_rows < rows_per_shard:
        rows_per_shard = -(-rows_per_shard // chunk_rows) * chunk_rows
    return num_shards * rows_per_shard


def table_dtype(name: str) -> Any:
    """The device dtype of a table stored as `name` ("float32" or "bfloat16")."""
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def table_sharding(
    mesh: Mesh, rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES
) -> NamedSharding:
    """`NamedSharding` of the `[N, d]` table: rows over the `blocks` mesh axes (one rules table)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("blocks", None), rules))


def _row_shards(table: jax.Array, mesh: Mesh, rules: Sequence[tuple[str, Any]]
                ) -> tuple[tuple[str, ...], int]:
    """(the mesh axes the table's rows are split over, rows per shard); the rows must split
    evenly (`ExactIndex.build` pads them so)."""
    axes, num_shards = blocks_mesh_axes(rules), block_shards(mesh, rules)
    if table.shape[0] % num_shards:
        raise ValueError(
            f"table rows {table.shape[0]} do not divide into {num_shards} shards over {axes}"
        )
    return axes, table.shape[0] // num_shards


def sharded_exact_search(
    table: jax.Array,
    queries: jax.Array,
    k: int,
    *,
    mesh: Mesh,
    num_valid: int,
    rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES,
    use_approx: bool = False,
    recall_target: float = 0.95,
    chunk_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Global top-k over a table sharded along `blocks`: local top-k per device, then a merge.

    Pure and jit-friendly (the train step will call it). Each device sees all queries (they are
    replicated into the shard_map) and only its own rows; the `[B, devices × k]` candidates are
    all-gathered and reduced to `[B, k]` on every device.

    Args:
      table: `[N_padded, d]`, N_padded divisible by the number of `blocks` shards.
      queries: `[B, d]`.
      k: static; 1 ≤ k ≤ num_valid (not checked here).
      mesh: the device mesh the table is laid out on.
      num_valid: real rows; ids ≥ num_valid are padding and score −inf.
      rules: logical axis rules; `blocks` names the mesh axes the rows are split over.
      use_approx, recall_target, chunk_rows: see `exact_search`.

    Returns:
      `(ids [B, k] int32, scores [B, k] float32)`, best first, replicated over the mesh.
    """
    axes, rows_per_shard = _row_shards(table, mesh, rules)
    kw = dict(use_approx=use_approx, recall_target=recall_target, chunk_rows=chunk_rows)
    if not axes:
        ids, scores = exact_search(table, queries, k, num_valid=num_valid, **kw)
        return ids, scores

    def local(table_shard, q):  # [rows_per_shard, d], [B, d]
        offset = jax.lax.axis_index(axes) * rows_per_shard
        ids, scores = exact_search(
            table_shard, q, k, num_valid=num_valid, id_offset=offset, **kw
        )  # [B, min(k, rows_per_shard)]
        # Tiled in shard order, so lower devices (lower ids) come first and win exact ties.
        all_ids = jax.lax.all_gather(ids, axes, axis=1, tiled=True, to="invarying")
        all_scores = jax.lax.all_gather(scores, axes, axis=1, tiled=True, to="invarying")
        top_scores, top_ids = _merge_top_k(
            all_scores, all_ids, k, use_approx=False, recall_target=recall_target
        )
        return top_ids, top_scores

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(axes, None), PartitionSpec()),
        out_specs=(PartitionSpec(), PartitionSpec()),
    )(table, queries)


def sharded_gather_rows(
    table: jax.Array,
    ids: jax.Array,
    *,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES,
) -> jax.Array:
    """Rows `ids` of a table sharded along `blocks`, without gathering the table.

    Why not `table[ids]`: that leaves the layout to the SPMD partitioner, which today (jax
    0.10, checked on CPU) also gathers locally and all-reduces, but an all-gather of the
    operand would be as valid to it, and for the paper's 13M × 128 index that is 6.6 GB on
    every device. Here it is explicit: each device looks up the ids that fall in its own rows
    (zeros for the rest) and one psum of the `[..., d]` result adds the shards' disjoint
    contributions. ORQA's train step reads its S retrieved blocks' embeddings this way from
    the frozen table already on the devices.

    Args:
      table: `[N_padded, d]`, N_padded divisible by the number of `blocks` shards.
      ids: int `[...]`; an id outside `[0, N_padded)` (e.g. −1 padding) gives a zero row.
      mesh, rules: the table's layout, as for `sharded_exact_search`.

    Returns:
      `[..., d]` in the table's dtype, replicated over the mesh.
    """
    axes, rows_per_shard = _row_shards(table, mesh, rules)

    def local(table_shard, ids):  # [rows_per_shard, d], [...]
        offset = jax.lax.axis_index(axes) * rows_per_shard if axes else 0
        local_ids = ids - offset
        mine = (local_ids >= 0) & (local_ids < rows_per_shard)
        rows = jnp.take(table_shard, jnp.where(mine, local_ids, 0), axis=0)  # [..., d]
        rows = jnp.where(mine[..., None], rows, jnp.zeros((), rows.dtype))
        return jax.lax.psum(rows, axes) if axes else rows

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(axes or None, None), PartitionSpec()),
        out_specs=PartitionSpec(),
    )(table, ids)


# ----------------------------------------------------------------------------- host index


def check_queries(queries: Any, dim: int) -> jax.Array | np.ndarray:
    """Validate queries on the host: `[d]` becomes `[1, d]`; shape and finiteness checked.

    A single vector is accepted (as a batch of one) because interactive callers
    (`Realm.retrieve(question)`) embed one question at a time; results stay `[1, k]`.
    Non-jax inputs come back as float32 numpy; jax arrays stay on device (only a `[B]`
    finiteness mask is synced to the host).

    Raises:
      ValueError: wrong rank, wrong dimension, empty batch, or NaN/Inf in any query.
    """
    if not isinstance(queries, jax.Array):
        queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2:
        raise ValueError(f"queries must be [batch, {dim}] or [{dim}], got shape {queries.shape}")
    if queries.shape[1] != dim:
        raise ValueError(
            f"query dimension {queries.shape[1]} does not match the index dimension {dim}"
        )
    if queries.shape[0] == 0:
        raise ValueError("queries are empty (batch size 0)")
    finite = jnp.isfinite(queries).all(axis=1) if isinstance(queries, jax.Array) else (
        np.isfinite(queries).all(axis=1))
    finite = np.asarray(finite)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{bad.size} of {queries.shape[0]} queries contain NaN or Inf (first rows: "
            f"{bad[:5].tolist()})"
        )
    return queries


def check_k(k: Any, num_rows: int) -> int:
    """k must be an int in [1, N]: more results than rows would have to include padding."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 1 <= k <= num_rows:
        raise ValueError(f"k={k} must be between 1 and the index size N={num_rows}")
    return int(k)


def check_table(table: Any) -> np.ndarray:
    """A host table must be a non-empty finite `[N, d]` array; returned as float32 numpy."""
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"table must be a non-empty [N, d] array, got shape {table.shape}")
    table = table.astype(np.float32, copy=False)
    finite = np.isfinite(table).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"table has {bad.size} rows with NaN or Inf (first rows: {bad[:5].tolist()})"
        )
    return table


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare device arrays
class ExactIndex:
    """Exact MIPS over a device-resident table sharded along `blocks` on all mesh devices.

    Build with `ExactIndex.build`; `search` is jitted once per (batch, k) shape.

    Attributes:
      table: `[N_padded, d]` device array, sharded `P(blocks_axes, None)`.
      num_valid: N, the number of real rows.
      mesh: the mesh the table lives on.
      rules: logical axis rules (the `blocks` entry decides the row sharding).
      use_approx: local top-k via `jax.lax.approx_max_k`.
      recall_target: its recall target.
      chunk_rows: rows scored at once per device (None = the whole shard).
    """

    table: jax.Array
    num_valid: int
    mesh: Mesh
    rules: tuple[tuple[str, Any], ...] = sharding_lib.DEFAULT_RULES
    use_approx: bool = False
    recall_target: float = 0.95
    chunk_rows: int | None = None

    @classmethod
    def build(
        cls,
        table: np.ndarray,
        mesh: Mesh,
        *,
        dtype: str = "float32",
        use_approx: bool = False,
        recall_target: float = 0.95,
        chunk_rows: int | None = None,
        rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES,
    ) -> ExactIndex:
        """Pad a host `[N, d]` table and place it row-sharded on `mesh`.

        Args:
          table: `[N, d]` host embeddings (any float dtype; must be finite).
          mesh: devices to spread the rows over (the `blocks` rule picks the mesh axes).
          dtype: "float32" or "bfloat16" storage on device; scores are float32 either way.
          use_approx: use `jax.lax.approx_max_k` for the per-device top-k.
          recall_target: recall target for `approx_max_k`, in (0, 1].
          chunk_rows: score each shard in chunks of this many rows (bounds the `[B, rows]`
            score buffer on a big shard); rows per shard are padded to a multiple of it.
          rules: logical axis rules.

        Returns:
          The index, with the table on device.
        """
        device_dtype = table_dtype(dtype)  # refuses an unknown one before any work
        if not 0.0 < recall_target <= 1.0:
            raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive or None, got {chunk_rows}")
        host = check_table(table)
        n, d = host.shape
        rules = tuple(rules)
        padded = np.zeros((padded_rows(n, mesh, rules, chunk_rows), d), np.float32)
        padded[:n] = host
        # Cast on the host so a bf16 table never exists as f32 on device. On a pod every host
        # holds the whole table and each device copies only its rows (`put_global`; device_put
        # would first all-gather the table to check the hosts agree).
        placed = multihost.put_global(padded.astype(device_dtype), table_sharding(mesh, rules))
        return cls(placed, n, mesh, rules, use_approx, recall_target, chunk_rows)

    @property
    def size(self) -> int:
        """N, the number of searchable rows (padding excluded)."""
        return self.num_valid

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def num_shards(self) -> int:
        return block_shards(self.mesh, self.rules)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k for each query.

        Args:
          queries: `[B, d]` (numpy or jax array); a single `[d]` vector is treated as `[1, d]`
            (the result is still `[1, k]`, so callers never branch on rank).
          k: results per query, 1 ≤ k ≤ N.

        Returns:
          `(ids [B, k] int32, scores [B, k] float32)` as numpy, best first; ids index the
          original table rows, scores are the float32-accumulated dot products.

        Raises:
          ValueError: k out of range, wrong query dimension, or non-finite queries.
        """
        k = check_k(k, self.num_valid)
        queries = check_queries(queries, self.dim)
        ids, scores = _search_jit(
            self.table, jnp.asarray(queries, jnp.float32), k, self.mesh, self.num_valid,
            self.rules, self.use_approx, self.recall_target, self.chunk_rows,
        )
        return np.asarray(ids), np.asarray(scores)


def _search_impl(table, queries, k, mesh, num_valid, rules, use_approx, recall_target,
                 chunk_rows):
    return sharded_exact_search(
        table, queries, k, mesh=mesh, num_valid=num_valid, rules=rules,
        use_approx=use_approx, recall_target=recall_target, chunk_rows=chunk_rows,
    )


# One module-level jit: its cache is keyed on shapes and the static settings, so every index
# with the same layout shares compiled code and a search retraces only for a new (B, k).
_search_jit = jax.jit(_search_impl, static_argnums=(2, 3, 4, 5, 6, 7, 8))
