"""An unreadable newest checkpoint (a truncated file) costs one line, not hundreds of
traceback lines: training falls back to the newest step that reads; `answer` / `evaluate`
name the step and the steps that load. A checkpoint of another model is named as such."""

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from realm_jax import defaults, restore, run_checkpoints
from realm_jax.evaluate import run as evaluate_run
from realm_jax.inference import Realm
from realm_jax.restore import CheckpointUnreadable, ModelChanged, reason
from realm_jax.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
    return defaults.load_config("configs/tiny.py", overrides)


def truncate_biggest_file(item_dir):
    """Cut the biggest file of a checkpoint item in half (a full disk, an interrupted copy)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(item_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    return biggest


def steps(workdir):
    manager = run_checkpoints.checkpoint_manager(workdir, read_only=True)
    try:
        return manager.all_steps()
    finally:
        manager.close()


def test_reason_keeps_the_first_line_without_the_tensorstore_spec():
    error = Exception("Encountered error while reading array index: (slice(0, 3, 1),). See "
                      "full TensorStore details: <bound method ...\n  'base': {\n")
    assert reason(error) == "Encountered error while reading array index: (slice(0, 3, 1),)"


def test_closed_loop_reports_are_dropped_and_others_passed_on(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    restore._drop_closed_loop_reports()
    restore._drop_closed_loop_reports()  # once only: not a chain of two filters
    closed = SimpleNamespace(object=None, exc_value=RuntimeError("Event loop is closed"))
    other = SimpleNamespace(object=None, exc_value=RuntimeError("something else"))
    owned = SimpleNamespace(object=object(), exc_value=RuntimeError("Event loop is closed"))
    cut = Exception("Encountered error while reading array index")
    cut.__cause__ = GeneratorExit()
    abandoned = SimpleNamespace(object=SimpleNamespace(__qualname__=restore._ABANDONED_READ),
                                exc_value=cut)
    mine = SimpleNamespace(object=SimpleNamespace(__qualname__="my_coroutine"), exc_value=cut)
    for report in (closed, other, owned, abandoned, mine):
        sys.unraisablehook(report)
    assert seen == [other, owned, mine]


@pytest.mark.slow
def test_unreadable_newest_checkpoint(tmp_path, eight_devices, caplog):
    work = tmp_path / "run"
    train(tiny(**{"train.steps": 2}), work, progress=False)
    truncate_biggest_file(work / "checkpoints" / "2" / "encoder")

    # Training: one line naming the step, then on from step 1.
    with caplog.at_level(logging.WARNING, logger="realm_jax.restore"):
        result = train(tiny(**{"train.steps": 3}), work, progress=False)
    unreadable = [r.getMessage() for r in caplog.records if r.name == "realm_jax.restore"]
    assert len(unreadable) == 1 and "\n" not in unreadable[0], unreadable
    assert unreadable[0].startswith(f"checkpoint {work}/checkpoints/2 is unreadable: ")
    assert unreadable[0].endswith("; falling back to step 1")
    assert result.origin == "workdir" and [h["step"] for h in result.history] == [2, 3]
    assert steps(work) == [1, 2, 3]  # step 2 saved again, the broken one moved aside
    assert [p.name.split("-")[0] for p in (work / "checkpoints.unreadable").iterdir()] == ["2"]

    # Another model's config: named as such, no fallback, config.json left as it was.
    saved = (work / "config.json").read_text()
    with pytest.raises(ModelChanged, match=f"{work}/checkpoints/3 holds another model than "
                                           r"the config's \(an array of shape"):
        train(tiny(**{"train.steps": 4, "model.proj_size": 8}), work, progress=False)
    assert (work / "config.json").read_text() == saved

    # answer / evaluate: name the step and the steps that load.
    truncate_biggest_file(work / "checkpoints" / "3" / "embedder")
    message = (f"checkpoint {work}/checkpoints/3 is unreadable: .*; the steps that load: "
               r"\[1, 2\]: pass --step 2$")
    with pytest.raises(CheckpointUnreadable, match=message):
        Realm.load(work)
    with pytest.raises(CheckpointUnreadable, match=message):
        evaluate_run(str(work))
    assert Realm.load(work, step=2).step == 2
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "realm_jax.answer", "--workdir", str(work),
                           "who?"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), done.stderr[-3000:]
    assert lines[0].endswith("; the steps that load: [1, 2]: pass --step 2")
