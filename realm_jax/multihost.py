"""Multi-host (multi-controller JAX) helpers: one program per host, one global mesh.

On a TPU pod every host runs the same Python program over its own devices; arrays span all
hosts' devices, and every collective (a sharded jit, a search over the sharded index, a
barrier) must be entered by every host, with the same shapes, in the same order (STYLE 6).
The rules this module serves:

  * data each host holds *in full* (the index table, a corpus batch, eval questions) becomes a
    global array with `put_global`; per-host rows (a training batch) with
    `jax.make_array_from_process_local_data`, and `process_rows` says which global rows are
    this host's;
  * a decision that gates a collective is taken once, by the primary, and broadcast
    (`agree`), so a host that sees the filesystem a moment later cannot take the other branch;
  * files shared by all hosts (the index store) are written by the primary only, and the
    others wait at a `barrier` before reading them.

On one host every function here is cheap and behaves the same, so the single-host tests run
the multi-host code paths.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_FLAG = "REALM_MULTIHOST"


def initialize(multihost: bool = False) -> None:
    """`jax.distributed.initialize()` (coordinator etc. from the TPU environment) when asked by
    `--multihost` or REALM_MULTIHOST=1; must run before anything touches a device."""
    if multihost or os.environ.get(ENV_FLAG) == "1":
        jax.distributed.initialize()
        log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """The one process that writes shared files (logs, the index store, config.json)."""
    return jax.process_index() == 0


def put_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds in full → a global array in `sharding`.

    Each device copies only its own block. `jax.device_put` would do the same placement, but
    on several processes it first all-gathers the whole array to check it is equal everywhere,
    which for the [13M, 128] index table means replicating it onto every device.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
    """The leading-axis rows of a global array that this process's devices hold.

    `jax.make_array_from_process_local_data` puts a host's local rows exactly there, so this
    maps a host's batch rows to their place in the global batch (and back).

    Raises:
      ValueError: the process's rows are not one contiguous range (a mesh whose batch axis
        interleaves the devices of different hosts).
    """
    spans = {(i[0].start or 0, global_shape[0] if i[0].stop is None else i[0].stop)
             for i in sharding.addressable_devices_indices_map(tuple(global_shape)).values()}
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    covered = sum(e - s for s, e in spans)
    if covered != stop - start:
        raise ValueError(f"process {jax.process_index()} holds rows {sorted(spans)} of "
                         f"{global_shape}: not one contiguous range")
    return slice(start, stop)


def agree(value: bool | int | None) -> bool | int | None:
    """The primary's `value` on every process: for a decision that leads into a collective
    (does version v exist? which checkpoint is newest?). Ints must fit in int32 (steps do)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    kind = 0 if value is None else 1 if isinstance(value, bool | np.bool_) else 2
    payload = np.array([kind, 0 if value is None else int(value)], np.int32)
    kind, v = multihost_utils.broadcast_one_to_all(payload).tolist()
    return None if kind == 0 else bool(v) if kind == 1 else int(v)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (e.g. the primary has published)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def gather(tree: Any) -> Any:
    """Global (sharded) arrays → full numpy arrays on every process (tests, benchmarks)."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
