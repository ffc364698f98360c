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


def candidate_log_likelihood(mlm_logits: Array, labels: Array, label_weights: Array) -> Array:
    """log p(y|z,x) per candidate, the mean over the masked tokens: [B, K, M, V] → [B, K].

    How well the encoder predicts the masked tokens from each candidate block alone: the
    pdist teacher, and the held-out reading measure of `RealmMlm.evaluate`."""
    w = label_weights.astype(jnp.float32)
    per_cand = jnp.sum(token_log_probs(mlm_logits, labels) * w[:, None, :], -1)  # [B, K]
    return per_cand / jnp.maximum(jnp.sum(w, -1, keepdims=True), 1.0)


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


RETRIEVER_LOSSES = ("marginal", "pdist", "match")
SCORE_SCALES = ("none", "inv_sqrt_d")


def score_scale(kind: str, dim: int) -> float:
    """The factor on f(x, z) before the softmax over candidates.

    Why: 128-d LayerNorm'd embeddings have norm ≈ √128, so raw inner products span tens of
    nats and p(z|x) starts near one-hot: only the top candidate gets gradient, and a retriever
    that is wrong at step 0 stays wrong. "inv_sqrt_d" divides by √d (attention's scaling);
    a number (as a string, e.g. "0.2") multiplies by it; "none" is the released code.
    """
    if kind == "none":
        return 1.0
    if kind == "inv_sqrt_d":
        return 1.0 / float(dim) ** 0.5
    try:
        value = float(kind)
    except ValueError:
        raise ValueError(f"score_scale={kind!r}; accepted: {SCORE_SCALES} or a number") from None
    if not value > 0:
        raise ValueError(f"score_scale={kind!r} must be positive")
    return value


def inbatch_negative_scores(q: Array, z: Array, cand_block: Array, scale: float = 1.0
                            ) -> Array:
    """Each query's scores against the other rows' retrieved blocks, as extra negatives.

    Why: REALM's retriever losses see only a query's own K candidates, which after an ICT warm
    start are mostly blocks of one entity. Fitted to a teacher that tells them apart, nothing
    holds the rest of the corpus below them, and at a learning rate that moves the retriever
    within a CPU budget its question recall collapsed (measured: recall@5 0.99 → 0.25 in 20
    steps; README "REALM that learns"). The other rows' candidates are a free sample of that
    rest, as DPR's and ICT's in-batch negatives are.

    Args:
      q: [B, d] query embeddings.
      z: [B, K, d] the candidates' embeddings (null document first).
      cand_block: [B, K] their block ids (−1: the null document).
      scale: the retriever's score scale (`realm.score_scale`), applied before the mask.

    Returns:
      [B, B·K] scores; masked (the most negative float32) where the block is a null document,
      in the query's own row, or one of the query's own candidates (another row retrieved it
      too: it is not a negative).
    """
    b, k, _ = z.shape
    scores = jnp.einsum("bd,nkd->bnk", q, z) * scale  # [B, B, K]
    own = (cand_block[None, :, :, None] == cand_block[:, None, None, :]).any(-1)  # [B, B, K]
    other_row = ~jnp.eye(b, dtype=bool)[:, :, None]
    valid = (cand_block[None, :, :] >= 0) & other_row & ~own
    return (scores + mask_to_score(valid)).reshape(b, b * k)


def realm_loss(
    mlm_logits: Array,
    labels: Array,
    label_weights: Array,
    retrieval_logits: Array,
    variant: str = "per_token",
    retriever_loss: str = "marginal",
    teacher_temperature: float = 1.0,
    cand_match: Array | None = None,
    negatives: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """REALM pre-training loss with a choice of signal for the retriever.

    "marginal" (REALM): one loss, −log Σ_z p(z|x) p(y|z,x); the retriever's gradient is the
    posterior minus the prior, Σ_z [p(z|x,y) − p(z|x)] ∇f(x,z), so a candidate the retriever
    already ignores (p(z|x) ≈ 0) hardly moves, however much it helps the encoder.

    "pdist" (Atlas's perplexity distillation, Izacard et al. 2022): the encoder still takes
    the marginal, with p(z|x) held fixed; the retriever is fitted by KL(p_teacher ‖ p(z|x))
    to the teacher p_teacher(z) = softmax_z(log p(y|z,x) / T) — the encoder's per-candidate
    likelihood (mean over masked tokens), a stop-gradient target that ignores the current
    ranking. Both distributions are over the retrieved candidates 1..K−1 (not the null
    document, candidate 0). Its gradient Σ_z [p(z|x) − p_teacher(z)] ∇f(x,z) pushes up the
    blocks that help the encoder even when the retriever ranks them low.

    "match" (ORQA's retriever loss, Lee et al. 2019, with the masked span as the answer): the
    encoder takes the marginal with p(z|x) held fixed; the retriever is fitted by
    −log Σ_{z ∈ match} p(z|x) over the retrieved candidates, where `cand_match` says which
    blocks hold the masked span's wordpieces in their body (no loss where none does). A
    signal that does not wait for the encoder to read: the cold start's way out when the
    encoder's MLM head is new (MiniLM ships none). Weaker on real text, where a salient span
    (a year, a country) occurs in many blocks; on the generated KB a unique value occurs in
    one block only.

    Args:
      mlm_logits, labels, label_weights, retrieval_logits, variant: see `marginal_mlm_loss`.
      retriever_loss: "marginal" | "pdist" | "match".
      teacher_temperature: T of the pdist teacher.
      cand_match: [B, K] bool, "match" only: whether candidate z's body holds the masked span.
      negatives: [B, N] optional extra retriever scores (`inbatch_negative_scores`), "pdist"
        and "match" only: candidates with no teacher mass / no match, in the retriever's
        softmax beside the retrieved ones. The marginal has no target for a block the
        encoder did not read, so it takes none.

    Returns:
      (loss [], aux): `marginal_mlm_loss`'s aux plus "retriever_loss" [] (the pdist KL; the
      marginal itself for "marginal").
    """
    if retriever_loss not in RETRIEVER_LOSSES:
        raise ValueError(f"retriever_loss={retriever_loss!r}; accepted: {RETRIEVER_LOSSES}")
    if retriever_loss == "marginal":
        if negatives is not None:
            raise ValueError('retriever_loss="marginal" takes no negatives (pdist or match do)')
        loss, aux = marginal_mlm_loss(mlm_logits, labels, label_weights, retrieval_logits,
                                      variant)
        return loss, {**aux, "retriever_loss": loss}
    fixed = jax.lax.stop_gradient(retrieval_logits)
    loss, aux = marginal_mlm_loss(mlm_logits, labels, label_weights, fixed, variant)
    # The retriever's softmax for either target: the retrieved blocks (not the null document,
    # candidate 0), then the negatives, which no target gives any mass.
    retrieved = retrieval_logits.shape[-1] - 1
    student = retrieval_logits[:, 1:].astype(jnp.float32)  # [B, K − 1 (+ N)]
    if negatives is not None:
        student = jnp.concatenate([student, negatives.astype(jnp.float32)], axis=-1)
    if retriever_loss == "match":
        if cand_match is None:
            raise ValueError('retriever_loss="match" needs cand_match')
        correct = jnp.zeros(student.shape, bool).at[:, :retrieved].set(cand_match[:, 1:])
        retriever = jnp.mean(marginal_log_likelihood_loss(student, correct))
        return loss + retriever, {**aux, "retriever_loss": retriever}
    per_cand = candidate_log_likelihood(mlm_logits, labels, label_weights)  # [B, K]
    # Distil over the retrieved blocks only, not the null document: an encoder that does not
    # read yet predicts best from nothing, and a teacher that prefers the null document
    # teaches the retriever to score it first for every query, which says nothing about how to
    # rank real blocks (Atlas distils over retrieved passages alone).
    teacher = jax.nn.softmax(jax.lax.stop_gradient(per_cand[:, 1:]) / teacher_temperature,
                             axis=-1)
    log_student = jax.nn.log_softmax(student, axis=-1)[:, :retrieved]
    kl = jnp.sum(teacher * (jnp.log(jnp.maximum(teacher, 1e-30)) - log_student), axis=-1)
    retriever = jnp.mean(kl)
    return loss + retriever, {**aux, "retriever_loss": retriever}


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
