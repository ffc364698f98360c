"""A 1-layer, 32-wide REALM for tests and CPU smoke runs (seconds per step on a laptop).

    python -m realm_jax.train --config configs/tiny.py --workdir /tmp/realm_tiny
    python -m realm_jax.refresh --config configs/tiny.py --workdir /tmp/realm_tiny --once

`arg` "scann" switches the index engine to ScaNN. The definition is `defaults.tiny_config`
(the tiny variants of ict.py, mlm.py and orqa_nq.py start from it too).
"""

from realm_jax import defaults

ARGS = ("", "scann")


def get_config(arg: str | None = None):
    if (arg or "") not in ARGS:
        raise ValueError(f"configs/tiny.py: unknown arg {arg!r}; accepted: {ARGS}")
    return defaults.tiny_config(engine="scann" if arg == "scann" else "exact")
