"""launch/env.sh, the installer both launch scripts source: it refuses to start an install that
the disk cannot hold (a CI run once died in pip with `[Errno 28] No space left on device`,
leaving a half-installed .venv), and it installs when there is room.

Each test runs env.sh in a throw-away copy of the project root whose `.venv` is fake: its
`python` records what it was asked to do, and a fake `df` on PATH reports the free space.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _root(tmp_path: Path, free_kb: int) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "root"
    (root / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "env.sh", root / "launch" / "env.sh")
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _executable(venv_bin / "python", f'#!/bin/sh\necho "$*" >> "{root}/python_calls"\n')
    (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
    fake = tmp_path / "bin"
    fake.mkdir()
    _executable(fake / "df", "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available "
                f"Capacity Mounted'\necho '/dev/x 100000000 1 {free_kb} 1% /'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALM_")}
    env["PATH"] = f"{fake}:{env['PATH']}"
    return root, env


def _source(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "source launch/env.sh test"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_too_little_disk_refuses_before_pip_with_the_numbers(tmp_path):
    root, env = _root(tmp_path, free_kb=300 * 1024)  # 300 MB
    out = _source(root, env)
    assert out.returncode == 1
    assert "needs ~3 GB free" in out.stderr and "only 300 MB" in out.stderr, out.stderr
    assert not (root / "python_calls").exists()  # pip never started
    assert not list((root / ".venv").glob(".realm_jax-installed-*"))


def test_enough_disk_installs_and_the_threshold_is_a_setting(tmp_path):
    root, env = _root(tmp_path, free_kb=300 * 1024)
    out = _source(root, {**env, "REALM_INSTALL_FREE_GB": "0"})
    assert out.returncode == 0, out.stderr
    calls = (root / "python_calls").read_text()
    assert "pip install -q -e .[test]" in calls
    assert (root / ".venv" / ".realm_jax-installed-test").exists()
