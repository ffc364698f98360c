"""Versioned index store: how the refresher hands a new block index to the trainer.

Layout (DESIGN.md §4)::

  WORKDIR/index/v<step>/embeddings.npy   [num_blocks, dim] float32, or bfloat16 as uint16 bits
  WORKDIR/index/v<step>/<extras>         e.g. the ScaNN searcher, written by `write_extra`
  WORKDIR/index/v<step>/meta.json        step, num_blocks, dim, dtype, size + sha256 of every
                                         file above, created time, and the caller's meta
  WORKDIR/index/LATEST                   one line "v<step>": the only thing readers trust
  WORKDIR/index/.tmp-*                   staging dirs, LATEST temp files, versions being deleted

Protocol. `publish` writes everything into `.tmp-<uuid>/`, hashes and fsyncs it, renames it to
`v<step>/` and only then replaces `LATEST` (temp file + fsync + rename), so a reader that
follows `LATEST` never sees a half-written version, and a crash at any point leaves `LATEST`
naming the previous complete version. Readers still verify sizes and sha256 of every file
against meta.json, because a disk, a copy tool or a person can break a version afterwards.

Object stores (gs://, s3://) have no atomic directory rename. There the staged files are copied
into `v<step>/` with meta.json copied last, and `LATEST` (a single object PUT, which is atomic)
is written after that, so the pointer file is still the only thing readers trust.

bfloat16: numpy has no bf16, and `np.save` of an `ml_dtypes.bfloat16` array writes the opaque
descr `|V2` that loads back as raw void. We store the uint16 bit pattern (`<u2`, readable by any
numpy) with `"dtype": "bfloat16"` in meta.json, and `load_version` views it back as
`ml_dtypes.bfloat16` (the same dtype as `jnp.bfloat16`). Loading uses `allow_pickle=False`.

Stale `.tmp-*` entries (left by a crashed publisher) are deleted by `prune` only when nothing
inside them was modified for `tmp_grace_s` seconds (default 6 h) and this process is not
staging into them. A concurrent publisher in another process keeps writing files while it
stages, so its directory stays fresh; a publisher that holds a staging dir idle for longer than
the grace (e.g. a very long in-memory ScaNN build before writing it) must raise `tmp_grace_s`.
Where an object store reports no modification time, the entry is kept (never guess).

One publisher per workdir is the intended use (DESIGN.md: one refresher). `publish` refuses to
overwrite the version `LATEST` names or to move `LATEST` backwards; use `set_latest` to roll back.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from realm_jax.retrieval import durable

log = logging.getLogger(__name__)

INDEX_DIR = "index"
LATEST = "LATEST"
EMBEDDINGS = "embeddings.npy"
META = "meta.json"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
DEFAULT_TMP_GRACE_S = 6 * 3600.0
# Logical dtype name → dtype of the array inside embeddings.npy (bf16 as its uint16 bits).
STORED_DTYPES = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}
# Keys publish writes itself; a caller's meta may not shadow them.
RESERVED_META = ("format", "step", "num_blocks", "dim", "dtype", "files", "created")

_VERSION_RE = re.compile(r"v(\d+)")
# Staging dirs this process is writing right now: `prune` never deletes them, whatever their age.
_ACTIVE_STAGING: set[str] = set()
_ACTIVE_LOCK = threading.Lock()

PathLike = str | os.PathLike


class IndexStoreError(ValueError):
    """A version on disk is torn, corrupt, or not the one the caller expects."""


class LatestAhead(IndexStoreError):
    """`publish` of a step older than the one LATEST names (a rollback, an edited LATEST,
    or another publisher)."""


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare by identity
class IndexVersion:
    """One validated index version, fully in host memory.

    Attributes:
      step: the training step whose checkpoint produced these embeddings.
      embeddings: [num_blocks, dim] float32 or ml_dtypes.bfloat16, read-only (shared between the
        watcher thread and the trainer, so nobody may modify it in place).
      meta: the whole meta.json, including the caller's keys.
      path: the version directory, e.g. WORKDIR/index/v500 (extras such as ScaNN files live here).
    """

    step: int
    embeddings: np.ndarray
    meta: dict[str, Any]
    path: epath.Path

    @property
    def num_blocks(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


# --------------------------------------------------------------------------- layout


def _index_dir(workdir: PathLike) -> epath.Path:
    return epath.Path(workdir) / INDEX_DIR


def _version_name(step: int) -> str:
    return f"v{step}"


def version_path(workdir: PathLike, step: int) -> epath.Path:
    """WORKDIR/index/v<step> (whether or not it exists)."""
    return _index_dir(workdir) / _version_name(step)


# --------------------------------------------------------------------------- LATEST


def _read_latest(index: epath.Path) -> int | None:
    latest = index / LATEST
    try:
        raw = latest.read_bytes()
    except FileNotFoundError:
        return None
    # Bytes first: garbage that is not even text must be refused naming the file too.
    m = _VERSION_RE.fullmatch(raw.strip().decode("ascii", errors="replace"))
    if m is None:
        present = [s for s, _ in _list_versions(index)]
        raise IndexStoreError(
            f"{latest}: expected one line 'v<step>', found {raw[:80]!r}; versions present: "
            f"{present} (point it at one with store.set_latest, or remove it to start over)")
    return int(m.group(1))


def _write_latest(index: epath.Path, step: int) -> None:
    """Points LATEST at v<step>: atomic replace locally, one object PUT on object stores."""
    latest = index / LATEST
    data = f"{_version_name(step)}\n".encode()
    if not durable.is_local(index):
        latest.write_bytes(data)  # a single object write is atomic on GCS / S3
        return
    tmp = index / f"{TMP_PREFIX}{LATEST}-{uuid.uuid4().hex}"
    try:
        durable.write_durable(tmp, lambda f: f.write(data))
        os.replace(os.fspath(tmp), os.fspath(latest))
    finally:
        tmp.unlink(missing_ok=True)
    durable.fsync_dir(index)


def latest_step(workdir: PathLike) -> int | None:
    """The step LATEST names, or None before the first publish. Cheap: reads only LATEST.

    Raises:
      IndexStoreError: LATEST exists but is not one line "v<step>".
    """
    return _read_latest(_index_dir(workdir))


def _list_versions(index: epath.Path) -> list[tuple[int, epath.Path]]:
    """(step, dir) of every v<step> directory, newest first."""
    if not index.exists():
        return []
    out = []
    for entry in index.iterdir():
        m = _VERSION_RE.fullmatch(entry.name)
        if m and entry.is_dir():
            out.append((int(m.group(1)), entry))
    return sorted(out, key=lambda sv: sv[0], reverse=True)


def list_steps(workdir: PathLike) -> list[int]:
    """Steps of all version directories present (complete or not), newest first."""
    return [s for s, _ in _list_versions(_index_dir(workdir))]


# --------------------------------------------------------------------------- publish


def _to_storable(embeddings: Any) -> tuple[np.ndarray, str]:
    """Host array as written to embeddings.npy, plus its logical dtype name."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be [num_blocks, dim], got shape {array.shape}")
    if array.dtype == np.float32:
        name = "float32"
    elif array.dtype == np.dtype(ml_dtypes.bfloat16):
        name = "bfloat16"
    else:
        raise ValueError(f"embeddings dtype must be float32 or bfloat16, got {array.dtype}")
    # Refuse before anything is written: a NaN index silently ruins every retrieval after it.
    if not np.isfinite(array.astype(np.float32) if name == "bfloat16" else array).all():
        raise ValueError("embeddings contain NaN or Inf: refusing to publish them")
    stored = array.view(np.uint16) if name == "bfloat16" else array
    return np.ascontiguousarray(stored, dtype=STORED_DTYPES[name]), name


def _install(staging: epath.Path, final: epath.Path, files: Mapping[str, Any]) -> None:
    """Makes the staged version visible as `final` (still unreferenced until LATEST moves)."""
    index = final.parent
    if durable.is_local(final):
        if final.exists():  # left by a crash between this rename and the LATEST update
            trash = index / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            os.rename(os.fspath(final), os.fspath(trash))
            durable.rmtree(trash)
        os.rename(os.fspath(staging), os.fspath(final))
        durable.fsync_dir(index)
        return
    # Object store: no directory rename. Copy, meta.json last, so a v<step> without meta.json
    # is visibly unfinished; readers still only follow LATEST, which is written after this.
    durable.rmtree(final)
    for rel in [*(r for r in files if r != META), META]:
        dst = final / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).copy(dst, overwrite=True)
    durable.rmtree(staging)


def publish(
    workdir: PathLike,
    step: int,
    embeddings: Any,
    meta: Mapping[str, Any] | None = None,
    *,
    keep: int = 3,
    write_extra: Callable[[epath.Path], None] | None = None,
    tmp_grace_s: float = DEFAULT_TMP_GRACE_S,
) -> epath.Path:
    """Writes index version v<step> and points LATEST at it, crash-safely.

    Args:
      workdir: the run's workdir (local or gs://); the index lives in WORKDIR/index.
      step: the checkpoint step the embeddings were computed from.
      embeddings: [num_blocks, dim] float32 or bfloat16 (numpy, ml_dtypes or a jax array).
      meta: extra JSON-serialisable keys for meta.json (checkpoint step, model config hash,
        corpus fingerprint, ...), so readers can demand them with `load_latest(expect=...)`.
      keep: how many newest versions to keep after publishing (the LATEST one is always kept).
      write_extra: called with the staging dir before hashing, to write extra files (the ScaNN
        searcher, into a subdirectory); they are hashed into meta.json like the embeddings.
      tmp_grace_s: age after which stale `.tmp-*` entries are deleted (see module docstring).

    Returns:
      The published version directory, WORKDIR/index/v<step>.

    Raises:
      ValueError: bad embeddings or meta.
      LatestAhead (an IndexStoreError): `step` is older than the one LATEST names.
      FileExistsError: LATEST already names v<step> (the live version is never overwritten).
    """
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    step = int(step)
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    array, dtype_name = _to_storable(embeddings)
    user_meta = dict(meta or {})
    if clash := sorted(set(user_meta) & set(RESERVED_META)):
        raise ValueError(f"meta keys {clash} are reserved (written by publish): {RESERVED_META}")
    try:
        json.dumps(user_meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from e

    index = _index_dir(workdir)
    index.mkdir(parents=True, exist_ok=True)
    live = _read_latest(index)
    if live == step:
        raise FileExistsError(f"{index / LATEST} already names v{step}: publish a newer step")
    if live is not None and step < live:
        present = [s for s, _ in _list_versions(index)]
        missing = "" if live in present else ", which does not exist"
        raise LatestAhead(
            f"{index / LATEST} names v{live}{missing}; refusing to publish older v{step} "
            f"(versions present: {present}); point LATEST at a present version with "
            "store.set_latest() (the way to roll back on purpose)")

    final = index / _version_name(step)
    staging = index / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    with _ACTIVE_LOCK:
        _ACTIVE_STAGING.add(os.fspath(staging))
    try:
        staging.mkdir()
        durable.write_durable(staging / EMBEDDINGS, lambda f: np.save(f, array, allow_pickle=False))
        if write_extra is not None:
            write_extra(staging)
        files = durable.manifest(staging)
        if META in files:
            raise ValueError(f"write_extra wrote {staging / META}: that name is reserved")
        full_meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "num_blocks": int(array.shape[0]),
            "dim": int(array.shape[1]),
            "dtype": dtype_name,
            "files": files,
            "created": datetime.datetime.now(datetime.UTC).isoformat(),
            **user_meta,
        }
        payload = json.dumps(full_meta, indent=1, sort_keys=True).encode()
        durable.write_durable(staging / META, lambda f: f.write(payload))
        if durable.is_local(staging):
            durable.fsync_dir(staging)
        _install(staging, final, {**files, META: None})
        _write_latest(index, step)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_STAGING.discard(os.fspath(staging))
        durable.rmtree(staging)  # no-op after a successful install; frees disk after a failure
    log.info("published index %s (%d x %d %s)", final, array.shape[0], array.shape[1], dtype_name)
    prune(workdir, keep, tmp_grace_s=tmp_grace_s)
    return final


def prune(
    workdir: PathLike, keep: int = 3, *, tmp_grace_s: float = DEFAULT_TMP_GRACE_S
) -> list[epath.Path]:
    """Deletes all but the newest `keep` versions (never the LATEST one) and stale `.tmp-*`.

    Versions are first renamed into `.tmp-*` (locally), so a reader sees a version whole or not
    at all, never half-deleted; a crash mid-delete leaves only a `.tmp-*` for the next prune.

    Args:
      workdir: the run's workdir.
      keep: number of newest versions to keep, in addition to the one LATEST names.
      tmp_grace_s: `.tmp-*` entries untouched for this long and not being staged by this
        process are treated as left by a crash and deleted.

    Returns:
      The paths deleted.
    """
    index = _index_dir(workdir)
    if not index.exists():
        return []
    removed = []
    try:
        live = _read_latest(index)
    except IndexStoreError as e:
        # Without a readable LATEST we cannot tell which version is live: delete none.
        log.warning("not pruning index versions: %s", e)
    else:
        for i, (step, path) in enumerate(_list_versions(index)):
            if i < keep or step == live:
                continue
            if durable.is_local(path):
                trash = index / f"{TMP_PREFIX}{uuid.uuid4().hex}"
                try:
                    os.rename(os.fspath(path), os.fspath(trash))
                except FileNotFoundError:  # a concurrent prune got there first
                    continue
                durable.rmtree(trash)
            else:
                durable.rmtree(path)
            removed.append(path)
    now = time.time()
    for entry in index.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        with _ACTIVE_LOCK:
            if os.fspath(entry) in _ACTIVE_STAGING:
                continue
        newest = durable.newest_mtime(entry)
        if newest is not None and now - newest >= tmp_grace_s:
            durable.rmtree(entry)
            removed.append(entry)
    if removed:
        log.info("pruned %s", ", ".join(p.name for p in removed))
    return removed


# --------------------------------------------------------------------------- load


def _check_meta(meta_path: epath.Path, meta: Any, step: int) -> dict[str, Any]:
    """Validates the fields publish writes; every error names meta.json and the field."""
    if not isinstance(meta, dict):
        raise IndexStoreError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    for key in RESERVED_META:
        if key not in meta:
            raise IndexStoreError(f"{meta_path}: field {key!r} is missing")
    for key in ("step", "num_blocks", "dim"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise IndexStoreError(f"{meta_path}: field {key!r} must be an int >= 0: {meta[key]!r}")
    if meta["step"] != step:
        raise IndexStoreError(f"{meta_path}: field 'step' is {meta['step']}, expected {step}")
    if meta["dtype"] not in STORED_DTYPES:
        raise IndexStoreError(
            f"{meta_path}: field 'dtype' is {meta['dtype']!r}, expected one of "
            f"{sorted(STORED_DTYPES)}"
        )
    files = meta["files"]
    if not isinstance(files, dict) or EMBEDDINGS not in files:
        raise IndexStoreError(f"{meta_path}: field 'files' must list {EMBEDDINGS}")
    for rel, entry in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts or rel == META:
            raise IndexStoreError(f"{meta_path}: field 'files' lists an invalid path {rel!r}")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise IndexStoreError(
                f"{meta_path}: field 'files' entry {rel!r} needs 'sha256' (str) and 'bytes' (int)"
            )
    return meta


def _check_expect(
    meta_path: epath.Path, meta: Mapping[str, Any], expect: Mapping[str, Any]
) -> None:
    for key, want in expect.items():
        if key not in meta:
            raise IndexStoreError(f"{meta_path}: field {key!r} is missing (expected {want!r})")
        # Compare as JSON would store it, so a tuple expectation matches a stored list.
        want_json = json.loads(json.dumps(want))
        if meta[key] != want_json:
            raise IndexStoreError(
                f"{meta_path}: field {key!r} is {meta[key]!r}, expected {want_json!r}"
            )


def _open_listed(path: epath.Path, meta_path: epath.Path) -> Any:
    try:
        return open(os.fspath(path), "rb") if durable.is_local(path) else path.open("rb")
    except FileNotFoundError:
        raise IndexStoreError(
            f"{path}: listed in {meta_path} but missing (torn or deleted version)"
        ) from None


def _verify(f: Any, path: epath.Path, meta_path: epath.Path, entry: Mapping[str, Any]) -> None:
    digest, size = durable.sha256_file(f)
    if size != entry["bytes"]:
        raise IndexStoreError(
            f"{path}: {size} bytes, but {meta_path} says {entry['bytes']} (truncated or torn)"
        )
    if digest != entry["sha256"]:
        raise IndexStoreError(
            f"{path}: sha256 {digest[:16]}… does not match {meta_path} "
            f"({entry['sha256'][:16]}…): the file is corrupt"
        )


def load_version(
    workdir: PathLike, step: int, expect: Mapping[str, Any] | None = None
) -> IndexVersion:
    """Loads and validates WORKDIR/index/v<step>.

    Cheap checks come first (meta.json fields, `expect`), then the size and sha256 of every
    listed file, then the array's dtype and shape against meta.json.

    Args:
      workdir: the run's workdir.
      step: which version.
      expect: meta.json fields that must have these values, e.g.
        {"num_blocks": N, "dim": 128, "corpus_fingerprint": fp}.

    Raises:
      FileNotFoundError: there is no v<step> directory.
      IndexStoreError (a ValueError): torn, corrupt or mismatched; the message names the file
        and the field.
    """
    version_dir = _index_dir(workdir) / _version_name(step)
    meta_path = version_dir / META
    try:
        text = meta_path.read_text()
    except FileNotFoundError:
        if not version_dir.exists():
            raise FileNotFoundError(f"{version_dir}: no such index version") from None
        raise IndexStoreError(f"{meta_path}: missing (torn or unfinished version)") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise IndexStoreError(f"{meta_path}: not valid JSON ({e})") from None
    meta = _check_meta(meta_path, raw, step)
    if expect:
        _check_expect(meta_path, meta, expect)

    for rel, entry in meta["files"].items():
        if rel == EMBEDDINGS:
            continue
        with _open_listed(version_dir / rel, meta_path) as f:
            _verify(f, version_dir / rel, meta_path, entry)

    emb_path = version_dir / EMBEDDINGS
    # One open file for hash and load: even if the version is replaced meanwhile, we parse
    # exactly the bytes we hashed.
    with _open_listed(emb_path, meta_path) as f:
        _verify(f, emb_path, meta_path, meta["files"][EMBEDDINGS])
        f.seek(0)
        try:
            array = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise IndexStoreError(f"{emb_path}: not a readable .npy array ({e})") from None
    stored = STORED_DTYPES[meta["dtype"]]
    if array.dtype != stored:
        raise IndexStoreError(
            f"{emb_path}: stored dtype {array.dtype}, but {meta_path} field 'dtype' "
            f"{meta['dtype']!r} needs {stored}"
        )
    want_shape = (meta["num_blocks"], meta["dim"])
    if array.shape != want_shape:
        raise IndexStoreError(
            f"{emb_path}: shape {array.shape}, but {meta_path} fields 'num_blocks', 'dim' "
            f"say {want_shape}"
        )
    if meta["dtype"] == "bfloat16":
        array = array.view(ml_dtypes.bfloat16)
    array.setflags(write=False)
    return IndexVersion(step=step, embeddings=array, meta=meta, path=version_dir)


def load_latest(
    workdir: PathLike, expect: Mapping[str, Any] | None = None, *, attempts: int = 5
) -> IndexVersion:
    """Loads and validates the version LATEST names.

    If the version disappears or fails validation while LATEST moved on meanwhile (a publisher
    pruned it), the new LATEST is tried instead, up to `attempts` times; a version that is
    still LATEST and fails is an error.

    Raises:
      FileNotFoundError: no LATEST yet (nothing published).
      IndexStoreError: the version LATEST names is torn, corrupt, or fails `expect`.
    """
    index = _index_dir(workdir)
    step = _read_latest(index)
    for attempt in range(attempts):
        if step is None:
            raise FileNotFoundError(f"{index / LATEST}: no index published yet")
        try:
            return load_version(workdir, step, expect)
        except (FileNotFoundError, IndexStoreError):
            now = _read_latest(index)
            if now == step or attempt == attempts - 1:
                raise
            step = now
    raise AssertionError("unreachable")


def set_latest(workdir: PathLike, step: int, expect: Mapping[str, Any] | None = None) -> None:
    """Points LATEST at an existing version after validating it (an operator's rollback).

    Raises:
      FileNotFoundError / IndexStoreError: as `load_version`; LATEST is then left unchanged.
    """
    load_version(workdir, step, expect)
    _write_latest(_index_dir(workdir), step)
