"""Index store: publish/load round trip, refusal of torn or mismatched versions, retention,
crash safety, the watcher's swap/keep-old/wait behaviour, and a writer-vs-reader smoke test."""

import json
import os
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from etils import epath

from realm_jax.retrieval import durable, store
from realm_jax.retrieval.watcher import IndexWatcher

N, DIM = 16, 8


def _emb(step: int, dtype=np.float32, n: int = N, dim: int = DIM) -> np.ndarray:
    """Embeddings whose every value encodes `step`, so a torn read would show up."""
    rng = np.random.default_rng(step)
    return (rng.standard_normal((n, dim)) + step).astype(dtype)


def _scann_writer(staging: epath.Path) -> None:
    (staging / "scann").mkdir()
    (staging / "scann" / "searcher.pb").write_bytes(b"fake searcher")
    (staging / "scann" / "assets").mkdir()
    (staging / "scann" / "assets" / "tokens.npy").write_bytes(b"\x00" * 64)


def _flip_byte(path: epath.Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_meta(path: epath.Path, **changes) -> None:
    meta = json.loads((path / store.META).read_text())
    meta.update(changes)
    (path / store.META).write_text(json.dumps(meta))


def _index(workdir) -> epath.Path:
    return epath.Path(workdir) / store.INDEX_DIR


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_publish_load_round_trip(tmp_path, dtype):
    emb = _emb(7, dtype)
    path = store.publish(
        tmp_path, 7, emb, {"checkpoint_step": 7, "corpus_fingerprint": "abc"},
        write_extra=_scann_writer,
    )
    assert path == _index(tmp_path) / "v7"
    assert (_index(tmp_path) / "LATEST").read_text() == "v7\n"
    assert sorted(p.name for p in _index(tmp_path).iterdir()) == ["LATEST", "v7"]
    assert store.latest_step(tmp_path) == 7

    v = store.load_latest(tmp_path, expect={"num_blocks": N, "corpus_fingerprint": "abc"})
    assert (v.step, v.num_blocks, v.dim, v.path) == (7, N, DIM, path)
    assert v.embeddings.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(v.embeddings.view(np.uint8), emb.view(np.uint8))  # bit-exact
    assert not v.embeddings.flags.writeable
    assert v.meta["dtype"] == np.dtype(dtype).name
    assert v.meta["checkpoint_step"] == 7 and v.meta["created"]
    assert set(v.meta["files"]) == {
        "embeddings.npy", "scann/searcher.pb", "scann/assets/tokens.npy"
    }
    if dtype == ml_dtypes.bfloat16:  # stored as plain uint16 bits: any numpy can read the file
        raw = np.load(os.fspath(path / "embeddings.npy"), allow_pickle=False)
        assert raw.dtype == np.uint16
    assert (path / "scann" / "searcher.pb").read_bytes() == b"fake searcher"
    assert store.load_version(tmp_path, 7).meta == v.meta


def test_nothing_published(tmp_path):
    assert store.latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="LATEST"):
        store.load_latest(tmp_path)
    with pytest.raises(FileNotFoundError, match="v3"):
        store.load_version(tmp_path, 3)


def test_publish_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        store.publish(tmp_path, 1, _emb(1, np.float16))
    with pytest.raises(ValueError, match="shape"):
        store.publish(tmp_path, 1, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        store.publish(tmp_path, 1, np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="reserved"):
        store.publish(tmp_path, 1, _emb(1), {"dim": 3})
    with pytest.raises(ValueError, match="JSON"):
        store.publish(tmp_path, 1, _emb(1), {"x": object()})
    store.publish(tmp_path, 5, _emb(5))
    with pytest.raises(FileExistsError, match="v5"):
        store.publish(tmp_path, 5, _emb(5))
    with pytest.raises(ValueError, match="older"):
        store.publish(tmp_path, 4, _emb(4))
    assert store.load_latest(tmp_path).step == 5


# --------------------------------------------------------------------------- refusal


def _corrupt_embeddings(v):
    _flip_byte(v / "embeddings.npy")


def _truncate_embeddings(v):
    p = v / "embeddings.npy"
    p.write_bytes(p.read_bytes()[:-4])


CORRUPTIONS = {
    # name: (how, words the error must contain)
    "flipped_bytes": (_corrupt_embeddings, ["embeddings.npy", "sha256", "corrupt"]),
    "truncated": (_truncate_embeddings, ["embeddings.npy", "bytes"]),
    "extra_file": (lambda v: _flip_byte(v / "scann" / "searcher.pb"), ["scann/searcher.pb"]),
    "missing_extra": (lambda v: (v / "scann" / "searcher.pb").unlink(), ["searcher.pb", "missing"]),
    "wrong_n": (lambda v: _edit_meta(v, num_blocks=N + 1), ["meta.json", "num_blocks"]),
    "wrong_dim": (lambda v: _edit_meta(v, dim=DIM * 2), ["meta.json", "dim"]),
    "wrong_step": (lambda v: _edit_meta(v, step=99), ["meta.json", "'step'"]),
    "wrong_dtype": (lambda v: _edit_meta(v, dtype="bfloat16"), ["meta.json", "dtype"]),
    "unknown_dtype": (lambda v: _edit_meta(v, dtype="int8"), ["meta.json", "dtype"]),
    "wrong_checksum": (
        lambda v: _edit_meta(v, files={
            **json.loads((v / "meta.json").read_text())["files"],
            "embeddings.npy": {"sha256": "0" * 64,
                               "bytes": (v / "embeddings.npy").stat().length},
        }),
        ["embeddings.npy", "sha256", "meta.json"],
    ),
    "escaping_path": (
        lambda v: _edit_meta(v, files={
            **json.loads((v / "meta.json").read_text())["files"],
            "../v0/evil": {"sha256": "0" * 64, "bytes": 1},
        }),
        ["meta.json", "'files'", "../v0/evil"],
    ),
    "missing_field": (lambda v: _edit_meta(v, files=None), ["meta.json", "files"]),
    "meta_not_json": (lambda v: (v / "meta.json").write_text("{"), ["meta.json", "JSON"]),
    "meta_missing": (lambda v: (v / "meta.json").unlink(), ["meta.json", "torn"]),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_torn_or_mismatched_version_is_refused(tmp_path, name):
    how, words = CORRUPTIONS[name]
    v = store.publish(tmp_path, 3, _emb(3), write_extra=_scann_writer)
    how(v)
    with pytest.raises(store.IndexStoreError) as err:
        store.load_latest(tmp_path)
    assert isinstance(err.value, ValueError)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert str(v) in str(err.value)  # names the path, not just the file name


def test_expect_mismatch_names_file_and_field(tmp_path):
    store.publish(tmp_path, 2, _emb(2), {"corpus_fingerprint": "abc", "shape": [1, 2]})
    assert store.load_latest(tmp_path, expect={"shape": (1, 2)}).step == 2  # tuple == list
    with pytest.raises(ValueError, match=r"meta\.json: field 'corpus_fingerprint' is 'abc'"):
        store.load_latest(tmp_path, expect={"corpus_fingerprint": "xyz"})
    with pytest.raises(ValueError, match=r"meta\.json: field 'num_blocks' is 16, expected 17"):
        store.load_latest(tmp_path, expect={"num_blocks": 17})
    with pytest.raises(ValueError, match=r"meta\.json: field 'model_hash' is missing"):
        store.load_latest(tmp_path, expect={"model_hash": "h"})


def test_garbled_latest(tmp_path):
    store.publish(tmp_path, 1, _emb(1))
    (_index(tmp_path) / "LATEST").write_text("v1 and then some")
    with pytest.raises(store.IndexStoreError, match="LATEST"):
        store.latest_step(tmp_path)


def test_latest_of_bytes_that_are_no_text_names_the_file(tmp_path):
    store.publish(tmp_path, 1, _emb(1))
    latest = _index(tmp_path) / "LATEST"
    latest.write_bytes(b"\xff\xfe\x00\x81garbage")  # was a UnicodeDecodeError naming no file
    for read in (store.latest_step, store.load_latest):
        with pytest.raises(store.IndexStoreError,
                           match=rf"{latest}: expected one line 'v<step>', found "
                                 r"b'\\xff\\xfe\\x00\\x81garbage'; versions present: \[1\]"):
            read(tmp_path)


def test_publishing_behind_a_latest_that_names_a_missing_version_says_so(tmp_path):
    store.publish(tmp_path, 2, _emb(2))
    (_index(tmp_path) / "LATEST").write_text("v99\n")  # edited by hand, or a lost version
    with pytest.raises(store.LatestAhead) as error:
        store.publish(tmp_path, 4, _emb(4))
    assert str(error.value) == (
        f"{_index(tmp_path) / 'LATEST'} names v99, which does not exist; refusing to publish "
        "older v4 (versions present: [2]); point LATEST at a present version with "
        "store.set_latest() (the way to roll back on purpose)")  # no guess at its cause


# --------------------------------------------------------------------------- watcher


def test_watcher_keeps_old_version_on_failure_then_swaps(tmp_path):
    store.publish(tmp_path, 1, _emb(1), keep=5)
    w = IndexWatcher(tmp_path, start=False, max_attempts=2)
    assert w.maybe_swap() is None and w.current is None
    assert w.poll_once() is True
    assert w.current is None  # loaded, but not swapped until the trainer asks
    assert w.maybe_swap().step == 1 and w.current.step == 1
    assert w.poll_once() is False and w.maybe_swap() is None  # nothing new

    v2 = store.publish(tmp_path, 2, _emb(2), keep=5)
    _corrupt_embeddings(v2)
    assert w.poll_once() is False
    assert w.maybe_swap() is None and w.current.step == 1
    assert w.failures == 1 and "v2" in w.last_error and "embeddings.npy" in w.last_error
    assert w.poll_once() is False and w.failures == 2  # one retry (max_attempts=2) ...
    for _ in range(3):
        assert w.poll_once() is False
    assert w.failures == 2  # ... then it gives up on v2 instead of retrying forever
    assert w.current.step == 1

    store.publish(tmp_path, 3, _emb(3), keep=5)
    assert w.poll_once() is True
    v3 = w.maybe_swap()
    assert v3.step == 3 and w.current is v3
    np.testing.assert_array_equal(v3.embeddings, _emb(3))


def test_watcher_follows_a_rollback(tmp_path):
    store.publish(tmp_path, 1, _emb(1))
    w = IndexWatcher(tmp_path, start=False)
    assert w.poll_once() and w.maybe_swap().step == 1
    store.publish(tmp_path, 2, _emb(2))
    assert w.poll_once()  # v2 pending ...
    store.set_latest(tmp_path, 1)  # ... when an operator rolls LATEST back to v1
    assert w.poll_once() is False and w.maybe_swap() is None and w.current.step == 1
    store.publish(tmp_path, 3, _emb(3))
    assert w.poll_once() and w.maybe_swap().step == 3


def test_watcher_expect_mismatch_is_a_failure(tmp_path):
    store.publish(tmp_path, 1, _emb(1), {"corpus_fingerprint": "a"})
    w = IndexWatcher(tmp_path, start=False, expect={"corpus_fingerprint": "b"})
    assert w.poll_once() is False and w.failures == 1
    assert "corpus_fingerprint" in w.last_error and "meta.json" in w.last_error


def test_watcher_thread_wait_for_and_timeout(tmp_path):
    with IndexWatcher(tmp_path, poll_interval_s=0.05) as w:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="step >= 1"):
            w.wait_for(1, timeout_s=0.3)
        assert 0.3 <= time.monotonic() - t0 < 2.0

        store.publish(tmp_path, 1, _emb(1))
        assert w.wait_for(1, timeout_s=5.0).step == 1
        assert w.current.step == 1

        timer = threading.Timer(0.2, lambda: store.publish(tmp_path, 10, _emb(10)))
        timer.start()
        t0 = time.monotonic()
        assert w.wait_for(8, timeout_s=10.0).step == 10
        assert time.monotonic() - t0 < 5.0
        timer.join()
        assert w.current.step == 10
        thread = w._thread
    assert not thread.is_alive()


def test_wait_for_without_thread_polls_on_the_caller(tmp_path):
    w = IndexWatcher(tmp_path, start=False, poll_interval_s=0.05)
    with pytest.raises(TimeoutError):
        w.wait_for(0, timeout_s=0.1)
    store.publish(tmp_path, 4, _emb(4))
    assert w.wait_for(2, timeout_s=2.0).step == 4


def test_watcher_counts_garbled_latest_once(tmp_path):
    store.publish(tmp_path, 1, _emb(1))
    w = IndexWatcher(tmp_path, start=False)
    (_index(tmp_path) / "LATEST").write_text("garbage")
    for _ in range(3):
        assert w.poll_once() is False
    assert w.failures == 1 and "LATEST" in w.last_error


# --------------------------------------------------------------------------- retention


def test_retention_keeps_newest_and_never_latest(tmp_path):
    for step in range(1, 6):
        store.publish(tmp_path, step, _emb(step), keep=2)
    assert store.list_steps(tmp_path) == [5, 4]

    store.set_latest(tmp_path, 4)  # an operator pins (rolls back to) v4
    store.prune(tmp_path, keep=1)
    assert store.list_steps(tmp_path) == [5, 4]  # v4 is LATEST: kept although not newest
    assert store.load_latest(tmp_path).step == 4

    with pytest.raises(FileNotFoundError):
        store.set_latest(tmp_path, 2)  # pruned: LATEST is left alone
    assert store.latest_step(tmp_path) == 4


def test_prune_cleans_only_stale_tmp(tmp_path):
    store.publish(tmp_path, 1, _emb(1))
    index = _index(tmp_path)
    old = time.time() - 2 * 3600
    stale = index / ".tmp-crashed"
    (stale / "scann").mkdir(parents=True)
    (stale / "scann" / "x").write_bytes(b"x")
    stale_latest = index / ".tmp-LATEST-crashed"
    stale_latest.write_text("v9\n")
    for p in [stale / "scann" / "x", stale / "scann", stale, stale_latest]:
        os.utime(p, (old, old))
    busy = index / ".tmp-other-publisher"  # a concurrent publisher still writing: fresh mtime
    busy.mkdir()
    (busy / "embeddings.npy").write_bytes(b"partial")
    # An old directory with a freshly written file inside is in use, too.
    busy_old_dir = index / ".tmp-slow-publisher"
    busy_old_dir.mkdir()
    (busy_old_dir / "f").write_bytes(b"new")
    os.utime(busy_old_dir, (old, old))

    removed = store.prune(tmp_path, keep=3, tmp_grace_s=3600)
    assert sorted(p.name for p in removed) == [".tmp-LATEST-crashed", ".tmp-crashed"]
    assert busy.exists() and busy_old_dir.exists() and not stale.exists()
    # publish prunes too, with its own grace
    store.publish(tmp_path, 2, _emb(2), tmp_grace_s=0)
    assert not busy.exists() and not busy_old_dir.exists()
    assert sorted(p.name for p in index.iterdir()) == ["LATEST", "v1", "v2"]


# --------------------------------------------------------------------------- crash safety


def test_crash_inside_write_extra_keeps_previous_version(tmp_path):
    store.publish(tmp_path, 1, _emb(1))

    def boom(staging):
        (staging / "scann").mkdir()
        raise RuntimeError("ScaNN build died")

    with pytest.raises(RuntimeError, match="ScaNN"):
        store.publish(tmp_path, 2, _emb(2), write_extra=boom)
    assert store.latest_step(tmp_path) == 1
    assert store.load_latest(tmp_path).step == 1
    assert sorted(p.name for p in _index(tmp_path).iterdir()) == ["LATEST", "v1"]  # no debris


def test_crash_before_rename_keeps_previous_version(tmp_path, monkeypatch):
    store.publish(tmp_path, 1, _emb(1))

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(store, "_install", crash)
    with pytest.raises(OSError, match="power cut"):
        store.publish(tmp_path, 2, _emb(2))
    assert store.load_latest(tmp_path).step == 1
    assert store.list_steps(tmp_path) == [1]


def test_crash_between_rename_and_latest_then_republish(tmp_path, monkeypatch):
    store.publish(tmp_path, 1, _emb(1))

    def crash(*args):
        raise OSError("power cut")

    with monkeypatch.context() as m:
        m.setattr(store, "_write_latest", crash)
        with pytest.raises(OSError, match="power cut"):
            store.publish(tmp_path, 2, _emb(2))
    assert store.list_steps(tmp_path) == [2, 1]  # renamed, but nobody trusts it
    assert (_index(tmp_path) / "LATEST").read_text() == "v1\n"
    assert store.load_latest(tmp_path).step == 1

    # The restarted refresher publishes step 2 again: the orphan is replaced.
    store.publish(tmp_path, 2, _emb(2, ml_dtypes.bfloat16))
    v = store.load_latest(tmp_path)
    assert v.step == 2 and v.embeddings.dtype == ml_dtypes.bfloat16


def test_object_store_code_path(tmp_path, monkeypatch):
    """The gs:// route (copy, meta.json last, LATEST written directly), run on a local dir."""
    monkeypatch.setattr(durable, "is_local", lambda path: False)
    for step in (1, 2, 3):
        store.publish(tmp_path, step, _emb(step), write_extra=_scann_writer, keep=2)
    assert store.list_steps(tmp_path) == [3, 2]
    assert [p.name for p in _index(tmp_path).iterdir() if p.name.startswith(".tmp-")] == []
    v = store.load_latest(tmp_path)
    assert v.step == 3 and "scann/searcher.pb" in v.meta["files"]
    np.testing.assert_array_equal(v.embeddings, _emb(3))

    path_cls = type(epath.Path(tmp_path))  # the concrete class (epath.Path.copy is abstract)
    real_copy = path_cls.copy

    def copy_then_die(self, dst, overwrite=False):
        if epath.Path(dst).name == "searcher.pb":  # preempted mid-copy
            raise OSError("preempted")
        return real_copy(self, dst, overwrite=overwrite)

    monkeypatch.setattr(path_cls, "copy", copy_then_die)
    with pytest.raises(OSError, match="preempted"):
        store.publish(tmp_path, 4, _emb(4), write_extra=_scann_writer)
    assert store.load_latest(tmp_path).step == 3  # LATEST never moved
    v4 = _index(tmp_path) / "v4"
    assert (v4 / "embeddings.npy").exists() and not (v4 / "meta.json").exists()  # meta.json last
    with pytest.raises(store.IndexStoreError, match="meta.json"):
        store.load_version(tmp_path, 4)


# --------------------------------------------------------------------------- concurrency


def test_load_latest_follows_latest_when_its_version_is_pruned_mid_read(tmp_path, monkeypatch):
    """A reader resolves LATEST=v1; before it reads v1, v2 and v3 are published and v1 pruned."""
    store.publish(tmp_path, 1, _emb(1))
    real_load = store.load_version
    calls = []

    def racing_load(workdir, step, expect=None):
        calls.append(step)
        if len(calls) == 1:
            store.publish(tmp_path, 2, _emb(2), keep=1)
            store.publish(tmp_path, 3, _emb(3), keep=1)
        return real_load(workdir, step, expect)

    monkeypatch.setattr(store, "load_version", racing_load)
    v = store.load_latest(tmp_path)
    assert calls == [1, 3] and v.step == 3
    np.testing.assert_array_equal(v.embeddings, _emb(3))

    # A version that is still LATEST and broken is an error, not a retry loop.
    _corrupt_embeddings(v.path)
    with pytest.raises(store.IndexStoreError, match="embeddings.npy"):
        store.load_latest(tmp_path)
    assert calls == [1, 3, 3]



def test_concurrent_writer_and_reader_never_tear(tmp_path):
    n, dim, versions = 2048, 64, 20
    store.publish(tmp_path, 0, np.full((n, dim), 0, np.float32))
    done = threading.Event()
    errors, loaded = [], []

    def writer():
        try:
            for step in range(1, versions + 1):
                # keep=1: each publish deletes the version a reader may have just resolved.
                store.publish(tmp_path, step, np.full((n, dim), step, np.float32), keep=1)
        except Exception as e:  # noqa: BLE001
            errors.append(("writer", repr(e)))
        finally:
            done.set()

    def reader():
        while not done.is_set():
            try:
                v = store.load_latest(tmp_path, expect={"num_blocks": n, "dim": dim})
            except Exception as e:  # noqa: BLE001
                errors.append(("reader", repr(e)))
                continue
            if not (v.embeddings == v.step).all() or v.meta["step"] != v.step:
                errors.append(("torn", v.step))
            loaded.append(v.step)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:5]
    assert loaded and loaded == sorted(loaded)  # LATEST only moves forward
    assert store.load_latest(tmp_path).step == versions
    assert store.list_steps(tmp_path) == [versions]
