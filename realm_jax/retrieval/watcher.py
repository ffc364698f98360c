"""IndexWatcher: how the trainer follows the index store without stopping (DESIGN §4).

The refresher publishes versions through `realm_jax.retrieval.store`; the trainer holds one
`IndexWatcher`, which polls `LATEST`, loads and validates new versions on a daemon thread, and
hands them over only when the trainer asks between steps (`maybe_swap`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from etils import epath

from realm_jax.retrieval.store import (
    INDEX_DIR,
    META,
    IndexStoreError,
    IndexVersion,
    PathLike,
    latest_step,
    load_version,
    version_path,
)

log = logging.getLogger(__name__)


class IndexWatcher:
    """Follows LATEST for the trainer: loads new versions off-thread, swaps them in on demand.

    A daemon thread calls `poll_once()` every `poll_interval_s`; a new version is loaded and
    validated there and parked as pending. The trainer calls `maybe_swap()` between steps, so
    the swap happens on its own thread and never inside a step. On any failure the current
    version stays; the failure is logged and counted, and a version (identified by its step and
    the bytes of its meta.json, so a republished one counts as new) is tried at most
    `max_attempts` times.

    Tests can pass `start=False` and call `poll_once()` themselves for determinism.

    Args:
      workdir: the run's workdir.
      poll_interval_s: seconds between reads of LATEST (a small file, so polling is cheap).
      expect: meta.json fields every version must match (see `load_version`).
      max_attempts: loads per broken version before giving up on it.
      start: start the polling thread now (False: call `poll_once()` or `start()` yourself).
    """

    def __init__(
        self,
        workdir: PathLike,
        *,
        poll_interval_s: float = 30.0,
        expect: Mapping[str, Any] | None = None,
        max_attempts: int = 3,
        start: bool = True,
    ) -> None:
        self.workdir = epath.Path(workdir)
        self.poll_interval_s = float(poll_interval_s)
        self.expect = dict(expect or {})
        self.max_attempts = max_attempts
        self._lock = threading.Lock()  # guards the state below
        self._ready = threading.Condition(self._lock)  # notified when a poll finishes
        self._poll_lock = threading.Lock()  # one load at a time (thread vs direct callers)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._current: IndexVersion | None = None
        self._pending: IndexVersion | None = None
        self._attempts: dict[tuple[int, str], int] = {}
        self._failures = 0
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- state ---------------------------------------------------------------------------------

    @property
    def current(self) -> IndexVersion | None:
        """The version in use (last swapped in), or None before the first swap."""
        with self._lock:
            return self._current

    @property
    def failures(self) -> int:
        """Failed loads so far (each attempt counts)."""
        with self._lock:
            return self._failures

    @property
    def last_error(self) -> str | None:
        """Why the most recent failed load failed."""
        with self._lock:
            return self._last_error

    # -- polling -------------------------------------------------------------------------------

    def _meta_key(self, step: int) -> tuple[int, str]:
        try:
            data = (version_path(self.workdir, step) / META).read_bytes()
            return step, hashlib.sha256(data).hexdigest()
        except OSError:
            return step, "unreadable"

    def _fail(self, key: tuple[int, str] | None, message: str) -> None:
        with self._lock:
            self._failures += 1
            self._last_error = message
            if key is not None:
                self._attempts[key] = self._attempts.get(key, 0) + 1
            gave_up = key is not None and self._attempts[key] >= self.max_attempts
            current = None if self._current is None else self._current.step
            self._ready.notify_all()
        log.warning(
            "index: keeping v%s; %s%s", current, message, " (giving up on it)" if gave_up else ""
        )

    def poll_once(self) -> bool:
        """Reads LATEST once and, if it names a new version, loads and validates it.

        Never raises: failures are recorded (`failures`, `last_error`) and logged.

        Returns:
          True if a new version is now pending for `maybe_swap()`.
        """
        with self._poll_lock:
            try:
                step = latest_step(self.workdir)
            except Exception as e:  # noqa: BLE001  a garbled LATEST must not kill the thread
                with self._lock:
                    repeat = self._last_error == str(e)
                if not repeat:  # a garbled LATEST is re-read every poll: count it once
                    self._fail(None, str(e))
                return False
            if step is None:
                return False
            with self._lock:
                if self._current is not None and step == self._current.step:
                    self._pending = None  # LATEST was rolled back to what we use: drop newer
                    return False
                if self._pending is not None and step == self._pending.step:
                    return False
            key = self._meta_key(step)
            with self._lock:
                if self._attempts.get(key, 0) >= self.max_attempts:
                    return False
            try:
                version = load_version(self.workdir, step, self.expect)
            except Exception as e:  # noqa: BLE001  any failure: keep the current index
                self._fail(key, f"v{step}: {type(e).__name__}: {e}")
                return False
            with self._lock:
                self._pending = version
                self._ready.notify_all()
            log.info("index: v%d loaded, ready to swap in", step)
            return True

    def maybe_swap(self) -> IndexVersion | None:
        """Call between train steps: swaps in and returns a newly loaded version, else None."""
        with self._lock:
            version, self._pending = self._pending, None
            if version is not None:
                self._current = version
        if version is not None:
            log.info("index: swapped in v%d", version.step)
        return version

    def wait_for(self, min_step: int, timeout_s: float) -> IndexVersion:
        """Blocks until a version with step >= min_step is swapped in (on the caller's thread).

        For `refresh.max_staleness_steps`: when the index falls too far behind, the trainer
        waits here instead of training against a stale index.

        Returns:
          The current version (step >= min_step).

        Raises:
          TimeoutError: none arrived within `timeout_s`; the message says what was seen.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.maybe_swap()
            current = self.current
            if current is not None and current.step >= min_step:
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                try:
                    latest = latest_step(self.workdir)
                except IndexStoreError as e:
                    latest = str(e)
                raise TimeoutError(
                    f"{self.workdir / INDEX_DIR}: no index version with step >= {min_step} "
                    f"after {timeout_s:.1f}s (current: "
                    f"{None if current is None else f'v{current.step}'}, LATEST: {latest}, "
                    f"failed loads: {self.failures}, last error: {self.last_error})"
                )
            wait = min(remaining, self.poll_interval_s)
            if self._thread is not None and self._thread.is_alive():
                self._wake.set()  # poll now rather than at the next interval
                with self._ready:
                    self._ready.wait_for(lambda: self._pending is not None, timeout=wait)
            elif not self.poll_once():
                time.sleep(wait)

    # -- thread --------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the polling thread (a daemon: it never keeps the process alive)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"IndexWatcher({self.workdir})", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self.poll_once()
            self._wake.wait(self.poll_interval_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the polling thread; a load in progress finishes (or is abandoned at exit)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> IndexWatcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
