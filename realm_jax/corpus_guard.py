"""A run resumes only on the corpus it started on: WORKDIR/corpus.json records it.

A checkpoint's data position counts batches of one sequence of examples, and the index
versions embed one list of blocks. Rebuild the corpus behind `data.corpus` with other
documents and resume, and the run would continue a position in a sequence that no longer
exists, and search or publish indexes of the wrong blocks, without a word. So the trainer
records the corpus's fingerprint (`BlockCorpus.fingerprint`: sha1 over its blocks' uids, in
order) when it starts, and on every later start in that workdir:

  * same fingerprint: resume as usual;
  * another one: refuse with `CorpusChanged`, naming both fingerprints and the record; unless
    `data.allow_corpus_change=True`, which restarts the data position from the first batch
    (parameters, optimiser state and step are kept) and moves the old index aside to
    WORKDIR/index.corpus-<old fingerprint>/ so a new one is built over the new blocks.

A workdir with nothing to resume yet (no checkpoint, no index) just takes the new record: a
first run that failed on a wrong corpus can be re-run on the right one.

A run that starts from another run's checkpoint (`config.resume`) takes that run's data
position too, so `check_source` holds it to the same rule against the source's record.
"""

from __future__ import annotations

import json
import logging

from etils import epath

from realm_jax import multihost, run_checkpoints, workdir_lock
from realm_jax.data.blocks import BlockCorpus
from realm_jax.errors import UserError
from realm_jax.retrieval import store

log = logging.getLogger(__name__)

RECORD = "corpus.json"
ALLOW_KEY = "data.allow_corpus_change"
_SAME, _CHANGED, _REFUSED = 0, 1, 2  # what the primary found, agreed by every host


class CorpusChanged(UserError):
    """The run in this workdir started on another corpus."""


def record_path(workdir: epath.PathLike) -> epath.Path:
    return epath.Path(workdir) / RECORD


def _describe(fingerprint: str, num_blocks: int, where: str) -> str:
    return f"{fingerprint[:12]}… ({num_blocks} blocks, {where})"


def _read_record(path: epath.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _both(old: dict, corpus: BlockCorpus) -> tuple[str, str]:
    """(the recorded corpus, `corpus`) described for a message."""
    return (_describe(old["fingerprint"], old.get("num_blocks", -1), old.get("description")),
            _describe(corpus.fingerprint, len(corpus), corpus.description))


def _has_state(workdir: epath.Path) -> bool:
    """Whether the workdir holds something made from its corpus: a checkpoint or an index."""
    ckpt = run_checkpoints.checkpoint_dir(workdir)
    has_step = ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())
    return has_step or bool(store.list_steps(workdir))


def _move_index_aside(workdir: epath.Path, old_fingerprint: str) -> epath.Path | None:
    """WORKDIR/index → WORKDIR/index.corpus-<fp>[-n]; refused while a refresher holds it."""
    index = workdir / store.INDEX_DIR
    if not index.exists():
        return None
    other = workdir_lock.other_holder(workdir_lock.refresher_lock(workdir))
    if other is not None:
        raise CorpusChanged(f"{index} is held by {other}: stop that refresher before "
                            f"{ALLOW_KEY}=True moves the old corpus's index aside")
    target = workdir / f"{store.INDEX_DIR}.corpus-{old_fingerprint[:12]}"
    n = 1
    while target.exists():
        n += 1
        target = workdir / f"{store.INDEX_DIR}.corpus-{old_fingerprint[:12]}-{n}"
    index.rename(target)
    return target


def _compare(workdir: epath.Path, corpus: BlockCorpus, allow_change: bool) -> bool:
    """The primary's side of `check`: whether the corpus changed (allowed); writes the record.

    Raises:
      CorpusChanged: the corpus changed and `allow_change` is False (nothing was written).
    """
    path = record_path(workdir)
    old = _read_record(path)
    if old is not None and old.get("fingerprint") == corpus.fingerprint:
        return False
    changed = old is not None and _has_state(workdir)
    if changed:
        was, now = _both(old, corpus)
        if not allow_change:
            raise CorpusChanged(
                f"{path}: this run started on corpus {was}, but data.corpus is now {now}: its "
                "checkpoints' data position and its index belong to the old blocks. Use a new "
                f"workdir, or set {ALLOW_KEY}=True to keep the parameters and restart the "
                "data position (the index is rebuilt)")
        moved = _move_index_aside(workdir, old["fingerprint"])
        log.warning("%s=True: corpus %s replaces %s; the data position restarts from the first "
                    "batch%s", ALLOW_KEY, now, was, f", old index moved to {moved}" if moved
                    else "")
    elif old is None and _has_state(workdir):
        log.info("%s: recording corpus %s (the run predates the record: not checked)", path,
                 corpus.fingerprint[:12])
    record = {"fingerprint": corpus.fingerprint, "num_blocks": len(corpus),
              "description": corpus.description}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return changed


def check(workdir: epath.PathLike, corpus: BlockCorpus, allow_change: bool = False) -> bool:
    """Compare `corpus` with the one the run in `workdir` started on, and record it.

    Every host calls this (the primary decides, and alone writes), before the run writes
    anything else.

    Returns:
      True when the corpus changed and `allow_change` let it: the caller must restart its
      data position (the old index is already moved aside).

    Raises:
      CorpusChanged: the corpus changed and `allow_change` is False (nothing was written).
    """
    workdir = epath.Path(workdir)
    status, refusal = _SAME, None
    if multihost.is_primary():
        try:
            status = _CHANGED if _compare(workdir, corpus, allow_change) else _SAME
        except CorpusChanged as e:  # every host must hear of it, then raise
            status, refusal = _REFUSED, e
    status = multihost.agree(status)
    if status == _REFUSED:
        raise refusal or CorpusChanged(f"{record_path(workdir)}: the primary process refused "
                                       "the corpus (its log says why)")
    multihost.barrier("realm_corpus_checked")  # the old index is aside before anyone reads it
    return status == _CHANGED


def check_source(source: epath.PathLike, corpus: BlockCorpus, allow_change: bool = False
                 ) -> bool:
    """Whether `config.resume`'s run (`source`) trained on `corpus`, whose data position the
    new run would continue. Read-only: the source is another run's.

    Returns:
      True when its corpus differs and `allow_change` lets it: the caller starts its data
      position from the first batch. False when it is the same, or the source has no record
      (it predates them: logged, not checked).

    Raises:
      CorpusChanged: the corpus differs and `allow_change` is False.
    """
    path = record_path(source)
    old = _read_record(path)
    if old is None:
        log.info("config.resume=%s has no %s: its corpus is not checked", source, RECORD)
        return False
    if old.get("fingerprint") == corpus.fingerprint:
        return False
    was, now = _both(old, corpus)
    if not allow_change:
        raise CorpusChanged(
            f"{path}: config.resume's run trained on corpus {was}, but data.corpus is {now}: "
            "its checkpoint's data position belongs to the other blocks. Resume from a run on "
            f"this corpus, or set {ALLOW_KEY}=True to keep its parameters and start the data "
            "from the first batch")
    log.warning("%s=True: config.resume's run trained on corpus %s, this one is %s; the data "
                "position starts from the first batch", ALLOW_KEY, was, now)
    return True
