"""Model switches: dropout only when training, remat is exact, bf16 tracks f32, bad shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.models import BertConfig, Embedder, KnowledgeAugEncoder, RealmModelConfig, SpanReader

CFG = RealmModelConfig(bert=BertConfig.preset("tiny", num_layers=2), proj_size=16,
                       span_hidden_size=8, max_span_width=3)
IDS = np.random.default_rng(0).integers(3, 128, size=(4, 10)).astype(np.int32)


def _init(module, *args):
    return module.init(jax.random.key(0), *args)["params"]


def test_dropout_only_in_training():
    emb = Embedder(CFG)
    p = {"params": _init(emb, IDS)}
    a, b = emb.apply(p, IDS), emb.apply(p, IDS)
    np.testing.assert_array_equal(a, b)
    t1 = emb.apply(p, IDS, deterministic=False, rngs={"dropout": jax.random.key(1)})
    t2 = emb.apply(p, IDS, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(t1 - t2)).max() > 1e-3
    assert np.abs(np.asarray(t1 - a)).max() > 1e-3


def test_remat_gives_the_same_gradients():
    cfg_r = dataclasses.replace(CFG, bert=dataclasses.replace(CFG.bert, remat=True))
    params = _init(KnowledgeAugEncoder(CFG), IDS[:, None])

    def grads(cfg):
        f = lambda p: jnp.sum(KnowledgeAugEncoder(cfg).apply({"params": p}, IDS[:, None]) ** 2)  # noqa: E731
        return jax.grad(f)(params)

    for g, h in zip(jax.tree.leaves(grads(CFG)), jax.tree.leaves(grads(cfg_r)), strict=True):
        np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_tracks_float32():
    cfg_bf = dataclasses.replace(CFG, bert=dataclasses.replace(CFG.bert, dtype="bfloat16"))
    params = _init(Embedder(CFG), IDS)
    f32 = Embedder(CFG).apply({"params": params}, IDS)
    bf16 = Embedder(cfg_bf).apply({"params": params}, IDS)
    assert bf16.dtype == jnp.float32  # embeddings leave the tower in float32 for the index
    cos = jnp.sum(f32 * bf16, -1) / (jnp.linalg.norm(f32, axis=-1) * jnp.linalg.norm(bf16, axis=-1))
    assert float(cos.min()) > 0.99
    assert np.abs(np.asarray(f32 - bf16)).max() > 0  # it really ran in bfloat16


def test_too_long_inputs_are_refused():
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        _init(Embedder(CFG), np.zeros((1, 129), np.int32))
    with pytest.raises(ValueError, match="max_span_width=3"):
        _init(SpanReader(CFG), IDS[:, :2], None, None, IDS[:, :2])


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        BertConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="unknown BERT preset"):
        BertConfig.preset("bert_huge")
