"""Restoring a run's checkpoints when one may be unreadable, or of another model.

A checkpoint's files can be truncated or lost after orbax committed them (a full disk, a copy
tool, a person). orbax then raises a bare `Exception` whose message is a TensorStore spec
dozens of lines long, and its worker threads print more tracebacks on the way out. Here every
failure becomes one line naming the step's directory:

  * `CheckpointUnreadable`: the files of that step cannot be read. The trainer falls back to
    the newest step that reads (`restore_newest`, saying so); `answer` / `evaluate` name the
    steps that do load, for `--step` (`inference.Realm.load`).
  * `ModelChanged`: the files read, but hold another model than the config's (orbax's advice,
    `strict=False`, would pad or cut the arrays: never what we want). No older step would
    fit either, so there is no fallback.

When one read fails, orbax's event loop closes with the other reads still in flight;
TensorStore completes them later and each completion reports `RuntimeError('Event loop is
closed')` through `sys.unraisablehook`: dozens of tracebacks after the one line, in some runs
and not others. `restore_step` drops exactly those (`_drop_closed_loop_reports`).

Every read-only use of a workdir's checkpoints goes through `reading` (opened read-only,
closed whatever happens) and, for towers, `read_towers`: the trainer's resume
(`restore_newest`), a run loaded as pretrained weights, inference and the refresher.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from realm_jax import multihost, run_checkpoints
from realm_jax.errors import UserError

log = logging.getLogger(__name__)

_SHAPE = re.compile(r"Requested shape: (\(.*?\)) is not compatible with the stored shape: "
                    r"(\(.*?\))")
_TREE = re.compile(r"tree structures do not match:\s*\n\s*(\S+?):?\s*\n")


class CheckpointUnreadable(UserError):
    """A checkpoint's files cannot be read (truncated, missing, not orbax's)."""


class ModelChanged(UserError):
    """A checkpoint holds another model than the config describes."""


def reason(error: BaseException) -> str:
    """orbax's error in a few words: its first line, cut short (the rest is a long spec)."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    first = re.sub(r"\. See full TensorStore details:.*", "", first)
    return first if len(first) <= 160 else first[:157] + "..."


_ABANDONED_READ = "_read_array_index_and_device_put"  # orbax's per-shard read coroutine


def _is_closed_loop_report(report: Any) -> bool:
    """A read orbax abandoned after another one failed: completed by TensorStore after its
    event loop closed, or its coroutine closed unfinished when collected (GeneratorExit)."""
    if report.object is None:
        return (isinstance(report.exc_value, RuntimeError)
                and str(report.exc_value) == "Event loop is closed")
    return (getattr(report.object, "__qualname__", "") == _ABANDONED_READ
            and isinstance(getattr(report.exc_value, "__cause__", None), GeneratorExit))


def _drop_closed_loop_reports() -> None:
    """Install (once) an unraisable hook that drops `_is_closed_loop_report`s and passes on
    everything else. Installed before the read, not after it fails: the reports can come
    before the error reaches `restore_step`."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(report: Any) -> None:
        if not _is_closed_loop_report(report):
            previous(report)

    hook.drops_closed_loop_reports = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def step_dir(manager: Any, step: int) -> str:
    return f"{manager.directory}/{step}"


def restore_step(manager: Any, step: int, items: Mapping[str, Any]) -> dict[str, Any]:
    """`run_checkpoints.restore_items`, with its failures as one-line errors naming the step.

    Raises:
      ModelChanged: the arrays have other shapes, or the tree other parameters, than `items`.
      CheckpointUnreadable: anything else that stops the read.
    """
    _drop_closed_loop_reports()
    try:
        return run_checkpoints.restore_items(manager, step, items)
    except Exception as e:  # noqa: BLE001  orbax raises bare Exceptions for unreadable files
        text, where = str(e), step_dir(manager, step)
        shape, tree = _SHAPE.search(text), _TREE.search(text)
        if shape or tree:
            differs = (f"an array of shape {shape[2]} where the config's model has {shape[1]}"
                       if shape else f"its parameters differ at {tree[1]}")
            raise ModelChanged(
                f"{where} holds another model than the config's ({differs}): use the config "
                "it was trained with, or a new workdir") from None
        raise CheckpointUnreadable(f"checkpoint {where} is unreadable: {reason(e)}") from None


def _read_everywhere(manager: Any, step: int, items: Mapping[str, Any]
                     ) -> tuple[dict[str, Any] | None, CheckpointUnreadable | None]:
    """(items, None) if every host read step `step`, else (None, the error): hosts must agree
    on the step they resume, so one host's unreadable shard fails it for all."""
    got, error = None, None
    try:
        got = restore_step(manager, step, items)
    except CheckpointUnreadable as e:
        error = e
    failed = multihost.gather(np.array([error is not None]))
    if failed.any() and error is None:
        error = CheckpointUnreadable(f"checkpoint {step_dir(manager, step)} is unreadable on "
                                     f"hosts {np.flatnonzero(failed).tolist()}")
    return (None, error) if error is not None else (got, None)


def restore_newest(manager: Any, items: Mapping[str, Any]
                   ) -> tuple[int, dict[str, Any], list[int]] | None:
    """The newest checkpoint that reads: (step, items, the newer steps that did not).

    Each unreadable step is logged in one line, with the step tried next. None when the
    manager has no checkpoint.

    Raises:
      CheckpointUnreadable: no step reads (the newest one's error, and every step named).
      ModelChanged: a step holds another model (see `restore_step`).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    unreadable: list[int] = []
    first_error = None
    for i, step in enumerate(steps):
        got, error = _read_everywhere(manager, step, items)
        if error is None:
            return step, got, unreadable
        unreadable.append(step)
        first_error = first_error or error
        then = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
        log.warning("%s; %s", error, then)
    if not steps:
        return None
    raise CheckpointUnreadable(f"{first_error}; no checkpoint in {manager.directory} reads "
                               f"(steps {sorted(unreadable)})")


@contextlib.contextmanager
def reading(workdir: Any) -> Iterator[Any]:
    """`workdir`'s checkpoints, opened read-only (another process may be writing them) and
    closed whatever happens."""
    manager = run_checkpoints.checkpoint_manager(workdir, read_only=True)
    try:
        yield manager
    finally:
        manager.close()


def read_towers(manager: Any, step: int | None,
                towers: Mapping[str, Any] | Callable[[list[str]], Mapping[str, Any]]
                ) -> tuple[int, dict[str, Any]]:
    """(step, {tower: params}) of checkpoint `step` (None: the newest).

    Args:
      towers: restore targets per tower (trees of ShapeDtypeStruct with shardings, or None:
        as saved, on the host), or a function of the saved towers' names that returns them
        (choose by what the checkpoint holds).

    Raises:
      FileNotFoundError: no checkpoint at all, or no step `step` (the steps there named).
      CheckpointUnreadable / ModelChanged: as `restore_step`.
    """
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{manager.directory} holds no checkpoint yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{manager.directory} has no step {step}; available: {steps}")
    if callable(towers):
        towers = towers(list(restore_step(manager, step, {"meta": None})["meta"]["towers"]))
    return step, restore_step(manager, step, towers)
