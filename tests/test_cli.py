"""Every command's errors a user can fix are one line (`error: ...`, status 1, no traceback),
and `--help` exits 0 (realm_jax.cli)."""

import os
import subprocess
import sys

import pytest

from realm_jax import cli
from realm_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["realm_jax.train", "realm_jax.answer", "realm_jax.evaluate", "realm_jax.refresh",
            "realm_jax.convert"]


def command(*argv, cwd=REPO):
    """A command's (status, stdout, stderr) on one CPU device."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def one_line_error(status, err) -> str:
    """The error line of a command that failed the way a user error should."""
    assert status == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    return last


@pytest.mark.parametrize("module, flag", [(m, "--help") for m in COMMANDS] +
                         [("realm_jax.train", "--helpfull")])
def test_help_exits_zero(module, flag):
    status, out, err = command(module, flag)
    assert status == 0, err[-2000:]
    assert "--workdir" in out or "--out" in out


def test_a_config_key_typo_is_one_line_with_the_suggestion(tmp_path):
    status, _, err = command("realm_jax.train", "--config", "configs/tiny.py", "--workdir",
                             str(tmp_path / "run"), "--config.train.stepz=3")
    assert one_line_error(status, err) == (
        'error: --config.train.stepz: no such config key \'stepz\'; Did you mean "steps" '
        'instead of "stepz"?')
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_is_one_line_and_leaves_no_workdir(tmp_path):
    status, _, err = command("realm_jax.train", "--config", "configs/nope.py", "--workdir",
                             str(tmp_path / "run"))
    assert one_line_error(status, err) == (
        "error: --config=configs/nope.py: cannot load the config file: [Errno 2] No such file "
        "or directory: 'configs/nope.py'")
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_value_is_one_line():
    status, _, err = command("realm_jax.answer", "--workdir", "W", "--k", "-1", "q")
    assert err.strip() == ("error: flag --k=-1: -1 is not a positive integer (--helpshort "
                           "lists the flags)")
    assert status == 1


def test_one_line_errors_in_process():
    @cli.one_line_errors
    def fails(error):
        raise error

    assert cli.one_line(KeyError("k")) == "k"
    for error, line in ((UserError("a\n  b"), "error: a; b"), (ValueError("bad"), "error: bad"),
                        (UserError(KeyError("'x'\nDid you mean y?")),
                         "error: 'x'; Did you mean y?"),
                        (FileNotFoundError("no file"), "error: no file")):
        with pytest.raises(SystemExit) as exit_:
            fails(error)
        assert exit_.value.code == line
    with pytest.raises(RuntimeError):  # not a user error: its traceback is kept
        fails(RuntimeError("bug"))


def test_leftovers_of_a_reported_error_print_nothing_at_exit():
    """A coroutine that fails when collected after `error: …` was printed (orbax's pending
    reads of an unreadable checkpoint) must not add a traceback to the one line."""
    script = (
        "import types\n"
        "from realm_jax import cli\n"
        "from realm_jax.errors import UserError\n"
        "@types.coroutine\n"
        "def pause():\n"
        "    yield\n"
        "async def read():\n"
        "    try:\n"
        "        await pause()\n"
        "    finally:\n"
        "        raise RuntimeError('pending read')  # when collected\n"
        "KEEP = []\n"
        "def main(argv):\n"
        "    coroutine = read()\n"
        "    coroutine.send(None)  # suspended, as orbax's reads are\n"
        "    KEEP.append(coroutine)\n"
        "    raise UserError('checkpoint 3 is unreadable')\n"
        "cli.run(main)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: checkpoint 3 is unreadable", done.stderr


def test_orbax_info_lines_are_dropped_its_warnings_and_ours_kept():
    import logging as std_logging

    def record(path: str, level: int) -> std_logging.LogRecord:
        return std_logging.LogRecord("absl", level, path, 1, "m", None, None)

    keep = cli._NoLibraryInfo().filter
    site = "/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
    assert not keep(record(site, std_logging.INFO))
    assert keep(record(site, std_logging.WARNING))
    assert keep(record("/work/realm_jax/train.py", std_logging.INFO))
