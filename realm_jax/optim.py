"""The optimiser of both tasks: AdamW with BERT's exclusions, warmup + linear decay, clipping.

As the released REALM/ORQA code (BERT's AdamWeightDecayOptimizer): no weight decay on LayerNorm
parameters and biases, a linear warmup of `min(10000, max(100, steps / 10))` steps, then a
linear decay to zero at the last step, and global-norm gradient clipping.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def warmup_steps(total_steps: int, configured: int = -1) -> int:
    """`configured` if ≥ 0, else min(10000, max(100, total / 10))."""
    if configured >= 0:
        return int(configured)
    return int(min(10_000, max(100, total_steps // 10)))


def learning_rate(lr: float, total_steps: int, warmup: int) -> optax.Schedule:
    """0 → lr over `warmup` steps, then lr → 0 linearly at `total_steps`."""
    decay = max(total_steps - warmup, 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.linear_schedule(lr, 0.0, decay)],
        [max(warmup, 1)],
    )


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices (kernels, embeddings), not LayerNorm scales
    or biases — every 1-D parameter in our towers is one of those."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """From `config.train`: lr, steps, warmup_steps, weight_decay, grad_clip, lr_scale.

    `lr_scale` maps a tower name to a learning-rate multiplier (default 1): e.g. a retriever
    that must not drift while a freshly initialised MLM head still gives it noisy gradients.
    Parameters are `{tower: tree}` dicts, so the scale is applied per top-level key.
    """
    warmup = warmup_steps(train.steps, train.warmup_steps)

    def adamw(scale: float) -> optax.GradientTransformation:
        return optax.adamw(learning_rate(train.lr * scale, train.steps, warmup), b1=0.9,
                           b2=0.999, eps=1e-6, weight_decay=train.weight_decay,
                           mask=decay_mask)

    scales = dict(train.get("lr_scale", {}) or {})
    if scales:
        inner = optax.multi_transform(
            {"default": adamw(1.0), **{t: adamw(float(s)) for t, s in scales.items()}},
            lambda params: {t: jax.tree.map(lambda _, t=t: t if t in scales else "default", p)
                            for t, p in params.items()})
    else:
        inner = adamw(1.0)
    if train.grad_clip:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), inner)
    return inner
