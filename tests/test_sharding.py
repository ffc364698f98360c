"""Sharded (mesh data=2, fsdp=2, model=2 over 8 emulated devices) == single device."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import sharding
from realm_jax.models import BertConfig, Embedder, KnowledgeAugEncoder, RealmModelConfig, SpanReader
from realm_jax.models.losses import marginal_mlm_loss

CFG = RealmModelConfig(
    bert=BertConfig.preset("tiny", num_layers=2), proj_size=16, span_hidden_size=8,
    max_span_width=3,
)
B, K, L = 4, 2, 12


def tower_case(name: str, rng: np.random.Generator):
    """(module, positional inputs) for each tower, batch first."""
    ids = rng.integers(3, CFG.bert.vocab_size, size=(B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[:, -3:] = 0  # some padding
    types = np.zeros((B, L), np.int32)
    types[:, 5:] = 1
    if name == "embedder":
        return Embedder(CFG), (ids, mask, types)
    if name == "encoder":
        cand = rng.integers(3, CFG.bert.vocab_size, size=(B, K, L)).astype(np.int32)
        positions = np.tile(np.array([[1, 2, 4]], np.int32), (B, 1))
        return KnowledgeAugEncoder(CFG), (cand, np.ones_like(cand), np.zeros_like(cand), positions)
    if name == "reader":
        block_mask = (types == 1) & (mask == 1)
        return SpanReader(CFG), (ids, mask, types, block_mask.astype(np.int32))
    raise ValueError(name)


def forward_and_grad(module):
    """A scalar of the outputs (fixed random weights) so every output element gets a gradient."""
    def fn(params, *inputs):
        def scalar(p):
            out = module.apply({"params": p}, *inputs)
            w = jax.random.normal(jax.random.key(7), out.shape)
            return jnp.mean(jnp.where(out > -1e30, out, 0.0) * w), out
        (_, out), grads = jax.value_and_grad(scalar, has_aux=True)(params)
        return out, grads
    return fn


@pytest.mark.parametrize("tower", ["embedder", "encoder", "reader"])
def test_sharded_equals_single_device(tower, eight_devices):
    module, inputs = tower_case(tower, np.random.default_rng(0))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    params, shardings = sharding.init_sharded(module, jax.random.key(0), *inputs, mesh=mesh)

    # Born sharded: the big matrices really are split across devices.
    word = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert word.sharding.spec == PartitionSpec("model", "fsdp")
    assert len(word.addressable_shards) == 8
    assert word.addressable_shards[0].data.shape == (CFG.bert.vocab_size // 2,
                                                     CFG.bert.hidden_size // 2)

    fn = forward_and_grad(module)
    data_sh = tuple(sharding.batch_sharding(mesh, x.ndim) for x in inputs)
    sharded = sharding.jit_sharded(
        fn, mesh, in_shardings=(shardings, *data_sh), out_shardings=(None, shardings)
    )
    out_s, grads_s = sharded(params, *inputs)
    assert grads_s["bert"]["layer_0"]["intermediate"]["kernel"].sharding.spec == PartitionSpec(
        "fsdp", "model"
    )

    host_params = jax.device_get(params)
    out_1, grads_1 = jax.jit(fn)(jax.device_put(host_params, jax.devices()[0]), *inputs)
    assert len(out_1.devices()) == 1

    # 1e-5 absolute, or relative for large entries: the sharded program sums in another order.
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_1), atol=1e-5, rtol=1e-5)
    flat_s = jax.tree_util.tree_leaves_with_path(jax.device_get(grads_s))
    flat_1 = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(grads_1)))
    assert len(flat_s) == len(flat_1)
    for path, g in flat_s:
        np.testing.assert_allclose(g, flat_1[path], atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    assert max(np.abs(g).max() for _, g in flat_s) > 1e-2  # gradients are not all zero


def test_jitted_step_traces_once(eight_devices):
    """chex.assert_max_traces catches a recompiling step (and does not fire without one)."""
    module, inputs = tower_case("encoder", np.random.default_rng(1))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    params, shardings = sharding.init_sharded(module, jax.random.key(0), *inputs, mesh=mesh)

    @chex.assert_max_traces(n=1)
    def loss_step(p, ids, labels, relevance):
        logits = module.apply({"params": p}, ids, None, None, inputs[3])
        return jax.value_and_grad(
            lambda q: marginal_mlm_loss(
                module.apply({"params": q}, ids, None, None, inputs[3]), labels,
                jnp.ones_like(labels), relevance)[0]
        )(p), logits.shape

    step = sharding.jit_sharded(lambda *a: loss_step(*a)[0], mesh)
    rng = np.random.default_rng(2)
    for _ in range(3):  # new values, same shapes: one trace
        ids = rng.integers(3, CFG.bert.vocab_size, size=(B, K, L)).astype(np.int32)
        labels = rng.integers(3, CFG.bert.vocab_size, size=(B, 3)).astype(np.int32)
        (loss, _), = [step(params, ids, labels, rng.normal(size=(B, K)).astype(np.float32))]
        assert np.isfinite(float(loss))
    with pytest.raises(AssertionError):  # a new shape retraces and is caught
        step(params, ids[:, :, :-1], labels, np.zeros((B, K), np.float32))
    chex.clear_trace_counter()


def test_make_mesh_fills_and_validates(eight_devices):
    mesh = sharding.make_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh({"data": 3, "model": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"tensor": 2})


def test_indivisible_dims_are_replicated(eight_devices):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    s = sharding.logical_to_sharding(("vocab", "embed"), (99, 32), mesh)
    assert s.spec == PartitionSpec(None, "fsdp")
    s = sharding.logical_to_sharding(("vocab", "embed"), (100, 32), mesh)
    assert s.spec == PartitionSpec("model", "fsdp")


def test_activation_constraints_bind_under_mesh(eight_devices):
    """Inside jit_sharded, the model's logical constraints resolve to mesh shardings."""
    mesh = sharding.make_mesh({"data": 4, "model": 2})

    def probe(x):
        return nn.with_logical_constraint(x * 2, ("batch", "mlp"))

    out = sharding.jit_sharded(probe, mesh)(jnp.ones((8, 4)))
    want = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "model"))
    assert out.sharding.is_equivalent_to(want, 2)
    # Outside the mesh context the same function is left unconstrained (one device).
    assert len(jax.jit(probe)(jnp.ones((8, 4))).devices()) == 1
