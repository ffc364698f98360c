"""Inference and evaluation on a training workdir built by hand with train.py's own functions:
answers against a direct (unbatched, unjitted) computation, batching and compilation, bad
input, broken workdirs, the `answer` and `evaluate` commands. (HF parity: test_inference_hf.)"""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from realm_jax import (
    defaults,
    embedding,
    inference,
    initialize,
    run_checkpoints,
    sharding,
)
from realm_jax.answer import answer_all, from_arguments, read_lines
from realm_jax.data.joins import join_reader, tokenize_corpus
from realm_jax.data.loaders import load_corpus, load_qa_split, load_tokenizer
from realm_jax.data.qa import QaSet, exact_match, has_answer
from realm_jax.evaluate import run as evaluate_run
from realm_jax.evaluation import evaluate
from realm_jax.inference import Realm
from realm_jax.models import Embedder, SpanReader, orqa_logits, span_candidates
from realm_jax.retrieval import store
from realm_jax.retrieval.refresher import publish_index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["where was Tunupim Kristoux born?", "who employed the chemist?",
             "what did the founder establish in 1737?", "which company made the loom?",
             "who was married to the astronomer?"]


def tiny(**overrides):
    return defaults.load_config("configs/tiny.py", {"task": "orqa", **overrides})


def make_workdir(root, config, towers=("query_embedder", "reader"), step=3, seed=0):
    """What train.py leaves in a workdir: config.json, index v0 (the frozen block index of an
    ORQA run) and a checkpoint of `towers`. Random weights with noise, so retrieval and span
    scores are far from ties. Returns the host params of every tower."""
    defaults.save_resolved(config, root)
    mesh = sharding.make_mesh(dict(config.mesh))
    cfg = defaults.model_config(config)
    params, _ = initialize.init_towers(cfg, ["embedder", "query_embedder", "reader"], mesh,
                                       seed=seed)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.3, np.shape(x)).astype(
        np.float32), jax.device_get(params))
    corpus = load_corpus(config)
    blocks = tokenize_corpus(corpus, load_tokenizer(config))
    embeddings = embedding.block_runner(config, mesh).embed_blocks(params["embedder"], blocks,
                                                                   console=False)
    publish_index(config, root, 0, embeddings, corpus.fingerprint)
    manager = run_checkpoints.checkpoint_manager(root)
    run_checkpoints.save_train_state(manager, step, {t: params[t] for t in towers}, {}, {},
                                 {"task": config.task})
    manager.wait_until_finished()
    manager.close()
    return params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("orqa_run")
    return root, make_workdir(root, tiny())


@pytest.fixture(scope="module")
def realm(workdir, eight_devices):
    return Realm.load(workdir[0], batch_size=16)


def direct(realm, params, questions):
    """The same prediction without batching, padding, sharding or jit: (block ids [B, R],
    best block rank [B], span (start, end) [B, 2], joint logits [B, R, C])."""
    cfg, tok = realm.cfg, realm.tokenizer
    enc = tok.encode_queries(questions, realm.query_len)
    q = np.asarray(Embedder(cfg).apply({"params": params["query_embedder"]}, enc.input_ids,
                                       enc.attention_mask, enc.token_type_ids))
    table = np.asarray(realm.searcher.version.embeddings, np.float32)
    scores = q @ table.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, : realm.reader_beam]
    rin = join_reader(enc.input_ids, enc.lengths, realm.blocks, top, realm.reader_len)
    span = SpanReader(cfg).apply({"params": params["reader"]}, rin.input_ids,
                                 rin.attention_mask, rin.token_type_ids, rin.block_mask)
    joint = np.asarray(orqa_logits(span, np.take_along_axis(scores, top, 1)))
    r, c = np.divmod(joint.reshape(len(questions), -1).argmax(-1), joint.shape[-1])
    starts, ends = span_candidates(realm.reader_len, cfg.max_span_width)
    return top, r, np.stack([starts[c], ends[c]], -1), joint, scores


# --------------------------------------------------------------------------- answers


def test_answers_equal_a_direct_computation(workdir, realm):
    params = workdir[1]
    qa = load_qa_split(realm.config, "dev")
    questions = QUESTIONS + [qa[i]["question"] for i in range(len(qa))]  # one padded batch
    top, rank, spans, joint, scores = direct(realm, params, questions)
    gaps = -np.diff(np.sort(scores, axis=1)[:, ::-1][:, : realm.reader_beam + 1], axis=1)
    assert gaps.min() > 1e-3  # the fixture has no near-ties: ids must agree exactly
    answers = realm.answer(questions)
    assert realm.step == 3 and realm.query_tower == "query_embedder"
    for i, a in enumerate(answers):
        assert [r.block_id for r in a.retrieved] == top[i].tolist()
        assert a.block_rank == rank[i] and a.block_id == top[i, rank[i]]
        np.testing.assert_allclose(a.score, joint[i].max(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.retrieval_score, scores[i, a.block_id], rtol=1e-5,
                                   atol=1e-5)
        record = realm.corpus[a.block_id]
        assert (a.title, a.block_text) == (record["title"], record["text"])
        assert a.text and a.text == a.block_text[a.start_char:a.end_char]
        # The text covers exactly the predicted wordpieces (a span may start inside a word).
        qlen = len(realm.tokenizer.tokenize([questions[i]])[0]) + 2
        s, e = spans[i] - qlen
        ids, offsets = realm.tokenizer.tokenize_with_offsets([a.block_text])[0]
        assert ids == realm.blocks.bodies.row(a.block_id).tolist()
        assert (a.start_char, a.end_char) == (offsets[s][0], offsets[e][1])
        assert a.decoded == realm.tokenizer.decode(ids[s: e + 1])
        assert 0 < a.probability <= 1 and not a.truncated and not a.error


def test_single_and_batched_answers_agree_and_repeat(realm):
    batch = realm.answer(QUESTIONS)
    for q, b in zip(QUESTIONS, batch, strict=True):
        one = realm.answer(q)
        assert isinstance(one, inference.Answer)
        assert (one.text, one.block_id, one.start_char) == (b.text, b.block_id, b.start_char)
        np.testing.assert_allclose(one.score, b.score, rtol=1e-5)
    assert realm.answer(QUESTIONS) == batch  # deterministic


def test_each_device_function_compiles_once_per_padded_shape(workdir, realm):
    def fresh(**kw):
        inference._read_fn.cache_clear()  # fresh jitted functions
        embedding._embed_fn.cache_clear()
        return Realm(realm.config, realm.params, realm.searcher, corpus=realm.corpus,
                     blocks=realm.blocks, tokenizer=realm.tokenizer, mesh=realm.mesh, **kw)

    sizes = (1, 3, 8, 9, 16, 21, 40)
    full = fresh(batch_size=16, length_buckets=1)
    assert (full.min_batch, full.batch_size) == (8, 16)
    answers = [full.answer((QUESTIONS * 8)[:n]) for n in sizes]
    full.retrieve(QUESTIONS, 3)
    assert full._queries.compilations == 2  # padded to 8 or 16 rows
    assert full._read.jitted._cache_size() == 2
    # Lengths cut to the batch's longest (4 buckets): at most 4 lengths per batch size, and
    # the same answers as at full length.
    bucketed = fresh(batch_size=16)
    for n, want in zip(sizes, answers, strict=True):
        got = bucketed.answer((QUESTIONS * 8)[:n])
        assert [(a.text, a.block_id) for a in got] == [(a.text, a.block_id) for a in want]
        np.testing.assert_allclose([a.score for a in got], [a.score for a in want], rtol=1e-5)
    assert bucketed._read.jitted._cache_size() <= 2 * 4
    assert bucketed._queries.compilations <= 2 * 4
    assert embedding.bucket_length(17, 64, 4) == 32 and embedding.bucket_length(64, 64, 4) == 64
    assert embedding.bucket_length(1, 24, 4) == 6 and embedding.bucket_length(7, 24, 4) == 12


def test_retrieve_gives_the_top_k_blocks_with_their_text(workdir, realm):
    *_, scores = direct(realm, workdir[1], QUESTIONS)
    got = realm.retrieve(QUESTIONS, 5)
    for row, s in zip(got, scores, strict=True):
        assert [r.block_id for r in row] == np.argsort(-s, kind="stable")[:5].tolist()
        np.testing.assert_allclose([r.score for r in row], np.sort(s)[::-1][:5], rtol=1e-5)
        block_id, title, text, _ = row[0]  # unpacks as a tuple
        assert (title, text) == (realm.corpus[block_id]["title"], realm.corpus[block_id]["text"])
    single = realm.retrieve(QUESTIONS[0], 2)
    assert [r.block_id for r in single] == [r.block_id for r in got[0][:2]]
    with pytest.raises(ValueError, match="k=0 must be an int between 1 and the index size"):
        realm.retrieve(QUESTIONS[0], 0)


def test_scann_index_when_the_config_asks(workdir, realm, tmp_path):
    root = tmp_path / "scann_run"
    shutil.copytree(workdir[0], root)
    version = store.load_latest(root)
    publish_index(tiny(**{"retrieval.engine": "scann"}), root, 1,
                  np.asarray(version.embeddings), version.meta["corpus_fingerprint"])
    scann = Realm.load(root, overrides={"retrieval.engine": "scann"})
    assert scann.searcher.engine == "scann"
    assert [a.text for a in scann.answer(QUESTIONS)] == [a.text for a in realm.answer(QUESTIONS)]
    assert Realm.load(root).searcher.engine == "exact"  # the saved config asks for exact


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["", "   \t\n"])
def test_empty_question_is_refused(realm, bad):
    with pytest.raises(ValueError, match="question is empty or whitespace-only"):
        realm.answer(bad)
    with pytest.raises(ValueError, match="question 1 is empty or whitespace-only"):
        realm.answer([QUESTIONS[0], bad])
    with pytest.raises(ValueError, match="empty"):
        realm.retrieve(bad, 2)
    with pytest.raises(TypeError, match="must be a str"):
        realm.answer([QUESTIONS[0], b"bytes"])
    good, empty, other = realm.answer([QUESTIONS[0], bad, QUESTIONS[1]], errors="return")
    assert "empty or whitespace-only" in empty.error and empty.text == ""
    assert (good.text, other.text) == (realm.answer(QUESTIONS[0]).text,
                                       realm.answer(QUESTIONS[1]).text)


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_is_refused_not_read_as_unset(realm, k):
    with pytest.raises(ValueError, match=f"k={k} must be an int between 1 and the index size"):
        realm.answer(QUESTIONS[0], k=k)
    with pytest.raises(ValueError, match=f"k={k}: must be at least 1"):
        evaluate(realm, load_qa_split(realm.config, "dev"), k=k)


def test_overlong_question_is_truncated_and_noted(realm, caplog):
    long = "who " + "really " * 60 + "founded the guild?"
    with caplog.at_level("WARNING"):
        a, b = realm.answer([long, QUESTIONS[0]])
    assert a.truncated and not b.truncated and a.text
    assert "longer than data.query_len=24 wordpieces: truncated" in caplog.text


def test_model_without_reader_retrieves_but_does_not_answer(workdir, tmp_path):
    root = tmp_path / "pretrain"
    config = tiny(task="realm_mlm")
    make_workdir(root, config, towers=("embedder",), step=5)
    realm = Realm.load(root)
    assert realm.query_tower == "embedder" and not realm.has_reader
    # On CPU the default batch holds about CPU_READER_TOKENS joined wordpieces (beam 2 × 64).
    assert realm.batch_size == inference.CPU_READER_TOKENS // (2 * 64) == 16
    assert len(realm.retrieve(QUESTIONS[0], 3)) == 3
    with pytest.raises(ValueError, match="no reader tower.*task=orqa"):
        realm.answer(QUESTIONS[0])


def test_broken_workdirs_name_the_path_and_the_command(workdir, tmp_path):
    src = workdir[0]
    empty = tmp_path / "no_checkpoint"
    defaults.save_resolved(tiny(), empty)
    with pytest.raises(FileNotFoundError, match=f"{empty}/checkpoints.*python -m realm_jax.train"):
        Realm.load(empty)
    (empty / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.*python -m realm_jax.train"):
        Realm.load(empty)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Realm.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no step 9; available: \\[3\\]"):
        Realm.load(src, step=9)

    no_index = tmp_path / "no_index"
    shutil.copytree(src, no_index, ignore=shutil.ignore_patterns("index", "tokenized"))
    with pytest.raises(FileNotFoundError,
                       match="index/LATEST: no index published.*python -m realm_jax.refresh"):
        Realm.load(no_index)

    # An index of another corpus: one block fewer than the config's corpus.
    version = store.load_latest(src)
    n = version.num_blocks
    store.publish(no_index, 1, np.asarray(version.embeddings)[:-1],
                  {"corpus_fingerprint": "0" * 40})
    with pytest.raises(store.IndexStoreError,
                       match=f"{no_index}/index/v1/meta.json: the index has {n - 1} blocks but "
                             f"the corpus .* has {n}.*python -m realm_jax.refresh"):
        Realm.load(no_index)
    store.publish(no_index, 2, np.asarray(version.embeddings), {"corpus_fingerprint": "0" * 40})
    with pytest.raises(store.IndexStoreError, match="corpus_fingerprint 000000000000… is not"):
        Realm.load(no_index)


# --------------------------------------------------------------------------- evaluation


def test_has_answer_matches_whole_normalised_words():
    text = "The Origin of Species was written by Charles Darwin, in 1859."
    assert has_answer(text, ["charles darwin"]) and has_answer(text, ["the origin of species"])
    assert not has_answer(text, ["darwi"]) and not has_answer(text, ["1860", "wallace"])
    assert has_answer(text, [r"Darwin|Wallace"], is_regex=True)
    assert not has_answer(text, [r"^Darwin"], is_regex=True)
    assert not has_answer(text, ["(unclosed"], is_regex=True)


def test_evaluate_scores_predictions_and_retrieval(realm):
    qa = load_qa_split(realm.config, "dev")
    metrics, preds = evaluate(realm, qa, batch_size=4, k=3)
    assert metrics["num_examples"] == len(qa) == len(preds)
    assert metrics["exact_match"] == np.mean(
        [exact_match(p["prediction"], p["answers"]) for p in preds])
    assert metrics["recall@3"] == np.mean(
        [any(has_answer(realm.corpus[b]["text"], p["answers"]) for b in p["retrieved"])
         for p in preds])
    assert metrics["gold_recall@3"] == np.mean([p["gold_block"] in p["retrieved"]
                                                for p in preds])
    # Gold answers equal to the predictions: every question is an exact match; answers taken
    # from the third retrieved block: recall@3 is 1, recall@2 need not be.
    rows = [{"question": p["question"], "answers": [p["prediction"].upper() + "."],
             "gold_block": -1} for p in preds]
    assert evaluate(realm, QaSet(rows), k=3)[0]["exact_match"] == 1.0
    third = [{"question": p["question"], "answers": [realm.corpus[p["retrieved"][2]]["text"]],
              "gold_block": p["retrieved"][2]} for p in preds]
    m = evaluate(realm, QaSet(third), k=3)[0]
    assert m["recall@3"] == 1.0 and m["gold_recall@3"] == 1.0
    # CuratedTrec: answers are regular expressions, matched at the start.
    regex = [{"question": p["question"], "answers": [re.escape(p["prediction"][:2]) + ".*"],
              "gold_block": -1} for p in preds]
    assert evaluate(realm, QaSet(regex, is_regex=True), k=3)[0]["exact_match"] == 1.0
    for r in regex:
        r["answers"] = [".+" + re.escape(r["answers"][0])]  # needs text before the prefix
    assert evaluate(realm, QaSet(regex, is_regex=True), k=3)[0]["exact_match"] == 0.0
    assert evaluate(realm, qa, k=3, max_examples=3)[0]["num_examples"] == 3


def test_evaluate_command_writes_predictions_and_metrics(workdir, realm, tmp_path):
    metrics, out = evaluate_run(str(workdir[0]), split="dev", k=2, out_dir=str(tmp_path / "ev"))
    assert out == tmp_path / "ev"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == metrics["num_examples"] == len(load_qa_split(realm.config, "dev"))
    first = json.loads(lines[0])
    assert first["prediction"] == realm.answer(first["question"]).text
    assert metrics["step"] == 3 and metrics["split"] == "dev" and "recall@2" in metrics


# --------------------------------------------------------------------------- answer command


def test_answer_command_reports_bad_lines_and_answers_the_rest(realm):
    stdin = io.BytesIO(b"\n".join([QUESTIONS[0].encode(), b"   ", b"who was caf\xe9 born?",
                                   QUESTIONS[1].encode()]) + b"\n")
    out, err = io.StringIO(), io.StringIO()
    status = answer_all(realm, read_lines(stdin), out, err, as_json=True, batch_size=3)
    assert status == 1
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == 4 and records[1]["error"] and not records[0]["error"]
    assert records[0]["text"] == realm.answer(QUESTIONS[0]).text
    assert records[2]["question"] == "who was caf\ufffd born?" and records[2]["warning"]
    assert "error: input line 2: question is empty or whitespace-only" in err.getvalue()
    assert "warning: input line 3: not valid UTF-8" in err.getvalue()

    out, err = io.StringIO(), io.StringIO()
    assert answer_all(realm, from_arguments(QUESTIONS[:2]), out, err, k=2) == 0
    text = out.getvalue()
    a = realm.answer(QUESTIONS[0])
    assert f"Q: {QUESTIONS[0]}" in text and f"A: {a.text}" in text and f"«{a.text}»" in text
    assert "[2] block" in text and not err.getvalue()


def test_answer_command_end_to_end(workdir, realm):
    cmd = [sys.executable, "-m", "realm_jax.answer", "--workdir", str(workdir[0]), "--json"]
    # One device here (the run was written on 8): the saved mesh adapts.
    env = {**os.environ, "XLA_FLAGS": ""}
    done = subprocess.run([*cmd, QUESTIONS[0], " "], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert done.returncode == 1, done.stderr
    assert "error: argument 2: question is empty or whitespace-only" in done.stderr
    record = json.loads(done.stdout.splitlines()[0])
    assert record["text"] == realm.answer(QUESTIONS[0]).text
    missing = subprocess.run([*cmd[:4], str(workdir[0] / "nope"), "q"], capture_output=True,
                             text=True, env=env, timeout=300, cwd=REPO)
    assert missing.returncode == 1 and "error: " in missing.stderr
    assert "is not a directory" in missing.stderr
