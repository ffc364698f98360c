"""The knowledge-augmented encoder: BERT reading [CLS] masked query [SEP] block [SEP] + MLM head.

The decoder is tied to the word embeddings (as in BERT and HF REALM) with a separate bias.
Computing logits for all 384 positions × 30k vocab × k candidates is the largest tensor of a
pre-training step, so callers pass `mlm_positions` to score only the masked tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from realm_jax.models.bert import BertEncoder, activation, dense, layer_norm, param_init
from realm_jax.models.config import RealmModelConfig

Array = jax.Array


class KnowledgeAugEncoder(nn.Module):
    """Token ids [B, K, L] (query joined with each of K candidates) → MLM logits.

    Returns logits [B, K, L, V], or [B, K, M, V] at `mlm_positions` [B, M] (the same masked
    positions for every candidate, since the query is the prefix of every joined sequence).
    """

    config: RealmModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        mlm_positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        c = self.config.bert
        bert = BertEncoder(c, add_pooler=False, name="bert")
        seq, _ = bert(input_ids, attention_mask, token_type_ids, deterministic)  # [B, K, L, H]
        if mlm_positions is not None:
            # [B, K, M, H]: gather the masked positions (shared by all K candidates).
            seq = jnp.take_along_axis(seq, mlm_positions[:, None, :, None], axis=2)
        h = dense(c.hidden_size, ("embed", "mlp"), c, name="transform")(seq)
        h = activation(c.hidden_act)(h)
        h = layer_norm(c.layer_norm_eps, c, names=("embed",), name="transform_norm")(h)
        logits = bert.attend(h)
        bias = self.param(
            "output_bias", param_init(("vocab",), nn.initializers.zeros),
            (c.vocab_size,), jnp.dtype(c.param_dtype),
        )
        return (logits + bias).astype(jnp.float32)
