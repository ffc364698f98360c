"""The asynchronous index refresher process (DESIGN §3, §4).

    python -m realm_jax.refresh --config configs/X.py --workdir DIR [--once]
    python -m realm_jax.refresh --resolved_config DIR/config.json --workdir DIR [--parent_pid P]

`--resolved_config` reads the config a training run saved (what `train` passes to the refresher
it supervises, so overrides given on the trainer's command line reach the refresher too), and
`--parent_pid` its own pid, so the refresher stops when the trainer dies, even by kill -9.

Without --once it follows WORKDIR/checkpoints until killed (or until --timeout_s passes with no
new checkpoint); with --once it builds the initial index if there is none, refreshes from the
newest checkpoint if that is newer than the index, and exits. One refresher per index: a second
one exits at once naming the first one's pid and host (`realm_jax.workdir_lock`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from realm_jax import cli, multihost
from realm_jax.errors import UserError
from realm_jax.retrieval.refresher import Refresher

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_RESOLVED = flags.DEFINE_string("resolved_config", None, "A run's saved config.json instead.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints/ and index/).")
_ONCE = flags.DEFINE_bool("once", False, "Refresh once from the newest checkpoint and exit.")
_TIMEOUT = flags.DEFINE_float("timeout_s", None, "Stop after this long without a checkpoint.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
_PARENT = flags.DEFINE_integer("parent_pid", None, "Exit when this process (the trainer that "
                               "started the refresher) dies, even by kill -9.")


def die_with(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this refresher when the trainer that started it dies, even by
    kill -9, so no orphan keeps embedding for a dead run.

    Asked here, in the child, rather than in a `Popen(preexec_fn=...)`: that runs Python
    between fork and exec inside the trainer, a multithreaded process (XLA, tokenizers), which
    can deadlock, and it made JAX and tokenizers warn on every start."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the trainer's close() still stops it
        pass
    if os.getppid() != parent_pid:  # it died before the request was made
        raise UserError(f"the trainer (pid {parent_pid}) that started this refresher is gone")


def main(argv: Sequence[str]) -> None:
    del argv
    if _PARENT.value is not None:
        die_with(_PARENT.value)
    multihost.initialize(_MULTIHOST.value)  # also REALM_MULTIHOST=1 (launch/tpu_pod.sh)
    if (_CONFIG.value is None) == (_RESOLVED.value is None):
        raise UserError("give exactly one of --config and --resolved_config")
    config = _CONFIG.value
    if _RESOLVED.value:
        from realm_jax import defaults

        config = defaults.load_config(_RESOLVED.value)
    refresher = Refresher(config, _WORKDIR.value)
    published = refresher.run(once=_ONCE.value, timeout_s=_TIMEOUT.value)
    logging.info("published index versions: %s", published)
    print(f"published index versions: {published}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
