"""XLA's persistent compilation cache, on for every realm_jax command (and the tests).

Why: on a 2-core CPU, compiling a MiniLM train step takes tens of seconds, and the same
programs are compiled again and again — by both ORQA runs of the demo, by every refresher
process and every restart of a run, by each process of a multi-process test. jax keeps
compiled executables on disk, keyed by the program, the compile options, the XLA flags and
the jaxlib version, so a hit is always the program that would have been compiled.

Where: `$REALM_JAX_COMPILE_CACHE` if set ("off" turns the cache off), else jax's own
`JAX_COMPILATION_CACHE_DIR` if set, else `~/.cache/realm_jax/xla`. A size limit turns on
jax's LRU eviction, which also makes concurrent writers (xdist workers, a trainer and its
refresher) take a file lock.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV = "REALM_JAX_COMPILE_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "realm_jax", "xla")
MAX_BYTES = 4 << 30
# Programs that compile faster than this are not worth a disk read and write.
MIN_COMPILE_S = 0.5


def directory() -> str | None:
    """The cache directory the environment asks for; None when it turns the cache off."""
    chosen = os.environ.get(ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_DIR
    return None if chosen.lower() in ("off", "0", "none") else os.path.expanduser(chosen)


def enable(path: str | None = None) -> str | None:
    """Turn jax's persistent compilation cache on in `path` (default: `directory()`).

    Returns the directory, or None if the environment turned the cache off or the directory
    cannot be written (logged once). Call it before the first compilation: jax reads the
    setting when it first compiles.
    """
    path = path or directory()
    if path is None:
        return None
    try:  # an unusable directory would cost a warning per compilation: say it once, go on
        os.makedirs(path, exist_ok=True)
        usable = os.access(path, os.W_OK)
    except OSError:
        usable = False
    if not usable:
        log.warning("compilation cache off: cannot write to %s (set %s to another directory, "
                    "or to off)", path, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
