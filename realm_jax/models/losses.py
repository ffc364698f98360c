"""REALM and ORQA marginal losses: pure functions of logits, no parameters.

Shapes: B = batch, K = retrieved candidates (null document first), M = masked positions,
V = vocabulary, S = searcher beam, R = reader beam, C = span candidates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from realm_jax.models.reader import mask_to_score

Array = jax.Array

MLM_VARIANTS = ("per_token", "per_sequence")


def token_log_probs(mlm_logits: Array, labels: Array) -> Array:
    """log p(y_j | z, x): logits [B, K, M, V], labels [B, M] → [B, K, M]."""
    logp = jax.nn.log_softmax(mlm_logits.astype(jnp.float32), axis=-1)
    labels = jnp.broadcast_to(labels[:, None, :], logp.shape[:-1])
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def marginal_mlm_loss(
    mlm_logits: Array,
    labels: Array,
    label_weights: Array,
    retrieval_logits: Array,
    variant: str = "per_token",
) -> tuple[Array, dict[str, Array]]:
    """REALM's loss −log Σ_z p(z|x) p(y|z,x), averaged per masked token.

    Args:
      mlm_logits: [B, K, M, V] MLM logits for each candidate's joined input.
      labels: [B, M] target token ids (any id where `label_weights` is 0).
      label_weights: [B, M] 1 for real masked tokens, 0 for padding.
      retrieval_logits: [B, K] relevance scores f(x, z); p(z|x) is their softmax over K.
      variant: "per_token" (released code: marginalise each masked token separately,
        log p(y_j|x) = logsumexp_z [log p(z|x) + log p(y_j|z,x)]) or "per_sequence" (the
        paper's text: p(y|z,x) = Π_j p(y_j|z,x) inside the sum over z).

    Returns:
      (loss [], aux) with aux = {"log_p_y": [B] per-example mean log p(y_j|x) over masked
      tokens, "accuracy": [] MLM accuracy of the most likely candidate's argmax,
      "retrieval_utility": [B] log p(y|x) − log p(y|x, null doc) per masked token}.
    """
    if variant not in MLM_VARIANTS:
        raise ValueError(f"variant={variant!r}; accepted: {MLM_VARIANTS}")
    w = label_weights.astype(jnp.float32)
    n_tokens = jnp.maximum(jnp.sum(w, axis=-1), 1.0)  # [B]
    log_pz = jax.nn.log_softmax(retrieval_logits.astype(jnp.float32), axis=-1)  # [B, K]
    log_py_z = token_log_probs(mlm_logits, labels)  # [B, K, M]
    if variant == "per_token":
        marginal = jax.nn.logsumexp(log_pz[..., None] + log_py_z, axis=1)  # [B, M]
        log_p_y = jnp.sum(marginal * w, axis=-1)  # [B] Σ_j log p(y_j|x)
    else:
        seq_log_py_z = jnp.sum(log_py_z * w[:, None, :], axis=-1)  # [B, K]
        log_p_y = jax.nn.logsumexp(log_pz + seq_log_py_z, axis=-1)  # [B]
    loss = -jnp.sum(log_p_y) / jnp.maximum(jnp.sum(w), 1.0)
    # Utility of retrieval: how much better the marginal is than reading the null document
    # (candidate 0) alone. Positive means retrieved blocks help predict the masked tokens.
    log_p_null = jnp.sum(log_py_z[:, 0] * w, axis=-1)
    best = jnp.argmax(retrieval_logits, axis=-1)  # [B]
    pred = jnp.argmax(jnp.take_along_axis(mlm_logits, best[:, None, None, None], 1)[:, 0], -1)
    aux = {
        "log_p_y": log_p_y / n_tokens,
        "retrieval_utility": (log_p_y - log_p_null) / n_tokens,
        "accuracy": jnp.sum((pred == labels) * w) / jnp.maximum(jnp.sum(w), 1.0),
    }
    return loss, aux


def marginal_log_likelihood_loss(logits: Array, is_correct: Array) -> Array:
    """−log Σ_{correct} softmax(logits), zero where no candidate is correct.

    logits, is_correct: [..., N] → [...]. The wrong candidates are masked with a finite
    large negative (not −inf), so the gradient stays finite when nothing is correct.
    """
    logits = logits.astype(jnp.float32)
    log_num = jax.nn.logsumexp(logits + mask_to_score(is_correct), axis=-1)
    log_den = jax.nn.logsumexp(logits, axis=-1)
    any_correct = jnp.any(is_correct, axis=-1)
    return jnp.where(any_correct, log_den - log_num, 0.0)


def orqa_loss(
    retrieval_logits: Array,
    retrieval_correct: Array,
    joint_logits: Array,
    span_correct: Array,
) -> tuple[Array, dict[str, Array]]:
    """ORQA fine-tuning loss, batched over questions.

    Args:
      retrieval_logits: [B, S] scores of the searcher beam.
      retrieval_correct: [B, S] whether each block contains an answer string.
      joint_logits: [B, R, C] span logits + block logits (`reader.orqa_logits`) of the top R.
      span_correct: [B, R, C] whether each (block, span) is a gold answer.

    Returns:
      (mean over B of retriever + reader losses, aux with the per-question parts [B]).
    """
    retriever = marginal_log_likelihood_loss(retrieval_logits, retrieval_correct)
    b = joint_logits.shape[0]
    reader = marginal_log_likelihood_loss(joint_logits.reshape(b, -1), span_correct.reshape(b, -1))
    loss = jnp.mean(retriever + reader)
    return loss, {"retriever_loss": retriever, "reader_loss": reader}
