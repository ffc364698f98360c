"""What makes REALM pre-training teach the retriever: the freeze switch, score scaling, the
pdist and match retriever losses, and the held-out measures (fresh-index recall, retrieval
utility, whether the encoder reads)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import defaults, initialize, optim, run_checkpoints, sharding
from realm_jax.data.joins import tokenize_corpus
from realm_jax.data.loaders import load_corpus, load_tokenizer
from realm_jax.embedding import block_runner
from realm_jax.models.losses import (
    inbatch_negative_scores,
    marginal_mlm_loss,
    realm_loss,
    score_scale,
)
from realm_jax.tasks import make_task
from realm_jax.tasks.realm_mlm import masked_spans
from realm_jax.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
    return defaults.load_config(os.path.join(ROOT, "configs/tiny.py"), overrides)


def np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


# --------------------------------------------------------------------------- losses


def test_score_scale():
    assert score_scale("none", 128) == 1.0
    assert score_scale("inv_sqrt_d", 128) == pytest.approx(128 ** -0.5)
    assert score_scale("0.25", 384) == 0.25
    for bad in ("sqrt", "-1", "0"):
        with pytest.raises(ValueError, match="score_scale"):
            score_scale(bad, 128)


def _case(seed=0, b=3, k=4, m=5, v=7):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(b, k, m, v)).astype(np.float32)
    labels = rng.integers(0, v, size=(b, m)).astype(np.int32)
    weights = (rng.random((b, m)) < 0.7).astype(np.float32)
    weights[:, 0] = 1.0
    retrieval = rng.normal(scale=3.0, size=(b, k)).astype(np.float32)
    return logits, labels, weights, retrieval


def _np_per_candidate(logits, labels, weights):
    """[B, K]: each candidate's mean log-likelihood of the masked tokens (the pdist teacher's
    logits), in float64."""
    logp = np_log_softmax(logits.astype(np.float64))  # [B, K, M, V]
    tok = np.take_along_axis(logp, np.broadcast_to(labels[:, None, :, None],
                                                   logp.shape[:-1] + (1,)), -1)[..., 0]
    return (tok * weights[:, None]).sum(-1) / weights.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_pdist_loss_and_retriever_gradient_match_numpy(temperature):
    logits, labels, weights, retrieval = _case()
    loss, aux = realm_loss(logits, labels, weights, retrieval, retriever_loss="pdist",
                           teacher_temperature=temperature)
    # numpy: teacher = softmax over candidates of the mean masked-token log-likelihood / T.
    per_cand = _np_per_candidate(logits, labels, weights)  # [B, K]
    # Over the retrieved candidates only: column 0, the null document, is left out.
    teacher = np.exp(np_log_softmax(per_cand[:, 1:] / temperature))
    student = np_log_softmax(retrieval[:, 1:].astype(np.float64))
    kl = (teacher * (np.log(teacher) - student)).sum(-1).mean()
    marginal, _ = marginal_mlm_loss(logits, labels, weights, retrieval)
    np.testing.assert_allclose(float(aux["retriever_loss"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(marginal) + kl, rtol=1e-5)
    # The retriever's gradient is (p(z|x) − teacher) / B: the teacher ignores the ranking.
    grad = jax.grad(lambda r: realm_loss(logits, labels, weights, r, retriever_loss="pdist",
                                         teacher_temperature=temperature)[0])(retrieval)
    expect = np.zeros_like(retrieval)
    expect[:, 1:] = (np.exp(student) - teacher) / len(retrieval)
    np.testing.assert_allclose(np.asarray(grad), expect, atol=1e-6)  # the null gets none


def test_match_loss_and_gradient_match_numpy():
    logits, labels, weights, retrieval = _case(2)
    match = np.array([[False, True, False, True], [False, False, False, False],
                      [True, False, True, False]])  # row 1: no block holds the span
    loss, aux = realm_loss(logits, labels, weights, retrieval, retriever_loss="match",
                           cand_match=match)
    # numpy: −log Σ_{matching retrieved z} p(z|x), p over the retrieved candidates 1..K−1
    # (the null document is out, even marked as matching); 0 where none matches.
    log_p = np_log_softmax(retrieval[:, 1:].astype(np.float64))
    m = match[:, 1:]
    per_row = [-np.log(np.exp(lp[r]).sum()) if r.any() else 0.0
               for lp, r in zip(log_p, m, strict=True)]
    marginal, _ = marginal_mlm_loss(logits, labels, weights, retrieval)
    np.testing.assert_allclose(float(aux["retriever_loss"]), np.mean(per_row), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(marginal) + np.mean(per_row), rtol=1e-5)
    # Gradient: (p(z|x) − p(z|x, match)) / B on the retrieved; nothing where none matches.
    grad = np.asarray(jax.grad(lambda r: realm_loss(
        logits, labels, weights, r, retriever_loss="match", cand_match=match)[0])(retrieval))
    p = np.exp(log_p)
    posterior = np.where(m, p, 0) / np.maximum(np.where(m, p, 0).sum(-1, keepdims=True), 1e-30)
    expect = np.where(m.any(-1, keepdims=True), p - posterior, 0) / len(retrieval)
    np.testing.assert_allclose(grad[:, 1:], expect, atol=1e-6)
    assert not grad[:, 0].any()
    with pytest.raises(ValueError, match="cand_match"):
        realm_loss(logits, labels, weights, retrieval, retriever_loss="match")


def test_inbatch_negatives_mask_nulls_own_rows_and_shared_blocks():
    """Row i's negatives are the other rows' real candidates that are not among its own."""
    rng = np.random.default_rng(5)
    q = rng.normal(size=(3, 4)).astype(np.float32)
    z = rng.normal(size=(3, 3, 4)).astype(np.float32)
    cand = np.array([[-1, 7, 8], [-1, 8, 9], [-1, 10, -1]], np.int32)  # 8 shared by rows 0, 1
    got = np.asarray(inbatch_negative_scores(q, z, cand, scale=0.5))  # [3, 9]
    for i in range(3):
        for n in range(3):
            for k in range(3):
                blk = cand[n, k]
                negative = n != i and blk >= 0 and blk not in cand[i]
                value = got[i, n * 3 + k]
                if negative:
                    np.testing.assert_allclose(value, 0.5 * q[i] @ z[n, k], rtol=1e-5)
                else:
                    assert value < -1e30, (i, n, k)
    assert (got[0] > -1e30).sum() == 2 and (got[2] > -1e30).sum() == 4  # 9 and 10; 7, 8, 8, 9


@pytest.mark.parametrize("kind", ["pdist", "match"])
def test_inbatch_negatives_join_the_retriever_softmax_only(kind):
    """With negatives, the retriever's softmax runs over its candidates and them (the teacher
    or the match gives them nothing); masked ones change nothing; the encoder's marginal is
    untouched; the marginal loss refuses them."""
    logits, labels, weights, retrieval = _case(3)
    match = np.array([[False, True, False, False], [False, False, True, True],
                      [False, False, False, False]])
    neg = np.random.default_rng(4).normal(scale=3.0, size=(3, 5)).astype(np.float32)
    kw = dict(retriever_loss=kind, cand_match=match)
    loss, aux = realm_loss(logits, labels, weights, retrieval, negatives=neg, **kw)
    full = np_log_softmax(np.concatenate([retrieval[:, 1:], neg], -1).astype(np.float64))
    own = full[:, :3]
    if kind == "pdist":
        per_cand = _np_per_candidate(logits, labels, weights)
        teacher = np.exp(np_log_softmax(per_cand[:, 1:]))
        want = (teacher * (np.log(teacher) - own)).sum(-1).mean()
    else:
        m = match[:, 1:]
        want = np.mean([-np.log(np.exp(lp[r]).sum()) if r.any() else 0.0
                        for lp, r in zip(own, m, strict=True)])
    np.testing.assert_allclose(float(aux["retriever_loss"]), want, rtol=1e-5)
    marginal, _ = marginal_mlm_loss(logits, labels, weights, retrieval)
    np.testing.assert_allclose(float(loss) - float(aux["retriever_loss"]), float(marginal),
                               rtol=1e-5)
    masked = neg + np.finfo(np.float32).min
    _, none_aux = realm_loss(logits, labels, weights, retrieval, **kw)
    _, masked_aux = realm_loss(logits, labels, weights, retrieval, negatives=masked, **kw)
    np.testing.assert_allclose(float(masked_aux["retriever_loss"]),
                               float(none_aux["retriever_loss"]), rtol=1e-6)
    assert float(aux["retriever_loss"]) > float(none_aux["retriever_loss"])
    with pytest.raises(ValueError, match="negatives"):
        realm_loss(logits, labels, weights, retrieval, negatives=neg)


def test_masked_spans_are_contiguous_runs_only():
    positions, labels = np.array([[3, 4, 0]]), np.array([[5, 6, 0]])
    weights = np.array([[1.0, 1.0, 0.0]])
    assert masked_spans(positions, labels, weights) == [[[5, 6]]]
    # Masked positions with a gap (random-token masking): no span to look for.
    assert masked_spans(np.array([[3, 5, 0]]), labels, weights) == [[]]
    assert masked_spans(positions, labels, 0 * weights) == [[]]


def test_marginal_is_the_released_loss_and_unknown_loss_is_refused():
    logits, labels, weights, retrieval = _case(1)
    loss, aux = realm_loss(logits, labels, weights, retrieval)
    expect, _ = marginal_mlm_loss(logits, labels, weights, retrieval)
    assert float(loss) == float(expect) == float(aux["retriever_loss"])
    with pytest.raises(ValueError, match="retriever_loss"):
        realm_loss(logits, labels, weights, retrieval, retriever_loss="emdr")


# --------------------------------------------------------------------------- freeze switch


def test_frozen_schedule_is_zero_then_warms_up():
    base = optim.learning_rate(1.0, 100, 10)
    frozen = optim.frozen_then(base, 20, 100, 10)
    assert all(float(frozen(s)) == 0.0 for s in range(21))
    assert float(frozen(30)) == pytest.approx(1.0)  # warmed up again 10 steps after
    assert 0 < float(frozen(60)) < 1.0 and float(frozen(100)) == pytest.approx(0.0)


def test_freeze_keeps_the_retriever_bitwise_then_moves_it(tmp_path, eight_devices):
    config = tiny(**{"train.steps": 4, "train.freeze_steps": {"embedder": 2},
                     "train.warmup_steps": 0, "train.checkpoint_every": 1})
    mesh = sharding.make_mesh(dict(config.mesh))
    start, _ = initialize.initial_params(config, ("embedder", "encoder"), mesh)
    start = jax.device_get(start)
    train(config, tmp_path, progress=False)
    manager = run_checkpoints.checkpoint_manager(tmp_path, read_only=True)
    assert manager.all_steps() == [1, 2, 3, 4]

    def tower(step, name):
        return jax.device_get(run_checkpoints.restore_items(manager, step, {name: None})[name])

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    assert same(tower(1, "embedder"), start["embedder"])
    assert same(tower(2, "embedder"), start["embedder"])
    assert not same(tower(4, "embedder"), start["embedder"])  # moves once unfrozen
    # the encoder trains meanwhile (the schedule starts at 0, so from the second step on)
    assert not same(tower(2, "encoder"), start["encoder"])
    manager.close()


# --------------------------------------------------------------------------- measures


def test_fresh_recall_heldout_utility_and_reading_equal_direct_computation(tmp_path, eight_devices):
    config = tiny(**{"train.steps": 2, "eval.fresh_index": True, "eval.heldout_sentences": 16,
                     "realm.score_scale": "inv_sqrt_d"})
    result = train(config, tmp_path, progress=False)
    final = result.evals[-1]
    assert {"gold_recall_at_5", "fresh_gold_recall_at_5", "gold_recall_at_1",
            "fresh_gold_recall_at_1", "heldout_retrieval_utility",
            "heldout_mlm_accuracy", "heldout_fresh_gold_recall_at_1",
            "heldout_fresh_gold_recall_at_5"} <= set(final)
    params = result.params
    mesh = sharding.make_mesh(dict(config.mesh))
    tok = load_tokenizer(config)
    corpus = load_corpus(config)
    blocks = tokenize_corpus(corpus, tok)
    task = make_task(config, mesh, corpus, blocks, tok)

    # Fresh recall: every block embedded now, brute-force top-5 in numpy.
    table = block_runner(config, mesh).embed_blocks(params["embedder"], blocks, console=False)
    questions, gold = task.recall.questions
    q = task.queries.embed(params["embedder"], tok.encode_queries(questions, config.data.query_len))
    top = np.argsort(-(q @ table.T), axis=1, kind="stable")[:, :5]
    keep = gold >= 0
    for k in (1, 5):
        expect = (top[keep, :k] == gold[keep][:, None]).any(-1).mean()
        assert final[f"fresh_gold_recall_at_{k}"] == pytest.approx(expect), k

    # Held-out utility: per example Σ_j [log Σ_z p(z|x) p(y_j|z,x) − log p(y_j|null, x)] / n,
    # with every tower run deterministically on the inputs `prepare` builds.
    from realm_jax.models import Embedder, KnowledgeAugEncoder
    from realm_jax.retrieval.live import LiveIndex

    cfg = defaults.model_config(config)
    live = LiveIndex(config, tmp_path, mesh, corpus_fp=corpus.fingerprint, mode="external")
    live.start(0)
    def token_lp(x):  # [B, K, M] log p(y_j | z, x) of the encoder on the joins of x
        logits = np.asarray(KnowledgeAugEncoder(cfg).apply(
            {"params": params["encoder"]}, x["join_ids"], x["join_mask"], x["join_types"],
            x["mlm_positions"]), np.float64)
        logp = np_log_softmax(logits)
        return np.take_along_axis(logp, np.broadcast_to(
            x["mlm_labels"][:, None, :, None], logp.shape[:-1] + (1,)), -1)[..., 0]

    utilities, gains, firsts, matched_gold, sentence_rank = [], [], [], [], []
    for batch in task._heldout_batches:
        x, _ = task.prepare(batch, params, live.searcher)
        emb = lambda ids, mask, types: np.asarray(Embedder(cfg).apply(  # noqa: E731
            {"params": params["embedder"]}, ids, mask, types), np.float64)
        # Held-out sentences' fresh recall: the masked query against every block now.
        scores = emb(batch["query_ids"], batch["query_mask"], batch["query_types"]) @ table.T
        order = np.argsort(-scores, axis=1, kind="stable")
        sentence_rank.extend((order == batch["gold_blocks"][:, None]).argmax(-1))
        qe = emb(x["query_ids"], x["query_mask"], x["query_types"])
        ze = emb(x["cand_ids"], x["cand_mask"], x["cand_types"])
        log_pz = np_log_softmax(np.einsum("bd,bkd->bk", qe, ze) * 16 ** -0.5)
        tok_lp, w = token_lp(x), x["mlm_weights"]
        marginal = np.log(np.exp(log_pz[..., None] + tok_lp).sum(1))  # [B, M]
        u = ((marginal - tok_lp[:, 0]) * w).sum(-1) / np.maximum(w.sum(-1), 1)
        utilities.append(u.mean())

        # Reading: the gold block second, the retrieved others after it, none twice.
        gold = batch["gold_blocks"]
        cands = task.gold_candidates(task.candidates(batch, params, live.searcher), gold)
        assert (gold >= 0).all() and (cands[:, 1] == gold).all() and (cands[:, 0] == -1).all()
        assert not (cands[:, 2:] == gold[:, None]).any()
        with_gold = task.inputs(batch, cands)
        ll = (token_lp(with_gold) * w[:, None]).sum(-1) / np.maximum(
            w.sum(-1), 1)[:, None]  # [B, K]
        # match's targets: the candidates whose body holds the masked span (never the null).
        for row, span in enumerate(x["mlm_labels"][i][w[i] > 0].tolist() for i in range(len(w))):
            for z, block in enumerate(cands[row]):
                body = blocks.bodies.gather(np.array([block]), 10_000)[0][0].tolist()
                holds = block >= 0 and any(body[i:i + len(span)] == span
                                           for i in range(len(body) - len(span) + 1))
                assert bool(with_gold["cand_match"][row, z]) == holds, (row, z)
        matched_gold.extend(with_gold["cand_match"][:, 1])
        gains.extend(ll[:, 1] - ll[:, 0])
        firsts.extend(ll[:, 1] > ll[:, 2:].max(-1))
    live.close()
    assert final["heldout_retrieval_utility"] == pytest.approx(np.mean(utilities), abs=1e-4)
    assert final["heldout_gold_gain"] == pytest.approx(np.mean(gains), abs=1e-4)
    assert final["heldout_teacher_gold_first"] == pytest.approx(np.mean(firsts))
    for k in (1, 5):
        assert final[f"heldout_fresh_gold_recall_at_{k}"] == pytest.approx(
            np.mean(np.array(sentence_rank) < k)), k
    assert any(matched_gold)  # the gold block holds the masked fact: something to match


def test_realm_config_keys_reach_the_loss(eight_devices):
    config = tiny(**{"realm.retriever_loss": "pdist", "realm.score_scale": "0.5",
                     "realm.teacher_temperature": 2.0})
    mesh = sharding.make_mesh(dict(config.mesh))
    task = make_task(config, mesh, None, None, None)
    assert (task.retriever_loss, task.score_scale, task.teacher_temperature) == ("pdist", 0.5,
                                                                                 2.0)
    shapes = task.input_shapes(8)
    rng = np.random.default_rng(0)
    inputs = {k: jnp.asarray(rng.integers(1, 50, s).astype(d)) if k.endswith("_ids")
              else jnp.ones(s, d) if k.endswith(("_mask", "_weights")) else jnp.zeros(s, d)
              for k, (s, d) in shapes.items()}
    blocks = np.arange(8 * task.k).reshape(8, task.k)
    inputs["cand_block"] = jnp.asarray(np.where(blocks % task.k == 0, -1, blocks), np.int32)
    params, _ = initialize.init_towers(defaults.model_config(config), task.towers, mesh)
    loss, metrics = task.loss(params, inputs, jax.random.key(0))
    assert np.isfinite(float(loss)) and "retriever_loss" in metrics
    # realm.inbatch_negatives: the other rows' blocks join the retriever's softmax.
    with_negatives = make_task(tiny(**{"realm.retriever_loss": "pdist",
                                       "realm.score_scale": "0.5",
                                       "realm.teacher_temperature": 2.0,
                                       "realm.inbatch_negatives": True}), mesh, None, None, None)
    loss_n, metrics_n = with_negatives.loss(params, inputs, jax.random.key(0))
    assert float(metrics_n["retriever_loss"]) > float(metrics["retriever_loss"])
    np.testing.assert_allclose(float(loss_n) - float(metrics_n["retriever_loss"]),
                               float(loss) - float(metrics["retriever_loss"]), rtol=1e-5)
    with pytest.raises(ValueError, match="inbatch_negatives"):
        make_task(tiny(**{"realm.inbatch_negatives": True}), mesh, None, None, None)


def test_benchmark_realm_and_orqa_steps_lengthen_their_stages_only(benchmark_module,
                                                                   monkeypatch, tmp_path):
    bench = benchmark_module("realm_learning")
    steps = {}

    def fake_run(pipeline, arms):  # what each stage would train for, nothing trained
        for stage in ("", "norefresh", "mlm", "ict", "orqa"):
            c = pipeline.cfg(stage)
            steps[stage] = (c.train.steps, c.refresh.mode, c.refresh.every_steps)
        return {arm: {"em": 0.0} for arm in arms}

    monkeypatch.setattr(bench.stages.Pipeline, "run", fake_run)
    default = {}
    bench.run(str(tmp_path / "a"), ["reading"], [0], ["refresh", "norefresh"], "sync", {})
    default.update(steps)
    bench.run(str(tmp_path / "b"), ["reading"], [0], ["refresh", "norefresh"], "sync", {},
              realm_steps=default[""][0] + 7)
    assert steps[""] == (default[""][0] + 7, "sync", 10)
    assert steps["norefresh"] == (default[""][0] + 7, "sync", 0)  # still never refreshed
    for stage in ("mlm", "ict", "orqa"):
        assert steps[stage] == default[stage]
    # --orqa-steps: every arm's ORQA, nothing else.
    bench.run(str(tmp_path / "c"), ["reading"], [0], ["refresh", "norefresh"], "sync", {},
              orqa_steps=default["orqa"][0] + 5)
    assert steps["orqa"][0] == default["orqa"][0] + 5
    for stage in ("", "norefresh", "mlm", "ict"):
        assert steps[stage] == default[stage]


def test_benchmark_every_start_builds_every_stage(benchmark_module, monkeypatch, tmp_path):
    """Each start `--starts` accepts is one of configs/demo_cpu.py's, with a refresh interval;
    `small`'s towers are 2 layers of MiniLM in every stage, the reader's (ORQA) included."""
    bench = benchmark_module("realm_learning")
    assert set(bench.REFRESH_EVERY) == set(bench.READERS)
    layers = {}

    def fake_run(pipeline, arms):
        for stage in ("", "norefresh", "mlm", "ict", "orqa"):
            c = pipeline.cfg(stage)
            layers[pipeline.start, stage] = (c.model.bert.get("preset"),
                                             defaults.model_config(c).bert.num_layers)
        return {arm: {"em": 0.0} for arm in arms}

    monkeypatch.setattr(bench.stages.Pipeline, "run", fake_run)
    bench.run(str(tmp_path), sorted(bench.READERS), [0], ["refresh"], "sync", {})
    assert {s for s, _ in layers} == {"" if s == "minilm" else s for s in bench.READERS}
    for stage in ("", "norefresh", "mlm", "ict", "orqa"):
        assert layers["small", stage] == ("minilm_l6_h384", 2)
        assert layers["reading", stage] == ("minilm_l6_h384", 6)


def test_benchmark_summarizes_seeds_into_medians_and_ranges(benchmark_module):
    bench = benchmark_module("realm_learning")

    def arm(r1: float, em: float) -> dict:
        return {"em": em, "answer_recall@2": 0.9, "recall_start": 0.7, "recall_before": 0.9,
                "recall_after": 0.95, "recall_at_1_start": 0.2, "recall_at_1_before": 0.25,
                "recall_at_1_after": r1, "utility_curve": [[0, -0.1], [30, 0.2]],
                "gold_gain_before": 0.01, "gold_gain_after": r1 / 10,
                "teacher_gold_first_before": 0.33, "teacher_gold_first_after": 0.5,
                "fresh_gold_recall_at_1_before": 0.2, "fresh_gold_recall_at_1_after": r1 + 0.25}

    ict = {"recall_untrained": 0.7, "recall_trained": 0.9, "recall_at_1_untrained": 0.2,
           "recall_at_1_trained": 0.25}
    results = {"cpu": "test", "seeds": [0, 1, 2], "arms": ["refresh"], "runs": {"minilm": {
        str(s): {"refresh": arm(r1, em), "ict": ict}
        for s, (r1, em) in enumerate([(0.3, 0.5), (0.5, 0.4), (0.4, 0.6)])}}}
    results["summary"] = bench.summarize(results)
    s = results["summary"]["minilm"]["refresh"]
    assert s["recall_at_1_after"] == {"median": 0.4, "min": 0.3, "max": 0.5, "n": 3}
    assert s["em"]["median"] == 0.5 and s["utility_last"]["median"] == 0.2
    assert s["answer_recall"]["median"] == 0.9
    text = bench.table(results)
    assert s["gold_gain_after"] == {"median": 0.04, "min": 0.03, "max": 0.05, "n": 3}
    assert "0.400 [0.300, 0.500]" in text and "ICT alone" in text
    assert "0.040 [0.030, 0.050]" in text
    assert s["fresh_gold_recall_at_1_after"]["median"] == pytest.approx(0.65)
    assert "0.650 [0.550, 0.750]" in text  # the held-out sentences' recall@1 after REALM
    assert "steps" not in text.splitlines()[0]  # the configs' lengths: not named
    results["orqa_steps"] = 80
    assert "; ORQA 80 steps; " in bench.table(results).splitlines()[0]


def test_retrieval_by_fact_counts_recall_and_first_blocks(benchmark_module):
    """benchmarks/retrieval_by_fact.py's arithmetic on a hand-made search: two pages (blocks
    0–2 and 3–4), three queries."""
    bench = benchmark_module("retrieval_by_fact")
    ids = np.array([[0, 1, 2, 3, 4], [3, 4, 0, 1, 2], [1, 0, 2, 3, 4]])
    gold = np.array([0, 4, 1])  # found at ranks 0, 1, 0
    r = bench.by_fact(ids, gold, ["a", "b", "a"], np.array([0, 0, 0, 3, 3]))
    assert r["all"] == {"recall@1": pytest.approx(2 / 3), "recall@5": 1.0} and r["n"] == 3
    assert r["a"] == {"recall@1": 1.0, "recall@5": 1.0}
    assert r["b"] == {"recall@1": 0.0, "recall@5": 1.0}
    assert r["top1_first_block"] == pytest.approx(2 / 3)  # blocks 0 and 3 are first blocks
    assert r["gold_first_block"] == pytest.approx(1 / 3)
