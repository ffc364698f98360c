"""Durable file operations for the index store: fsync'd writes, sha256 manifests, tolerant
deletes, modification times — on local disks with POSIX durability (file and directory fsync),
on object stores (`scheme://`, through etils.epath) as well as they allow.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

_CHUNK = 1 << 22  # bytes hashed per read


def is_local(path: epath.Path) -> bool:
    """Local paths get fsync and atomic renames; `scheme://` paths take the copy route."""
    return "://" not in str(path)


def fsync_dir(path: epath.Path) -> None:
    """Makes a rename or a new entry in `path` durable (POSIX needs the directory fsynced)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rmtree(path: epath.Path) -> None:
    """Deletes a tree, tolerating a concurrent deleter (another prune) removing parts of it."""
    if not is_local(path):
        path.rmtree(missing_ok=True)
        return

    def ignore_missing(func: Any, p: str, exc: Any) -> None:
        err = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(err, FileNotFoundError):
            raise err

    if not os.path.lexists(os.fspath(path)):
        return
    if not os.path.isdir(os.fspath(path)) or os.path.islink(os.fspath(path)):
        path.unlink(missing_ok=True)
    elif sys.version_info >= (3, 12):
        shutil.rmtree(os.fspath(path), onexc=ignore_missing)
    else:
        shutil.rmtree(os.fspath(path), onerror=ignore_missing)


def walk_files(root: epath.Path) -> Iterator[tuple[str, epath.Path]]:
    """Yields (posix path relative to root, path) for every file under root, sorted."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            for rel, p in walk_files(entry):
                yield f"{entry.name}/{rel}", p
        else:
            yield entry.name, entry


def write_durable(path: epath.Path, write: Callable[[Any], None]) -> None:
    """Opens `path` for writing, calls `write(f)`, and on local disks fsyncs before returning."""
    if is_local(path):
        with open(os.fspath(path), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    else:
        with path.open("wb") as f:
            write(f)


def sha256_file(f: Any) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def manifest(staging: epath.Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every staged file; on local disks also fsyncs each file and dir."""
    files = {}
    for rel, path in walk_files(staging):
        if is_local(path):
            with open(os.fspath(path), "rb") as f:
                digest, size = sha256_file(f)
                os.fsync(f.fileno())
        else:
            with path.open("rb") as f:
                digest, size = sha256_file(f)
        files[rel] = {"sha256": digest, "bytes": size}
    if is_local(staging):
        for dirpath, _, _ in os.walk(os.fspath(staging)):
            fsync_dir(epath.Path(dirpath))
    return files


def newest_mtime(path: epath.Path) -> float | None:
    """Newest modification time of `path` and everything under it; None if unknown or gone."""
    try:
        if is_local(path):
            newest = os.lstat(os.fspath(path)).st_mtime
            for dirpath, dirnames, filenames in os.walk(os.fspath(path)):
                for name in dirnames + filenames:
                    try:
                        newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                    except FileNotFoundError:
                        pass
            return newest
        paths = [p for _, p in walk_files(path)] if path.is_dir() else [path]
        mtimes = [p.stat().mtime for p in paths]
        return max(mtimes) if mtimes and min(mtimes) > 0 else None
    except FileNotFoundError:
        return None
