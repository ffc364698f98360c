"""A BERT encoder in Flax linen, with logical axis names on every parameter.

Parameter names follow Hugging Face's BERT closely (`embeddings`, `layer_<i>/attention/query`,
`intermediate`, `output`, `pooler`) so the weight importer is a readable table. Shapes:
B = batch (any flattened leading dims), L = sequence length, H = hidden, N = heads,
D = head dim, F = intermediate (MLP) size, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from realm_jax.models.config import BertConfig

Array = jax.Array

# Logical axis names for activations: one rules table (realm_jax.sharding) maps them to the mesh.
ACT_HIDDEN = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "kv")
ACT_MLP = ("batch", "length", "mlp")


def param_init(
    names: tuple[str | None, ...], init: Callable | None = None, std: float = 0.02
) -> Callable:
    """An initializer carrying logical axis names (`nn.with_logical_partitioning`)."""
    return nn.with_logical_partitioning(init or nn.initializers.normal(std), names)


class Dense(nn.Module):
    """Dense over the last `contract` input dims into `features` (int or tuple) output dims.

    Unlike `nn.DenseGeneral`, the kernel is created in its true shape ([*in, *out]), so its
    logical names (e.g. ('embed', 'heads', 'kv')) apply when parameters are born sharded;
    DenseGeneral creates a flat kernel first, which the mesh cannot constrain.
    """

    features: int | tuple[int, ...]
    names: tuple[str | None, ...]
    bias_names: tuple[str | None, ...]
    config: BertConfig
    contract: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        kernel = self.param(
            "kernel", param_init(self.names, std=c.initializer_range),
            (*x.shape[x.ndim - self.contract:], *feats), jnp.dtype(c.param_dtype),
        )
        bias = self.param(
            "bias", param_init(self.bias_names, nn.initializers.zeros), feats,
            jnp.dtype(c.param_dtype),
        )
        dtype = jnp.dtype(c.dtype)
        y = jnp.tensordot(
            x.astype(dtype), kernel.astype(dtype),
            axes=(tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract))),
        )
        return y + bias.astype(dtype)


def dense(features, names, config: BertConfig, axis=-1, name=None, bias_names=None) -> Dense:
    """A Dense whose kernel/bias carry logical axis names; `axis=(-2, -1)` contracts two dims."""
    n_out = 1 if isinstance(features, int) else len(features)
    if bias_names is None:
        bias_names = tuple(names[-n_out:])
    contract = 1 if isinstance(axis, int) else len(axis)
    return Dense(features, tuple(names), bias_names, config, contract=contract, name=name)


def layer_norm(eps: float, config: BertConfig, names=("embed",), name=None) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mu)^2] as torch computes it, not E[x^2]-mu^2, which loses
    # precision for large activations and would break 1e-4 parity with the reference.
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        use_fast_variance=False,
        scale_init=param_init(names, nn.initializers.ones),
        bias_init=param_init(names, nn.initializers.zeros),
        name=name,
    )


def activation(name: str) -> Callable[[Array], Array]:
    return {
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "relu": jax.nn.relu,
    }[name]


class BertEmbeddings(nn.Module):
    config: BertConfig

    def setup(self):
        c = self.config
        embed = lambda n, names: nn.Embed(  # noqa: E731
            n, c.hidden_size,
            dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
            embedding_init=param_init(names, std=c.initializer_range),
        )
        self.word_embeddings = embed(c.vocab_size, ("vocab", "embed"))
        self.position_embeddings = embed(c.max_position_embeddings, (None, "embed"))
        self.token_type_embeddings = embed(c.type_vocab_size, (None, "embed"))
        self.layer_norm = layer_norm(c.layer_norm_eps, c)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(jnp.arange(length))[None]
        )
        x = self.dropout(self.layer_norm(x), deterministic=deterministic)
        return nn.with_logical_constraint(x, ACT_HIDDEN)


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask_bias: Array, deterministic: bool) -> Array:
        """x: [B, L, H]; mask_bias: [B, 1, 1, L] additive (0 or a large negative)."""
        c = self.config
        proj = lambda name: dense(  # noqa: E731
            (c.num_heads, c.head_dim), ("embed", "heads", "kv"), c, name=name
        )
        q, k, v = (
            nn.with_logical_constraint(proj(n)(x), ACT_HEADS) for n in ("query", "key", "value")
        )  # each [B, L, N, D]
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(c.head_dim)) + mask_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(jnp.dtype(c.dtype))  # [B, N, Lq, Lk]
        probs = nn.Dropout(c.attention_dropout)(probs, deterministic=deterministic)
        # Heads-major product, then a transpose: XLA:CPU runs "bnqk,bknd->bnqd" as one batched
        # matmul, while asking for "bqnd" directly costs 2.5-3.4x as much (32 x 288 tokens,
        # MiniLM's 12 heads; benchmarks/README "Attention layout"), equal up to rounding.
        ctx = jnp.einsum("bnqk,bknd->bnqd", probs, v).transpose(0, 2, 1, 3)  # [B, Lq, N, D]
        ctx = nn.with_logical_constraint(ctx, ACT_HEADS)
        return dense(c.hidden_size, ("heads", "kv", "embed"), c, axis=(-2, -1), name="output")(ctx)


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask_bias: Array, deterministic: bool) -> Array:
        c = self.config
        drop = nn.Dropout(c.hidden_dropout)
        attn = SelfAttention(c, name="attention")(x, mask_bias, deterministic)
        x = layer_norm(c.layer_norm_eps, c, name="attention_norm")(
            x + drop(attn, deterministic=deterministic)
        )
        x = nn.with_logical_constraint(x, ACT_HIDDEN)
        h = dense(c.intermediate_size, ("embed", "mlp"), c, name="intermediate")(x)
        h = nn.with_logical_constraint(activation(c.hidden_act)(h), ACT_MLP)
        h = dense(c.hidden_size, ("mlp", "embed"), c, name="output")(h)
        x = layer_norm(c.layer_norm_eps, c, name="output_norm")(
            x + drop(h, deterministic=deterministic)
        )
        return nn.with_logical_constraint(x, ACT_HIDDEN)


class BertEncoder(nn.Module):
    """BERT body: embeddings → layers → optional tanh pooler on [CLS].

    Inputs may have any leading dims ([B, L] or [B, K, L]); they are flattened for the body and
    restored on the outputs, so a tower reads candidates the same way it reads queries.
    """

    config: BertConfig
    add_pooler: bool = True

    def setup(self):
        c = self.config
        self.embeddings = BertEmbeddings(c)
        # static_argnums counts `self`: (x, mask_bias, deterministic) → deterministic is 3.
        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if c.remat else BertLayer
        self.layers = [layer_cls(c, name=f"layer_{i}") for i in range(c.num_layers)]
        if self.add_pooler:
            self.pooler = dense(c.hidden_size, ("embed", "mlp"), c)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array | None]:
        """Returns (sequence_output [..., L, H], pooled_output [..., H] or None)."""
        lead, length = input_ids.shape[:-1], input_ids.shape[-1]
        input_ids = input_ids.reshape(-1, length)
        attention_mask = (
            jnp.ones_like(input_ids) if attention_mask is None
            else attention_mask.reshape(-1, length)
        )
        token_type_ids = (
            jnp.zeros_like(input_ids) if token_type_ids is None
            else token_type_ids.reshape(-1, length)
        )
        # Additive mask in float32: 0 where attended, the most negative float where padded.
        mask_bias = (1.0 - attention_mask.astype(jnp.float32)) * jnp.finfo(jnp.float32).min
        mask_bias = mask_bias[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        for layer in self.layers:
            x = layer(x, mask_bias, deterministic)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if self.add_pooler else None
        x = x.reshape(*lead, length, -1)
        if pooled is not None:
            pooled = pooled.reshape(*lead, -1)
        return x, pooled

    def attend(self, hidden: Array) -> Array:
        """Logits over the vocabulary with the (tied) word embeddings: [..., H] → [..., V]."""
        return self.embeddings.word_embeddings.attend(hidden)


def mean_pool(sequence: Array, attention_mask: Array) -> Array:
    """Mean of token states over real tokens (sentence-transformers' pooling): [..., H]."""
    m = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(sequence.astype(jnp.float32) * m, axis=-2)
    return total / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)
