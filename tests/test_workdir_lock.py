"""One trainer and one refresher per workdir: a second one fails at once, naming the holder's
pid and host, and a holder's death (kill -9 included) frees the workdir."""

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from realm_jax import defaults, workdir_lock
from realm_jax.errors import UserError
from realm_jax.retrieval import store
from realm_jax.retrieval.refresher import Refresher, publish_index
from realm_jax.train import train
from realm_jax.workdir_lock import WorkdirBusy, acquire, hold, refresher_lock, trainer_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time\n"
        "from realm_jax import workdir_lock\n"
        "locks = [workdir_lock.acquire(p, 'trainer') for p in sys.argv[1:]]\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")


def _holder(*paths):
    """Another process holding the lock files `paths` (until killed)."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, paths)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line == "locked\n", proc.stderr.read() if proc.poll() is not None else line
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def test_second_holder_fails_at_once_and_kill_9_frees_the_lock(tmp_path):
    path = trainer_lock(tmp_path)
    proc = _holder(path)
    try:
        with pytest.raises(WorkdirBusy, match=f"is held by pid {proc.pid} on host "
                                              f"{socket.gethostname()} .*another trainer"):
            acquire(path, "trainer")
    finally:
        _kill(proc)
    lock = acquire(path, "trainer")  # the kernel dropped the dead holder's lock
    assert f'"pid": {os.getpid()}' in path.read_text()
    lock.release()


def test_one_holder_per_lock_in_one_process_too_and_release(tmp_path):
    path = refresher_lock(tmp_path)
    assert path.parent == tmp_path / "index" and path != trainer_lock(tmp_path)
    with hold(path, "refresher"):
        with pytest.raises(WorkdirBusy, match="another refresher"):
            acquire(path, "refresher")
        acquire(trainer_lock(tmp_path), "trainer").release()  # the other lock is free
    acquire(path, "refresher").release()  # released at the end of the block


def test_a_workdir_on_gcs_is_not_locked(caplog):
    lock = acquire("gs://bucket/run/.lock", "trainer")
    lock.release()
    assert "not on a local filesystem" in caplog.text


def test_train_and_refresher_refuse_a_held_workdir(tmp_path, eight_devices):
    config = defaults.load_config("configs/tiny.py")
    proc = _holder(trainer_lock(tmp_path), refresher_lock(tmp_path))
    try:
        with pytest.raises(WorkdirBusy, match=f"pid {proc.pid} on host"):
            train(config, tmp_path, progress=False)
        assert not (tmp_path / "config.json").exists()  # nothing touched
        with pytest.raises(WorkdirBusy, match=f"pid {proc.pid} on host"):
            Refresher(config, tmp_path, progress=False).run(once=True)
        assert not (tmp_path / "index" / "LATEST").exists()
    finally:
        _kill(proc)
    assert workdir_lock.holder(trainer_lock(tmp_path)).startswith(f"pid {proc.pid} ")


def test_second_train_command_fails_in_one_line_naming_the_holder(tmp_path):
    proc = _holder(trainer_lock(tmp_path))
    try:
        env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(
            [sys.executable, "-m", "realm_jax.train", "--config", "configs/tiny.py",
             "--workdir", str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO,
            timeout=300)
    finally:
        _kill(proc)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {trainer_lock(tmp_path)} is held by pid {proc.pid} on host")


def test_other_holder_names_another_process_only(tmp_path):
    path = refresher_lock(tmp_path)
    assert workdir_lock.other_holder(path) is None  # no file
    with hold(path, "refresher"):
        assert workdir_lock.other_holder(path) is None  # this process
    proc = _holder(path)
    try:
        assert workdir_lock.other_holder(path).startswith(f"pid {proc.pid} on host")
    finally:
        _kill(proc)
    assert workdir_lock.other_holder(path) is None  # died: free


def test_publishing_behind_latest_names_a_refresher_only_when_its_lock_is_held(tmp_path):
    config = defaults.load_config("configs/tiny.py")
    embeddings = np.ones((4, 2), np.float32)
    publish_index(config, tmp_path, 2, embeddings, "fp")
    (tmp_path / "index" / "LATEST").write_text("v99\n")
    with pytest.raises(store.LatestAhead) as error:
        publish_index(config, tmp_path, 4, embeddings, "fp")
    assert "which does not exist" in str(error.value) and "refresher" not in str(error.value)
    proc = _holder(refresher_lock(tmp_path))
    try:
        with pytest.raises(store.LatestAhead, match=f"another refresher publishes into this "
                                                    f"index: pid {proc.pid} on host"):
            publish_index(config, tmp_path, 4, embeddings, "fp")
    finally:
        _kill(proc)


def test_a_workdir_that_is_a_file_is_named(tmp_path):
    config = defaults.load_config("configs/tiny.py")
    file = tmp_path / "afile"
    file.write_text("")
    with pytest.raises(UserError, match=f"^workdir {file} is a file, not a directory$"):
        train(config, file, progress=False)
    with pytest.raises(UserError, match=f"^workdir {file}/run cannot be made: {file} is a "
                                        "file, not a directory$"):
        train(config, file / "run", progress=False)
    with pytest.raises(UserError, match=f"^directory {file}/index cannot be made: {file} is"):
        Refresher(config, file, progress=False).run(once=True)
