"""The trainer's side of the index protocol (DESIGN §4): which version it searches, who
refreshes it, and how long it may lag.

Modes (`config.refresh.mode`):
  subprocess  train starts `python -m realm_jax.refresh` on this machine as a child process,
              restarts it if it dies (up to `refresh.max_restarts`), and swaps in the versions
              it publishes (IndexWatcher). The single-machine default.
  external    a separate job (a pod's refresher VM) publishes into the same workdir; the
              trainer only watches.
  sync        the trainer re-embeds the corpus itself every `refresh.every_steps` steps, between
              steps. Deterministic (tests, bitwise resume), but training pauses while it embeds.
  frozen      (ORQA) the index is built once from the pre-trained embedder and never changes.

With `refresh.max_staleness_steps > 0`, `before_step` blocks until the index is at most that
many steps behind (the paper's ablation shows a 30× staler index costs 10 EM points).

Multi-host: every host searches the same version, swapped in at the same step, because exact
search runs over a table sharded on all hosts' devices (and a mix of versions would make the
logged `index_step` a lie for ScaNN). So the primary's view decides: which version exists
(sync, frozen) or which one its watcher holds (external); every host then loads that version
from the store, and if any host cannot, all keep the current one. In-process refreshes publish
from the primary only (`Refresher.refresh_with`). `subprocess` mode is single-machine only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from realm_jax import multihost
from realm_jax.retrieval import store
from realm_jax.retrieval.searcher import Searcher, open_searcher
from realm_jax.retrieval.watcher import IndexWatcher

log = logging.getLogger(__name__)
MODES = ("subprocess", "external", "sync", "frozen", "none")


class LiveIndex:
    """The current `Searcher` of a training run, kept fresh by the configured mode.

    Args:
      config: the run's config (`refresh`, `retrieval`).
      workdir: the run's workdir (index/ and checkpoints/ live there).
      mesh: device mesh for exact search.
      corpus_fp: the corpus fingerprint every version must carry (refuses an index of
        another corpus).
      refresher: an in-process `Refresher` (sync and frozen modes: embeds and publishes).
      mode: overrides `config.refresh.mode` (the ORQA task passes "frozen"; a task that
        searches nothing, such as ICT or plain MLM, passes "none": no index, no searcher).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: epath.PathLike, mesh, *,
                 corpus_fp: str, refresher: Any = None, mode: str | None = None):
        self.config = config
        self.workdir = epath.Path(workdir)
        self.mesh = mesh
        self.mode = mode or config.refresh.mode
        if self.mode not in MODES:
            raise ValueError(f"refresh.mode={self.mode!r}; accepted: {MODES[:3]}")
        if self.mode == "subprocess" and jax.process_count() > 1:
            raise ValueError("refresh.mode=subprocess starts a refresher on this machine; on "
                             f"{jax.process_count()} hosts run it as its own job "
                             "(refresh.mode=external, launch/tpu_pod.sh refresh)")
        if self.mode in ("sync", "frozen") and refresher is None:
            raise ValueError(f"refresh mode {self.mode} embeds in-process: pass a refresher")
        self.refresher = refresher
        self.expect = {"corpus_fingerprint": corpus_fp}
        r = config.refresh
        self.every = int(r.every_steps)
        self.max_staleness = int(r.max_staleness_steps)
        self.timeout = float(r.wait_timeout_s)
        self.searcher: Searcher | None = None
        self.swaps = 0  # versions swapped in after the first one
        self.waited_s = 0.0
        self._watcher: IndexWatcher | None = None
        self._child: subprocess.Popen | None = None
        self._restarts = 0
        self._log_file: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, step: int, params: dict[str, Any] | None = None) -> Searcher:
        """Make an index available for training from `step` on and return its searcher.

        sync: the version the uninterrupted run would use at `step` (the last multiple of
        `every_steps`), re-embedding with `params` if it is missing; so a resumed run
        searches exactly what it would have searched without the interruption.
        """
        if self.mode == "none":
            return None
        if self.mode == "frozen":
            self.refresher.cold_start()  # no-op if the run already has its index
            latest = multihost.agree(store.latest_step(self.workdir))
            if latest is None:
                raise FileNotFoundError(f"{self.workdir / store.INDEX_DIR}: no index after the "
                                        "cold start")
            self._use(store.load_version(self.workdir, latest, self.expect))
        elif self.mode == "sync":
            due = step - step % self.every if self.every > 0 else 0
            if not multihost.agree(store.version_path(self.workdir, due).exists()):
                self._publish(step, params)
                due = step
            self._use(store.load_version(self.workdir, due, self.expect))
        else:
            if self.mode == "subprocess":
                self._spawn()
            self._watcher = IndexWatcher(self.workdir, expect=self.expect,
                                         poll_interval_s=self.config.refresh.poll_interval_s)
            self._wait(0)
        return self.searcher

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
        if self._child is not None and self._child.poll() is None:
            self._child.terminate()
            try:
                self._child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        if self._log_file is not None:
            self._log_file.close()

    def __enter__(self) -> LiveIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ between steps
    def before_step(self, step: int, params: dict[str, Any]) -> bool:
        """Refresh / swap / wait as the mode says; True if a new version was swapped in."""
        if self.mode in ("frozen", "none"):
            return False
        if self.mode == "sync":
            return self._sync_refresh(step, params)
        if self.mode == "subprocess":
            self._supervise()
        before = self.searcher.step
        self._follow_primary()
        if self.max_staleness > 0 and step - self.searcher.step > self.max_staleness:
            t0 = time.monotonic()
            log.info("step %d: index v%d is %d steps behind (max %d): waiting", step,
                     self.searcher.step, step - self.searcher.step, self.max_staleness)
            self._wait(step - self.max_staleness)
            self.waited_s += time.monotonic() - t0
        return self.searcher.step != before

    def catch_up(self, step: int, params: dict[str, Any]) -> bool:
        """Make the searched index the one of `step`'s parameters if this mode makes one at
        all, now rather than later; True if the searcher is then that fresh.

        Why: an evaluation of the retriever wants a fresh index, and re-embedding the corpus
        for it would double the refresh work. In sync mode the version due at `step` is
        published now (before_step would publish it before the next step: same version,
        same parameters, so a run stays bitwise the same). With a refresher process, this
        waits for its version of checkpoint `step`, which it embeds anyway (the caller must
        have saved that checkpoint).
        """
        if self.mode == "sync":
            self._sync_refresh(step, params)
        elif self.mode in ("subprocess", "external"):
            if self.searcher.step < step:
                self._wait(step)
        return self.index_step == step

    @property
    def index_step(self) -> int | None:
        """The step of the version searched now; None without an index (mode "none")."""
        return None if self.searcher is None else self.searcher.step

    def staleness(self, step: int) -> int | None:
        """Steps the searched index is behind `step`; None for a frozen index (never stale) or
        none at all."""
        return None if self.mode in ("frozen", "none") else step - self.searcher.step

    # ------------------------------------------------------------------ internals
    def _use(self, version: store.IndexVersion) -> None:
        first = self.searcher is None
        self.searcher = open_searcher(version, self.config, self.mesh)
        if not first:
            self.swaps += 1
        log.info("index: searching v%d (%s, %d blocks)", version.step, self.searcher.engine,
                 version.num_blocks)

    def _follow_primary(self) -> None:
        """Swap in the version the primary's watcher holds, on every host (module docstring).

        On one host: the watcher's newest loaded version. Each host's watcher loads versions
        in the background, so usually a host already holds the agreed one; otherwise it loads
        it now. If any host fails to, every host keeps the current version.
        """
        self._watcher.maybe_swap()
        held = self._watcher.current
        target = multihost.agree(-1 if held is None else held.step)
        if target < 0 or (self.searcher is not None and target == self.searcher.step):
            return
        version, error = held, None
        if held is None or held.step != target:
            try:
                version = store.load_version(self.workdir, target, self.expect)
            except (FileNotFoundError, store.IndexStoreError) as e:
                version, error = None, f"{type(e).__name__}: {e}"
        failed = multihost.gather(np.array([version is None]))
        if failed.any():
            current = None if self.searcher is None else self.searcher.step
            log.warning("index: keeping v%s; v%d could not be loaded on hosts %s (%s)", current,
                        target, np.flatnonzero(failed).tolist(), error or "see their logs")
            if self.searcher is None:
                raise RuntimeError(f"no index to start from: v{target} failed on hosts "
                                   f"{np.flatnonzero(failed).tolist()}")
            return
        self._use(version)

    def _sync_refresh(self, step: int, params: dict[str, Any]) -> bool:
        """Sync mode: re-embed and swap in at every `every_steps`-th step (once); True if so."""
        if self.every > 0 and step % self.every == 0 and step > self.searcher.step:
            self._publish(step, params)
            self._use(store.load_version(self.workdir, step, self.expect))
            return True
        return False

    def _publish(self, step: int, params: dict[str, Any] | None) -> None:
        if params is None or "embedder" not in params:
            raise ValueError("sync refresh needs the embedder's parameters")
        self.refresher.refresh_with(step, params["embedder"])

    def _wait(self, min_step: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            if self.mode == "subprocess":
                self._supervise()
            try:
                self._watcher.wait_for(min_step, min(5.0, self.timeout))
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no index version >= {min_step} in {self.workdir / store.INDEX_DIR} "
                        f"after {self.timeout:.0f}s (refresh.mode={self.mode}"
                        + (f"; refresher log: {self._log_path}" if self._child else
                           "; is the refresher job running against this workdir?") + ")"
                    ) from None
        self._follow_primary()  # the primary has waited too: its version is >= min_step

    @property
    def _log_path(self) -> epath.Path:
        return self.workdir / "refresher.log"

    def _spawn(self) -> None:
        # --parent_pid: the child asks to die with this trainer (`refresh.die_with`).
        cmd = [sys.executable, "-m", "realm_jax.refresh", "--resolved_config",
               str(self.workdir / "config.json"), "--workdir", str(self.workdir),
               "--parent_pid", str(os.getpid())]
        if self._log_file is None:
            self._log_file = self._log_path.open("a")
        self._log_file.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n")
        self._log_file.flush()
        self._child = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT)
        log.info("refresher started (pid %d), log: %s", self._child.pid, self._log_path)

    def _supervise(self) -> None:
        code = self._child.poll()
        if code is None:
            return
        if self._restarts >= self.config.refresh.max_restarts:
            raise RuntimeError(f"the refresher exited with code {code} and was restarted "
                               f"{self._restarts} times; see {self._log_path}")
        self._restarts += 1
        log.warning("refresher exited with code %s: restart %d of %d (log: %s)", code,
                    self._restarts, self.config.refresh.max_restarts, self._log_path)
        self._spawn()

    @property
    def restarts(self) -> int:
        return self._restarts
