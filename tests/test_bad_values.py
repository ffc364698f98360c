"""Values no run can use are refused with one clear line, before anything runs or is written:
`answer --k 0 / -1`, `evaluate --max_examples -5`, `train.steps <= 0`, a `retrieval.k` larger
than the corpus. (0 is never read as "not given".)"""

import os
import subprocess
import sys

import pytest

from realm_jax import defaults, sharding
from realm_jax.data.loaders import load_pretrain_sentences
from realm_jax.errors import UserError
from realm_jax.evaluate import check_counts
from realm_jax.tasks.realm_mlm import RealmMlm
from realm_jax.train import check_config, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(*argv):
    """A command's (status, stderr) on one CPU device."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    return done.returncode, done.stderr


@pytest.mark.parametrize("argv, message", [
    (["realm_jax.answer", "--workdir", "W", "--k", "0", "q"], "flag --k=0: 0 is not a positive"),
    (["realm_jax.answer", "--workdir", "W", "--k=-1", "q"], "flag --k=-1: -1 is not a positive"),
    (["realm_jax.evaluate", "--workdir", "W", "--max_examples=-5"],
     "flag --max_examples=-5: -5 is not a non-negative"),
])
def test_commands_refuse_out_of_range_counts_in_one_line(argv, message):
    status, err = _command(*argv)
    assert status == 1 and message in err and "Traceback" not in err, err


def test_evaluate_counts():
    check_counts(k=1, batch_size=1, max_examples=0)  # 0 examples: all of them
    check_counts()  # None: the config's
    for bad, message in ((dict(k=0), "k=0: must be at least 1"),
                         (dict(batch_size=0), "batch_size=0: must be at least 1"),
                         (dict(max_examples=-5), r"max_examples=-5: must be at least 0 \(0: all")):
        with pytest.raises(ValueError, match=message):
            check_counts(**bad)


@pytest.mark.parametrize("steps", [0, -3])
def test_zero_or_negative_steps_are_refused_before_the_workdir_is_made(tmp_path, steps):
    config = defaults.load_config("configs/tiny.py", {"train.steps": steps})
    with pytest.raises(ValueError, match=f"train.steps={steps}: must be at least 1"):
        check_config(config)
    with pytest.raises(ValueError, match="train.steps"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_command_says_so_in_one_line(tmp_path):
    status, err = _command("realm_jax.train", "--config", "configs/tiny.py", "--workdir",
                           str(tmp_path / "run"), "--config.train.steps=0")
    assert status == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "error: config.train.steps=0: must be at least 1 (the step to train up to)")
    assert not (tmp_path / "run").exists()


def test_realm_k_larger_than_the_corpus_names_both(eight_devices):
    config = defaults.load_config("configs/tiny.py", {"retrieval.k": 6})
    mesh = sharding.make_mesh(dict(config.mesh))
    corpus = list(range(5))  # only its length is read
    with pytest.raises(ValueError, match="retrieval.k=6 is larger than the corpus, which has 5 "
                                         "blocks"):
        RealmMlm(config, mesh, corpus, None, None)
    RealmMlm(config, mesh, list(range(6)), None, None)
    RealmMlm(config, mesh, None, None, None)  # ahead-of-time compilation: no corpus to check


def test_corpus_sentences_without_salient_spans_say_why():
    class Blocks(list):  # the BlockCorpus methods corpus_sentences reads
        def get_many(self, ids):
            return [self[i] for i in ids]

    config = defaults.load_config(os.path.join(REPO, "configs/tiny.py"),
                                  {"data.sentences": "corpus"})
    flat = Blocks([{"title": "t", "text": "all lower case words here. and more of them."}] * 3)
    with pytest.raises(UserError, match=r"data.sentences=corpus: none of the \d+ sentences of "
                                        r"the 3 blocks has a salient span"):
        load_pretrain_sentences(config, flat)
    named = Blocks([{"title": "t", "text": "Darwin was born in 1809."}])
    assert len(load_pretrain_sentences(config, named)) == 1
