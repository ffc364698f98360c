"""One owner per workdir: an exclusive lock that dies with the process holding it.

Two trainers on one workdir would both resume, save the same steps twice and race to publish
the same index versions; two refreshers would race for the index's LATEST. So a trainer holds
WORKDIR/.lock and a refresher WORKDIR/index/.refresher.lock (different files: the trainer's
own refresher child must not meet the trainer's lock) for as long as it runs:

    with workdir_lock.hold(workdir_lock.trainer_lock(workdir), "trainer"):
        ...

The lock is an exclusive, non-blocking `fcntl.flock` on the file: the kernel drops it when the
holder exits, however it exits (kill -9 included), so a stale file never blocks a restart. The
holder writes its pid and host into the file, and a second process fails at once with a
`WorkdirBusy` naming them. The file itself stays: deleting it could let two processes lock two
different files of the same name.

Only local filesystems can be locked. A gs:// workdir (a pod) is not: it logs a warning, and
the launcher's pid files keep one trainer per VM. On several hosts the primary alone locks
and every host learns the outcome (a collective), so all of them stop together.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator

from etils import epath

from realm_jax import multihost
from realm_jax.errors import UserError

log = logging.getLogger(__name__)

TRAINER_LOCK = ".lock"
REFRESHER_LOCK = ".refresher.lock"  # in WORKDIR/index


class WorkdirBusy(UserError, RuntimeError):
    """Another process holds the lock."""


def trainer_lock(workdir: epath.PathLike) -> epath.Path:
    return epath.Path(workdir) / TRAINER_LOCK


def refresher_lock(workdir: epath.PathLike) -> epath.Path:
    from realm_jax.retrieval import store

    return epath.Path(workdir) / store.INDEX_DIR / REFRESHER_LOCK


def is_local(path: epath.PathLike) -> bool:
    return "://" not in str(path)


def make_dir(path: epath.PathLike, what: str = "directory") -> epath.Path:
    """Create `path` with its parents, or raise a UserError naming the file in the way (a
    workdir given as a file would otherwise fail with "[Errno 17] File exists")."""
    path = epath.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        where = f"{what} {path}" if file == path else f"{what} {path} cannot be made: {file}"
        raise UserError(f"{where} is a file, not a directory") from None
    return path


def other_holder(path: epath.PathLike) -> str | None:
    """Who holds the lock `path` if another process does (`holder`), else None: for an error
    message to name a concurrent writer only when one exists."""
    path = epath.Path(path)
    if not is_local(path) or not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # dropped by the close below
    except BlockingIOError:
        who, me = holder(path), f"pid {os.getpid()} on host {socket.gethostname()} "
        return None if who.startswith(me) else who
    finally:
        os.close(fd)
    return None


def holder(path: epath.PathLike) -> str:
    """Who the file says holds it: "pid P on host H (trainer, since ...)"."""
    try:
        info = json.loads(epath.Path(path).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']} ({info['what']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):  # being written, or not ours
        return "a process that has not written its pid yet"


class Lock:
    """A held lock; `release()` (or the process ending) gives it up."""

    def __init__(self, path: epath.Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def acquire(path: epath.PathLike, what: str) -> Lock:
    """Lock `path` for this process (created with its folder), or raise `WorkdirBusy` at once.

    Args:
      path: the lock file (`trainer_lock(workdir)`, `refresher_lock(workdir)`).
      what: who locks it ("trainer", "refresher"): written in the file and the errors.
    """
    path = epath.Path(path)
    if not is_local(path):
        log.warning("%s is not on a local filesystem: no lock; make sure a single %s uses it",
                    path, what)
        return Lock(path, None)
    make_dir(path.parent)
    # O_CLOEXEC (Python's default): a child process never inherits the lock, so it dies with
    # this process and not with the last of its children.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirBusy(
            f"{path} is held by {holder(path)}: another {what} is using "
            f"{path.parent}; stop it first or use another workdir") from None
    except BaseException:
        os.close(fd)
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return Lock(path, fd)


@contextlib.contextmanager
def hold(path: epath.PathLike, what: str) -> Iterator[Lock]:
    """`acquire` on the primary process, for the `with` block; every host raises `WorkdirBusy`
    when the primary could not lock (all hosts must enter this, as a collective)."""
    lock, error = Lock(epath.Path(path), None), None
    if multihost.is_primary():
        try:
            lock = acquire(path, what)
        except WorkdirBusy as e:
            error = e
    if not multihost.agree(error is None):
        raise error or WorkdirBusy(f"{path}: the primary process found another {what} there")
    try:
        yield lock
    finally:
        lock.release()
