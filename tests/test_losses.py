"""Loss maths against brute-force numpy (float64), for random shapes (hypothesis)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realm_jax.models.losses import (
    marginal_log_likelihood_loss,
    marginal_mlm_loss,
    orqa_loss,
)


def np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def brute_force_mlm(logits, labels, weights, retrieval, variant):
    """Sum over candidates z explicitly, one example and one token at a time."""
    logits, retrieval = logits.astype(np.float64), retrieval.astype(np.float64)
    b, k, m, _ = logits.shape
    total, count = 0.0, weights.sum()
    for i in range(b):
        p_z = np.exp(np_log_softmax(retrieval[i]))
        p_tok = np.exp(np_log_softmax(logits[i]))  # [K, M, V]
        if variant == "per_token":
            for j in range(m):
                if weights[i, j]:
                    total += np.log(sum(p_z[z] * p_tok[z, j, labels[i, j]] for z in range(k)))
        else:
            seq = [np.prod([p_tok[z, j, labels[i, j]] for j in range(m) if weights[i, j]])
                   for z in range(k)]
            total += np.log(sum(p_z[z] * seq[z] for z in range(k)))
    return -total / max(count, 1)


def numeric_grad(f, x, eps=1e-5):
    g = np.zeros_like(x)
    for idx in itertools.product(*map(range, x.shape)):
        d = np.zeros_like(x)
        d[idx] = eps
        g[idx] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


@st.composite
def mlm_case(draw):
    # Each dim 1 (its edge case) or larger: few shapes, so op-by-op jax compiles few programs.
    b, k, m, v = (draw(st.sampled_from((1, n))) for n in (3, 4, 4, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(b, k, m, v)).astype(np.float32)
    labels = rng.integers(0, v, size=(b, m)).astype(np.int32)
    weights = (rng.random((b, m)) < 0.7).astype(np.float32)
    weights[0, 0] = 1.0  # at least one real masked token
    retrieval = rng.normal(scale=2.0, size=(b, k)).astype(np.float32)
    return logits, labels, weights, retrieval


@pytest.mark.parametrize("variant", ["per_token", "per_sequence"])
@settings(max_examples=25, deadline=None)
@given(case=mlm_case())
def test_marginal_mlm_loss_equals_brute_force(variant, case):
    logits, labels, weights, retrieval = case
    loss, _ = marginal_mlm_loss(logits, labels, weights, retrieval, variant=variant)
    want = brute_force_mlm(logits, labels, weights, retrieval, variant)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["per_token", "per_sequence"])
def test_marginal_mlm_gradient_equals_numeric(variant):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 2, 4))
    labels = rng.integers(0, 4, size=(2, 2)).astype(np.int32)
    weights = np.array([[1.0, 1.0], [1.0, 0.0]])
    retrieval = rng.normal(size=(2, 3))
    f = lambda lg, rt: marginal_mlm_loss(lg, labels, weights, rt, variant)[0]  # noqa: E731
    g_logits, g_retr = jax.grad(f, argnums=(0, 1))(
        jnp.asarray(logits, jnp.float32), jnp.asarray(retrieval, jnp.float32))
    want_logits = numeric_grad(
        lambda x: brute_force_mlm(x, labels, weights, retrieval, variant), logits)
    want_retr = numeric_grad(
        lambda x: brute_force_mlm(logits, labels, weights, x, variant), retrieval)
    np.testing.assert_allclose(np.asarray(g_logits), want_logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_retr), want_retr, atol=1e-5)
    assert np.abs(want_retr).max() > 1e-3  # the retriever does get a gradient


@pytest.mark.parametrize("variant", ["per_token", "per_sequence"])
def test_certain_retrieval_reduces_to_mlm_cross_entropy(variant):
    """With one candidate of probability 1 the marginal is ordinary MLM cross-entropy."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(3, 5)).astype(np.int32)
    weights = np.ones((3, 5), np.float32)
    weights[1, 3:] = 0
    retrieval = np.full((3, 4), -1e9, np.float32)
    retrieval[:, 2] = 0.0  # candidate 2 certain
    loss, aux = marginal_mlm_loss(logits, labels, weights, retrieval, variant)
    logp = np_log_softmax(logits[:, 2].astype(np.float64))
    ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (ce * weights).sum() / weights.sum(), rtol=1e-5)
    pred = logits[:, 2].argmax(-1)
    np.testing.assert_allclose(float(aux["accuracy"]),
                               ((pred == labels) * weights).sum() / weights.sum(), rtol=1e-6)


def test_retrieval_utility_sign():
    """Utility > 0 when a retrieved block predicts the tokens better than the null document."""
    v = 5
    labels = np.array([[1, 2]], np.int32)
    good = np.full((2, v), -5.0)
    good[[0, 1], [1, 2]] = 5.0  # confident and right
    logits = np.stack([np.zeros((2, v)), good])[None].astype(np.float32)  # null doc is uniform
    _, aux = marginal_mlm_loss(logits, labels, np.ones((1, 2)), np.zeros((1, 2), np.float32))
    assert float(aux["retrieval_utility"][0]) > 0.5
    logits_bad = logits[:, ::-1]  # the informative block is now the null document
    _, aux = marginal_mlm_loss(logits_bad, labels, np.ones((1, 2)), np.zeros((1, 2), np.float32))
    assert float(aux["retrieval_utility"][0]) < 0


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="per_token"):
        marginal_mlm_loss(np.zeros((1, 1, 1, 2)), np.zeros((1, 1), np.int32), np.ones((1, 1)),
                          np.zeros((1, 1)), variant="paper")


def brute_force_mll(logits, correct):
    p = np.exp(np_log_softmax(logits.astype(np.float64)))
    return -np.log(p[correct].sum()) if correct.any() else 0.0


def test_marginal_log_likelihood_and_orqa_loss():
    rng = np.random.default_rng(2)
    b, s, r, c = 3, 6, 2, 5
    retr = rng.normal(size=(b, s)).astype(np.float32)
    retr_ok = rng.random((b, s)) < 0.3
    retr_ok[0] = False  # no answer-bearing block for question 0
    joint = rng.normal(size=(b, r, c)).astype(np.float32)
    span_ok = rng.random((b, r, c)) < 0.2
    span_ok[1] = False  # no correct span for question 1
    loss, aux = orqa_loss(retr, retr_ok, joint, span_ok)
    want_retr = [brute_force_mll(retr[i], retr_ok[i]) for i in range(b)]
    want_read = [brute_force_mll(joint[i].ravel(), span_ok[i].ravel()) for i in range(b)]
    np.testing.assert_allclose(np.asarray(aux["retriever_loss"]), want_retr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["reader_loss"]), want_read, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), np.mean(np.add(want_retr, want_read)), rtol=1e-5)
    assert float(aux["retriever_loss"][0]) == 0.0 and float(aux["reader_loss"][1]) == 0.0


def test_no_correct_candidate_gives_zero_loss_and_finite_gradient():
    logits = jnp.asarray([[1.0, -2.0, 0.5]])
    g = jax.grad(lambda x: marginal_log_likelihood_loss(x, jnp.zeros((1, 3), bool)).sum())(logits)
    assert np.all(np.asarray(g) == 0.0)
    g = jax.grad(lambda x: marginal_log_likelihood_loss(
        x, jnp.asarray([[False, True, False]])).sum())(logits)
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0.1
