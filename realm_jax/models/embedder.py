"""The retriever's embedder: text → one vector per sequence (the relevance function's half).

Released REALM: BERT pooled output (tanh dense on [CLS]) → Dense(proj_size) → LayerNorm →
dropout. `pooling="mean"` averages token states instead, which is how sentence-transformers'
MiniLM was trained, so that body retrieves well before any REALM training.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from realm_jax.models.bert import BertEncoder, dense, layer_norm, mean_pool
from realm_jax.models.config import RealmModelConfig

Array = jax.Array


class Embedder(nn.Module):
    """[..., L] token ids → [..., proj_size] embeddings (float32)."""

    config: RealmModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        c = self.config
        use_pooler = c.pooling == "cls_pooler"
        seq, pooled = BertEncoder(c.bert, add_pooler=use_pooler, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        if not use_pooler:
            mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
            pooled = mean_pool(seq, mask)
        x = pooled
        if c.proj_size:
            x = dense(c.proj_size, ("embed", "proj"), c.bert, name="proj")(x)
            x = layer_norm(c.bert.layer_norm_eps, c.bert, names=("proj",), name="proj_norm")(x)
            x = nn.Dropout(c.embed_dropout)(x, deterministic=deterministic)
        x = x.astype(jnp.float32)
        if c.normalize:
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x


def relevance_scores(query_emb: Array, cand_emb: Array) -> Array:
    """f(x, z) = Embed(x)·Embed(z): query [B, d] × candidates [B, K, d] → [B, K]."""
    return jnp.einsum("bd,bkd->bk", query_emb, cand_emb)
