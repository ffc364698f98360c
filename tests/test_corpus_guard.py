"""A run resumes only on the corpus it started on (realm_jax.corpus_guard): a rebuilt corpus
behind the same `data.corpus` is refused naming both fingerprints and the record, unless
`data.allow_corpus_change` restarts the data position and rebuilds the index."""

import json

import numpy as np
import pytest

from realm_jax import defaults, run_checkpoints
from realm_jax.corpus_guard import CorpusChanged, check, check_source, record_path
from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.loaders import load_corpus
from realm_jax.retrieval import store
from realm_jax.train import train

OLD = BlockCorpus.from_blocks([{"title": "a", "text": "one"}, {"title": "b", "text": "two"}])
NEW = BlockCorpus.from_blocks([{"title": "a", "text": "one"}, {"title": "c", "text": "3"}])


def test_first_start_records_and_the_same_corpus_resumes(tmp_path):
    assert check(tmp_path, OLD) is False
    record = json.loads(record_path(tmp_path).read_text())
    assert record == {"fingerprint": OLD.fingerprint, "num_blocks": 2,
                      "description": OLD.description}
    (run_checkpoints.checkpoint_dir(tmp_path) / "1").mkdir(parents=True)
    assert check(tmp_path, OLD) is False


def test_nothing_to_resume_takes_the_new_corpus(tmp_path):
    check(tmp_path, OLD)  # a first run that failed before its first checkpoint
    assert check(tmp_path, NEW) is False
    assert json.loads(record_path(tmp_path).read_text())["fingerprint"] == NEW.fingerprint


def test_another_corpus_is_refused_naming_both_and_the_record(tmp_path):
    check(tmp_path, OLD)
    (run_checkpoints.checkpoint_dir(tmp_path) / "5").mkdir(parents=True)
    before = record_path(tmp_path).read_text()
    with pytest.raises(CorpusChanged) as error:
        check(tmp_path, NEW)
    message = str(error.value)
    assert message.startswith(f"{record_path(tmp_path)}: this run started on corpus "
                              f"{OLD.fingerprint[:12]}… (2 blocks, ")
    assert f"data.corpus is now {NEW.fingerprint[:12]}… (2 blocks, " in message
    assert "data.allow_corpus_change=True" in message and "\n" not in message
    assert record_path(tmp_path).read_text() == before  # nothing written


def test_a_resume_source_on_another_corpus_is_refused_unless_allowed(tmp_path):
    source = tmp_path / "other_run"
    source.mkdir()
    assert check_source(source, NEW) is False  # no record (an older run): not checked
    check(source, OLD)
    (run_checkpoints.checkpoint_dir(source) / "5").mkdir(parents=True)
    assert check_source(source, OLD) is False
    with pytest.raises(CorpusChanged, match=r"config.resume's run trained on corpus "
                       rf"{OLD.fingerprint[:12]}… \(2 blocks, .*data.corpus is "
                       rf"{NEW.fingerprint[:12]}…"):
        check_source(source, NEW)
    assert check_source(source, NEW, allow_change=True) is True
    assert json.loads(record_path(source).read_text())["fingerprint"] == OLD.fingerprint


def test_an_allowed_change_moves_the_index_aside_and_records_the_new_corpus(tmp_path):
    check(tmp_path, OLD)
    store.publish(tmp_path, 0, np.eye(2, dtype=np.float32),
                  {"corpus_fingerprint": OLD.fingerprint})
    assert check(tmp_path, NEW, allow_change=True) is True
    assert not (tmp_path / "index").exists()
    aside = tmp_path / f"index.corpus-{OLD.fingerprint[:12]}"
    assert (aside / "LATEST").read_text() == "v0\n"
    assert json.loads(record_path(tmp_path).read_text())["fingerprint"] == NEW.fingerprint
    assert check(tmp_path, NEW) is False


@pytest.mark.slow
def test_train_refuses_a_rebuilt_corpus_and_restarts_the_data_when_allowed(tmp_path,
                                                                           eight_devices):
    def tiny(**overrides):
        return defaults.load_config("configs/tiny.py", {"train.steps": 1, **overrides})

    train(tiny(), tmp_path, progress=False)
    old_fingerprint = load_corpus(tiny()).fingerprint
    saved_config = (tmp_path / "config.json").read_text()
    # The same data.corpus ("synthetic") now builds other blocks.
    rebuilt = {"data.synthetic.seed": 1, "train.steps": 2}
    with pytest.raises(CorpusChanged, match=f"{record_path(tmp_path)}: this run started on "):
        train(tiny(**rebuilt), tmp_path, progress=False)
    assert (tmp_path / "config.json").read_text() == saved_config  # refused before writing

    result = train(tiny(**rebuilt, **{"data.allow_corpus_change": True}), tmp_path,
                   progress=False)
    assert result.origin == "workdir" and [h["step"] for h in result.history] == [2]
    manager = run_checkpoints.checkpoint_manager(tmp_path, read_only=True)
    data = run_checkpoints.restore_items(manager, 2, {"data": None})["data"]
    manager.close()
    assert data["next_index"] == 1  # one batch of the new corpus, not batch 2 of the old
    fingerprint = load_corpus(tiny(**rebuilt)).fingerprint
    assert store.load_latest(tmp_path).meta["corpus_fingerprint"] == fingerprint
    assert [p.name for p in tmp_path.glob("index.corpus-*")] == [
        f"index.corpus-{old_fingerprint[:12]}"]
    assert json.loads(record_path(tmp_path).read_text())["fingerprint"] == fingerprint
