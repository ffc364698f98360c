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


def frozen_then(schedule: optax.Schedule, frozen_steps: int, total_steps: int,
                warmup: int) -> optax.Schedule:
    """0 for the first `frozen_steps` steps, then a fresh warmup to the peak and the decay.

    Why: REALM's retriever must not follow the encoder's gradients while its MLM head is still
    random (they are noise, and Adam makes full-size steps of noise). With a zero rate AdamW's
    update is exactly zero, so the frozen tower stays bitwise unchanged; its moments keep
    accumulating, and the new warmup keeps the first unfrozen steps small.
    """
    if frozen_steps <= 0:
        return schedule
    after = learning_rate(float(schedule(max(warmup, 1))), max(total_steps - frozen_steps, 1),
                          min(warmup, max(total_steps - frozen_steps, 1)))
    return optax.join_schedules([optax.constant_schedule(0.0), after], [frozen_steps])


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices (kernels, embeddings), not LayerNorm scales
    or biases — every 1-D parameter in our towers is one of those."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """From `config.train`: lr, steps, warmup_steps, weight_decay, grad_clip, lr_scale,
    freeze_steps.

    `lr_scale` maps a tower name to a learning-rate multiplier (default 1). `freeze_steps`
    maps a tower name to a number of initial steps during which it does not move
    (`frozen_then`; Atlas's `freeze_retriever_steps`): REALM's retriever waits while the
    encoder learns to read the retrieved blocks.
    Parameters are `{tower: tree}` dicts, so the scale is applied per top-level key.
    """
    warmup = warmup_steps(train.steps, train.warmup_steps)

    def adamw(scale: float, frozen: int) -> optax.GradientTransformation:
        schedule = frozen_then(learning_rate(train.lr * scale, train.steps, warmup), frozen,
                               train.steps, warmup)
        return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-6,
                           weight_decay=train.weight_decay, mask=decay_mask)

    scales = dict(train.get("lr_scale", {}) or {})
    frozen = {t: int(n) for t, n in dict(train.get("freeze_steps", {}) or {}).items() if n}
    special = sorted(set(scales) | set(frozen))
    if special:
        inner = optax.multi_transform(
            {"default": adamw(1.0, 0),
             **{t: adamw(float(scales.get(t, 1.0)), frozen.get(t, 0)) for t in special}},
            lambda params: {t: jax.tree.map(lambda _, t=t: t if t in special else "default", p)
                            for t, p in params.items()})
    else:
        inner = adamw(1.0, 0)
    if train.grad_clip:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), inner)
    return inner
