"""Device mesh, logical→mesh axis rules, born-sharded init and sharded jit.

Every parameter and large activation carries logical axis names (realm_jax.models.bert);
one rules table maps them onto the mesh axes ('data', 'fsdp', 'model'). Parameters are
created directly in their sharded layout (`jax.eval_shape` → `NamedSharding` →
`jax.jit(init, out_shardings=…)`), so no host ever materialises a full BERT-large copy.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# Logical axis → mesh axes. Batch-like axes split over data and fsdp; parameters shard
# their `embed` dim over fsdp (ZeRO-3 style) and their heads / mlp / vocab dims over model
# (tensor parallel). The `blocks` axis of the [num_blocks, dim] index spreads over all devices.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("candidates", None),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("proj", None),
    ("blocks", ("data", "fsdp", "model")),
)

PyTree = Any


def make_mesh(
    axes: Mapping[str, int] | Sequence[tuple[str, int]] = (("data", -1),),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over all (or the given) devices; one axis size may be −1 (fills the rest).

    Axes missing from `axes` get size 1, so the mesh always has ('data', 'fsdp', 'model')
    and the one rules table applies to every config. Device order is `jax.devices()`'s,
    the same on every host, which multi-host collectives require.
    """
    sizes = dict(axes)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; accepted: {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    named = dict(zip(MESH_AXES, shape, strict=True))
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {named}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices, "
            f"{len(devices)} available"
        )
    return Mesh(
        np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3
    )


def _mesh_axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_sharding(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> NamedSharding:
    """One array's NamedSharding; a dim that does not divide its mesh axes is replicated.

    Replicating instead of failing lets tiny test models and odd vocab sizes run on any mesh;
    the loss of sharding is logged because it costs memory on a real pod.
    """
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    fixed = []
    for dim, (size, axes) in enumerate(zip(shape, spec, strict=True)):
        n = _mesh_axis_size(mesh, axes)
        if axes is not None and size % n:
            logging.info("dim %d (%s) of size %d not divisible by %s=%d: replicated",
                         dim, names[dim], size, axes, n)
            axes = None
        fixed.append(axes)
    return NamedSharding(mesh, PartitionSpec(*fixed))


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def param_shardings(abstract_boxed: PyTree, mesh: Mesh, rules=DEFAULT_RULES) -> PyTree:
    """Shardings for an (abstract) boxed variable tree from `module.init`, as an unboxed tree.

    Leaves without logical names (e.g. a raw `self.param`) are replicated.
    """
    def one(x):
        if _is_partitioned(x):
            return logical_to_sharding(x.names, x.value.shape, mesh, rules)
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, abstract_boxed, is_leaf=_is_partitioned)


def init_sharded(
    module: nn.Module,
    rng: jax.Array,
    *example_args: Any,
    mesh: Mesh,
    rules=DEFAULT_RULES,
    **example_kwargs: Any,
) -> tuple[PyTree, PyTree]:
    """Born-sharded `module.init(rng, *example_args)["params"]` → (params, shardings).

    Each device computes only its own shard of every parameter.
    """
    def init(r):
        return module.init(r, *example_args, **example_kwargs)["params"]

    abstract = jax.eval_shape(init, rng)
    shardings = param_shardings(abstract, mesh, rules)
    with activate(mesh, rules):
        params = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return params, shardings


def abstract_params(module: nn.Module, *example_args: Any, **example_kwargs: Any) -> PyTree:
    """Parameter ShapeDtypeStructs with their logical names (boxed), without allocating."""
    return jax.eval_shape(
        lambda r: module.init(r, *example_args, **example_kwargs)["params"], jax.random.key(0)
    )


def shard_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """Place host arrays (e.g. imported weights) onto devices in the given layout."""
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading dim over the batch axes, the rest replicated: the layout of input batches."""
    axes = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, axes)


def mesh_batch_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the `batch` axis is split: global batches must be a multiple of it."""
    return _mesh_axis_size(mesh, nn.logical_to_mesh_axes(("batch",), rules)[0])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Make `mesh` and `rules` current, so `nn.with_logical_constraint` inside models binds."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def jit_sharded(
    fn: Callable,
    mesh: Mesh,
    rules=DEFAULT_RULES,
    *,
    in_shardings: Any = None,
    out_shardings: Any = None,
    donate_argnums: int | Sequence[int] = (),
    static_argnums: int | Sequence[int] = (),
) -> Callable:
    """`jax.jit` with explicit shardings whose tracing sees the mesh and the rules.

    The returned callable enters `activate(mesh, rules)` around each call, because the model's
    activation constraints are resolved when the function is traced (on its first call).
    """
    kw: dict[str, Any] = dict(donate_argnums=donate_argnums, static_argnums=static_argnums)
    if in_shardings is not None:
        kw["in_shardings"] = in_shardings
    if out_shardings is not None:
        kw["out_shardings"] = out_shardings
    jitted = jax.jit(fn, **kw)

    def call(*args, **kwargs):
        with activate(mesh, rules):
            return jitted(*args, **kwargs)

    call.jitted = jitted  # for .lower(...) / AOT compilation
    return call
