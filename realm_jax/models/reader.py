"""ORQA's span reader: BERT reads [CLS] q [SEP] block [SEP] and scores every answer span.

Span score (DESIGN §1, as the released code): start/end projections (Dense 2×S), ReLU(P_s[i] +
P_e[j]), LayerNorm (eps 1e-3), Dense(1), over spans of width ≤ max_span_width that lie wholly
inside the block; the block's retrieval logit is added by the caller (`orqa_logits`). The span
enumeration is static (numpy) and ordered as the reference's, so candidate indices agree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.models.bert import BertEncoder, dense, layer_norm
from realm_jax.models.config import RealmModelConfig

Array = jax.Array


def span_candidates(seq_len: int, max_span_width: int) -> tuple[np.ndarray, np.ndarray]:
    """All spans of width 1..max_span_width: (starts [C], ends [C]) with inclusive ends.

    Ordered by width, then start, exactly as the released ORQA / HF REALM code.
    """
    starts = [np.arange(seq_len - w + 1) for w in range(1, max_span_width + 1)]
    ends = [np.arange(w - 1, seq_len) for w in range(1, max_span_width + 1)]
    return np.concatenate(starts).astype(np.int32), np.concatenate(ends).astype(np.int32)


def mask_to_score(mask: Array) -> Array:
    """0 where allowed, the most negative float32 where not (finite: no NaN in gradients)."""
    return (1.0 - mask.astype(jnp.float32)) * jnp.finfo(jnp.float32).min


class SpanReader(nn.Module):
    """[..., L] ids + block_mask [..., L] → span logits [..., C] (C from `span_candidates`)."""

    config: RealmModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        token_type_ids: Array | None,
        block_mask: Array,
        deterministic: bool = True,
    ) -> Array:
        c = self.config
        seq_len = input_ids.shape[-1]
        if seq_len < c.max_span_width:
            raise ValueError(
                f"reader sequence length {seq_len} < max_span_width={c.max_span_width}"
            )
        seq, _ = BertEncoder(c.bert, add_pooler=False, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        proj = dense(2 * c.span_hidden_size, ("embed", "mlp"), c.bert, name="span_intermediate")
        start_proj, end_proj = jnp.split(proj(seq), 2, axis=-1)  # each [..., L, S]
        starts, ends = span_candidates(seq_len, c.max_span_width)
        hidden = jax.nn.relu(
            jnp.take(start_proj, starts, axis=-2) + jnp.take(end_proj, ends, axis=-2)
        )  # [..., C, S]
        hidden = layer_norm(c.reader_layer_norm_eps, c.bert, names=("mlp",), name="span_norm")(
            hidden
        )
        logits = dense(1, ("mlp", None), c.bert, name="span_output")(hidden)[..., 0]
        span_mask = jnp.take(block_mask, starts, axis=-1) * jnp.take(block_mask, ends, axis=-1)
        return logits.astype(jnp.float32) + mask_to_score(span_mask)


def orqa_logits(span_logits: Array, retrieval_logits: Array) -> Array:
    """Joint (block, span) logits: span logits [..., R, C] + block logits [..., R] → [..., R, C]."""
    return span_logits + retrieval_logits[..., None]


def correct_spans(
    starts: np.ndarray | Array,
    ends: np.ndarray | Array,
    gold_starts: Array,
    gold_ends: Array,
) -> Array:
    """Which candidate spans equal a gold span: gold [..., A] (−1 = none) → bool [..., C]."""
    hit = (jnp.asarray(starts) == gold_starts[..., :, None]) & (
        jnp.asarray(ends) == gold_ends[..., :, None]
    )  # [..., A, C]
    return jnp.any(hit & (gold_starts[..., :, None] >= 0), axis=-2)
