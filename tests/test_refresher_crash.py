"""Crash safety: kill -9 the refresher process at random moments while a reader polls LATEST.

Every trial the "trainer" (this test) writes a new checkpoint, starts `python -m
realm_jax.refresh` following the workdir, and kills it with SIGKILL after a random delay —
during start-up, restore, embedding, the ScaNN-free publish or between refreshes. The delays
are fractions of the time the first run took to publish, so the test does not depend on the
machine's speed. A reader
thread loads LATEST in a loop the whole time: it must never see a torn version, and every
version LATEST ever named must load and validate.
"""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from realm_jax import defaults, initialize, run_checkpoints, sharding
from realm_jax.retrieval import store

TRIALS = 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(workdir, step, base):
    trained = jax.tree.map(lambda x: np.asarray(x) * (1 + 0.1 * step), base)
    manager = run_checkpoints.checkpoint_manager(workdir)
    run_checkpoints.save_train_state(manager, step, {"embedder": trained}, {}, {}, {})
    manager.wait_until_finished()
    manager.close()


@pytest.mark.slow
def test_kill_9_never_leaves_a_torn_index(tmp_path, eight_devices):
    config = defaults.load_config("configs/tiny.py")
    mesh = sharding.make_mesh({"data": -1})
    base = jax.device_get(initialize.initial_params(config, ["embedder"], mesh)[0]["embedder"])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cmd = [sys.executable, "-m", "realm_jax.refresh", "--config", "configs/tiny.py",
           "--workdir", str(tmp_path), "--timeout_s", "60"]

    seen: dict[int, str] = {}  # step → sha of meta.json at the time it was read
    errors: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                if store.latest_step(tmp_path) is None:
                    continue
                version = store.load_latest(tmp_path)
                seen.setdefault(version.step, version.meta["corpus_fingerprint"])
            except Exception as e:  # noqa: BLE001  any failure is a torn or invalid version
                errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.01)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    rng = random.Random(0)
    to_publish = None  # seconds from start-up to a published version on this machine
    try:
        for trial in range(TRIALS):
            write_checkpoint(tmp_path, trial + 1, base)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            if to_publish is None:
                # The first run is let through to its version: its time sets the kill delays,
                # so the kills land in every phase (start-up, restore, embedding, publish, idle)
                # on a fast machine and a slow or busy one alike.
                t0 = time.monotonic()
                while store.latest_step(tmp_path) != trial + 1:
                    assert proc.poll() is None, "the refresher died before publishing"
                    assert time.monotonic() - t0 < 300, "no version within 300 s"
                    time.sleep(0.02)
                to_publish = time.monotonic() - t0
            else:
                time.sleep(rng.uniform(0.15, 1.6) * to_publish)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            latest = store.latest_step(tmp_path)
            if latest is not None:  # LATEST names a complete, loadable version after every kill
                assert store.load_latest(tmp_path).step == latest
        # A last, uninterrupted run catches up with the newest checkpoint.
        subprocess.run([*cmd[:-2], "--once"], env=env, check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors, errors[:3]
    assert store.load_latest(tmp_path).step == TRIALS
    assert len(seen) >= 3, f"too few versions published to test anything: {sorted(seen)}"
    assert len(set(seen.values())) == 1  # every version indexes the same corpus


def test_a_refresher_whose_trainer_is_gone_exits_at_once(tmp_path):
    """`--parent_pid` names the trainer; a refresher started after it died refuses to run."""
    proc = subprocess.run(
        [sys.executable, "-m", "realm_jax.refresh", "--config", "configs/tiny.py", "--workdir",
         str(tmp_path), "--parent_pid", str(os.getpid() + 10_000_000)],  # never our pid
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "that started this refresher is gone" in proc.stderr
    assert not (tmp_path / store.INDEX_DIR).exists()  # nothing embedded for a dead run


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_the_refresher_dies_with_its_trainer_killed_by_signal_9(tmp_path):
    """refresh.mode=subprocess: kill -9 the trainer, and its refresher stops too, rather than
    embedding checkpoints for a run that is gone."""
    log = tmp_path / "train.log"
    work = tmp_path / "run"
    with log.open("w") as out:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "realm_jax.train", "--config", "configs/tiny.py",
             "--workdir", str(work), "--config.refresh.mode=subprocess",
             "--config.train.steps=100000", "--config.refresh.wait_timeout_s=600"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (found := re.search(r"refresher started \(pid (\d+)\)", log.read_text())):
            assert trainer.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline, "no refresher started within 300 s"
            time.sleep(0.2)
        child = int(found.group(1))
        assert _alive(child)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    deadline = time.time() + 60
    while _alive(child):
        if time.time() > deadline:
            os.kill(child, signal.SIGKILL)
            pytest.fail(f"refresher pid {child} outlived its trainer by 60 s")
        time.sleep(0.2)
