"""Training end to end on the tiny config (8 emulated devices): both tasks, resume after a
kill, index swaps picked up, NaN stops the run; plus the optimiser and candidate selection."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from realm_jax import checkpoints, defaults, optim, run_checkpoints
from realm_jax.data.joins import blocks_with_answer, tokenize_corpus
from realm_jax.data.loaders import load_corpus, load_tokenizer
from realm_jax.embedding import block_runner
from realm_jax.retrieval import store
from realm_jax.tasks.realm_mlm import realm_candidates
from realm_jax.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
    return defaults.load_config(os.path.join(ROOT, "configs/tiny.py"), overrides)


def leaves_equal(a, b) -> bool:
    a, b = jax.device_get(a), jax.device_get(b)
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --------------------------------------------------------------------------- units


def test_warmup_and_schedule():
    assert optim.warmup_steps(3) == 100 and optim.warmup_steps(5000) == 500
    assert optim.warmup_steps(10**6) == 10_000 and optim.warmup_steps(50, 7) == 7
    lr = optim.learning_rate(1.0, 100, 10)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(55)) == pytest.approx(0.5) and float(lr(100)) == pytest.approx(0.0)


def test_no_weight_decay_on_layer_norm_and_bias():
    params = {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32),
              "LayerNorm": {"scale": np.ones(2, np.float32)}}
    config = tiny(**{"train.lr": 1.0, "train.steps": 100, "train.warmup_steps": 1,
                     "train.weight_decay": 0.5})
    opt = optim.make_optimizer(config.train)
    state = opt.init(params)
    zeros = jax.tree.map(np.zeros_like, params)
    for _ in range(2):  # step 0 has lr 0 (warmup starts at 0); step 1 has lr ≈ 1
        updates, state = opt.update(zeros, state, params)
    assert float(np.abs(updates["kernel"]).max()) > 0.1  # zero gradient: decay alone
    assert float(np.abs(updates["bias"]).max()) == 0
    assert float(np.abs(updates["LayerNorm"]["scale"]).max()) == 0


def test_orqa_targets_follow_regex_answers(tmp_path, eight_devices, monkeypatch):
    """CuratedTrec: a regular-expression answer marks the retrieved blocks whose text it
    matches, and its spans there, as the literal answer it matches does (it used to be
    tokenised as if it were answer text, and marked nothing)."""
    from realm_jax import sharding
    from realm_jax.testing.tasks import task_with_random_index

    config = tiny(task="orqa")
    mesh = sharding.make_mesh(dict(config.mesh), eight_devices)
    task, params, searcher = task_with_random_index(config, mesh, str(tmp_path))
    batch = next(iter(task.dataset(0)))
    assert not batch["is_regex"].any()
    # The search returns each question's gold block first, so there are answers to find.
    from realm_jax.tasks import orqa

    def retrieve(runner, params, searcher, ids, mask, types, s):
        ids = [[g, *[b for b in range(s) if b != g][: s - 1]] for g in batch["gold_blocks"]]
        return np.array(ids), None

    monkeypatch.setattr(orqa, "retrieve_host_rows", retrieve)
    # Each answer as a pattern whose own text is not the answer: its first letter a class.
    patterns = [[f"[{a[0].lower()}{a[0].upper()}]{re.escape(a[1:])}" for a in row]
                for row in batch["answers"]]
    literal, _ = task.prepare(batch, params, searcher)
    regex_rows = np.ones(len(patterns), bool)
    regex, _ = task.prepare({**batch, "answers": patterns, "is_regex": regex_rows}, params,
                            searcher)
    assert literal["retrieval_correct"].any() and (literal["gold_starts"] >= 0).any()
    for key in ("retrieval_correct", "gold_starts", "gold_ends"):
        np.testing.assert_array_equal(regex[key], literal[key], err_msg=key)
    # A pattern that matches nothing marks nothing.
    none, _ = task.prepare({**batch, "answers": [["zzqx\\d{9}"]] * len(patterns),
                            "is_regex": regex_rows}, params, searcher)
    assert not none["retrieval_correct"].any() and (none["gold_starts"] < 0).all()


def test_realm_candidates_drop_trivial_and_prepend_null():
    hashes = np.array([10, 11, 12, 13, 11], np.int64)  # block 4 duplicates block 1's uid
    ids = np.array([[1, 2, 4, 3], [0, 1, 2, 3]])
    out = realm_candidates(ids, np.array([11, 99]), hashes, k=4)
    np.testing.assert_array_equal(out, [[-1, 2, 3, -1], [-1, 0, 1, 2]])


def test_blocks_with_answer_matches_string_search(eight_devices):
    config = tiny()
    tok = load_tokenizer(config)
    corpus = load_corpus(config)
    blocks = tokenize_corpus(corpus, tok)
    ids = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    words = [corpus[int(i)]["text"].split()[2:4] for i in (1, 6)]
    answers = [[" ".join(words[0])], [" ".join(words[1]), "no such zzqx answer"]]
    got = blocks_with_answer(blocks, ids, [tok.tokenize(a) for a in answers])
    for b in range(2):
        for s in range(4):
            text = " ".join(corpus[int(ids[b, s])]["text"].lower().split())
            expect = any(a.lower() in text for a in answers[b])
            assert got[b, s] == expect, (b, s)
    assert got[0, 1] and got[1, 2]


# --------------------------------------------------------------------------- end to end


def test_both_tasks_train_three_steps(tmp_path, eight_devices):
    pre = tmp_path / "pretrain"
    result = train(tiny(), pre, progress=False)
    assert result.step == 3 and result.origin == "scratch"
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert {"mlm_accuracy", "retrieval_utility", "gold_recall_at_k",
            "staleness_steps"} <= set(result.history[0])
    assert result.evals and "gold_recall_at_5" in result.evals[-1]
    assert (pre / "config.json").exists() and list((pre / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3]
    # The newest checkpoint holds exactly the returned parameters.
    _, towers = checkpoints.load_pretrained(pre)
    assert set(towers) == {"embedder", "encoder"}
    assert leaves_equal(towers, result.params)

    # ORQA from the pre-training run: the frozen index is the pre-trained embedder's.
    ft = tmp_path / "orqa"
    config = tiny(**{"task": "orqa", "init.path": str(pre)})
    result = train(config, ft, progress=False)
    assert result.step == 3 and result.origin == f"init:{pre}"
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert {"retriever_loss", "reader_loss"} <= set(result.history[0])
    assert "staleness_steps" not in result.history[0]  # a frozen index is never stale
    assert store.list_steps(ft) == [0]
    embedder = block_runner(config, jax.sharding.Mesh(np.array(jax.devices()).reshape(8, 1, 1),
                                                      ("data", "fsdp", "model")))
    blocks = tokenize_corpus(load_corpus(config), load_tokenizer(config))
    np.testing.assert_allclose(store.load_latest(ft).embeddings,
                               embedder.embed_blocks(towers["embedder"], blocks, console=False),
                               atol=1e-5)


def test_nan_stops_the_run_naming_the_step(tmp_path, eight_devices):
    with pytest.raises(FloatingPointError, match="at step 1"):
        train(tiny(**{"train.steps": 3}), tmp_path, progress=False, inject_nan_at=1)
    manager = run_checkpoints.checkpoint_manager(tmp_path, read_only=True)
    assert manager.all_steps() == [1]  # step 1's poisoned result was never saved
    manager.close()


@pytest.mark.slow
def test_killed_run_resumes_bitwise(tmp_path, eight_devices):
    overrides = {"train.steps": 8, "refresh.every_steps": 3, "train.checkpoint_every": 1}
    reference = train(tiny(**overrides), tmp_path / "reference", progress=False)

    work = tmp_path / "killed"
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "realm_jax.train", "--config", "configs/tiny.py",
         "--workdir", str(work), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (work / "checkpoints" / "2").exists():
            assert proc.poll() is None, "training exited before its second checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    manager = run_checkpoints.checkpoint_manager(work, read_only=True)
    killed_at = manager.latest_step()
    manager.close()
    assert 2 <= killed_at < 8, killed_at

    resumed = train(tiny(**overrides), work, progress=False)
    assert resumed.origin == "workdir" and resumed.step == 8
    assert [h["step"] for h in resumed.history] == list(range(killed_at + 1, 9))
    assert leaves_equal(resumed.params, reference.params)
    # The same batches gave the same losses after the resume.
    ref = {h["step"]: h["loss"] for h in reference.history}
    assert all(h["loss"] == ref[h["step"]] for h in resumed.history)


@pytest.mark.slow
def test_refresher_subprocess_swaps_are_picked_up(tmp_path, eight_devices, monkeypatch):
    config = tiny(**{"refresh.mode": "subprocess", "train.steps": 6,
                     "refresh.max_staleness_steps": 2, "refresh.poll_interval_s": 0.2,
                     "refresh.wait_timeout_s": 300.0})
    monkeypatch.chdir(tmp_path)  # a relative workdir: orbax in the child refuses those
    result = train(config, "run", progress=False)
    tmp_path = tmp_path / "run"
    stale = [h["staleness_steps"] for h in result.history]
    index_steps = [h["index_step"] for h in result.history]
    assert max(stale) <= 2, stale  # max_staleness_steps held
    assert result.index_swaps >= 1 and index_steps[-1] > 0, index_steps
    # Versions only move forward, each change is a counted swap, and staleness is measured
    # against the version searched (whatever the refresher's pace: no timing assumption).
    assert index_steps == sorted(index_steps), index_steps
    changes = sum(b != a for a, b in zip(index_steps, index_steps[1:], strict=False))
    assert changes <= result.index_swaps, (index_steps, result.index_swaps)
    assert stale == [h["step"] - 1 - i  # history's step counts the step just taken
                     for h, i in zip(result.history, index_steps, strict=True)]
    assert "starting" in (tmp_path / "refresher.log").read_text()
