"""The Inverse Cloze Task (task=ict): the example builder, the in-batch loss against numpy,
sharded against single-device, that it learns, and a run whose workdir starts REALM's
retriever."""

import os

import jax
import numpy as np
import optax
import pytest

from realm_jax import defaults, initialize, sharding
from realm_jax.data import loaders
from realm_jax.data.blocks import split_sentences
from realm_jax.data.ict import ict_dataset, ict_example, nonempty_blocks
from realm_jax.data.joins import tokenize_corpus
from realm_jax.data.pipeline import to_global
from realm_jax.tasks import make_task
from realm_jax.tasks.ict import MASKED_LOGIT, Ict, in_batch_loss
from realm_jax.testing.tasks import towers_of
from realm_jax.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = "Ada Lovelace wrote notes. She saw loops! Did it halt? It did."


def ict_config(**overrides):
    return defaults.load_config(os.path.join(ROOT, "configs/ict.py:tiny"), overrides)


def make(config, mesh=None):
    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    tok = loaders.load_tokenizer(config)
    corpus = loaders.load_corpus(config)
    task = make_task(config, mesh, corpus, tokenize_corpus(corpus, tok), tok)
    assert isinstance(task, Ict)
    return task


def first_batch(task, seed=0):
    return next(iter(task.dataset(seed)))


def numpy_loss(q, z, block_index):
    """The reference: log-softmax over each row of q @ z.T, duplicates (off-diagonal) masked."""
    q, z = np.asarray(q, np.float64), np.asarray(z, np.float64)
    logits = q @ z.T
    same = block_index[:, None] == block_index[None, :]
    logits = np.where(same & ~np.eye(len(q), dtype=bool), MASKED_LOGIT, logits)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    return -np.mean(np.diag(log_p)), np.mean(logits.argmax(1) == np.arange(len(q)))


# --------------------------------------------------------------------------- the data


def test_example_removes_with_probability_mask_rate():
    sentences = [BODY[a:b] for a, b in split_sentences(BODY)]
    assert len(sentences) == 4
    for seed in range(40):
        kept = ict_example(BODY, np.random.default_rng(seed), mask_rate=0.0)
        assert not kept.removed and kept.body == BODY
        assert kept.query == sentences[kept.sentence]
        gone = ict_example(BODY, np.random.default_rng(seed), mask_rate=1.0)
        assert gone.removed and gone.query == kept.query  # the rate changes nothing else
        rest = [s for i, s in enumerate(sentences) if i != gone.sentence]
        assert gone.body == " ".join(rest)
    # Deterministic for a seed; every sentence gets drawn; removal ≈ the rate.
    draws = [ict_example(BODY, np.random.default_rng((7, i)), 0.9) for i in range(2000)]
    again = [ict_example(BODY, np.random.default_rng((7, i)), 0.9) for i in range(2000)]
    assert draws == again
    assert {d.sentence for d in draws} == {0, 1, 2, 3}
    assert 0.87 < np.mean([d.removed for d in draws]) < 0.93
    one = ict_example("Just one sentence.", np.random.default_rng(0), 1.0)
    assert (one.query, one.body) == ("Just one sentence.", "")
    with pytest.raises(ValueError, match="non-empty body"):
        ict_example("  ", np.random.default_rng(0))


def test_dataset_rows_are_sentences_of_their_blocks_and_resume():
    config = ict_config()
    tok = loaders.load_tokenizer(config)
    corpus = loaders.load_corpus(config)
    blocks = tokenize_corpus(corpus, tok)
    drawable = nonempty_blocks(blocks)
    assert len(drawable) == len(corpus)  # the generated KB has no empty bodies

    def dataset(mask_rate, seed=0):
        return ict_dataset(corpus, tok, drawable, batch_size=8, seed=seed, query_len=24,
                           block_len=48, mask_rate=mask_rate)

    for rate in (0.0, 1.0):
        batch = next(iter(dataset(rate)))
        assert batch["removed"].all() == (rate == 1.0) and batch["removed"].any() == (rate == 1)
        for i, b in enumerate(batch["block_index"]):
            text = corpus[int(b)]["text"]
            sentences = [tok.tokenize([text[x:y]])[0][:22] for x, y in split_sentences(text)]
            n = batch["query_mask"][i].sum()
            assert list(batch["query_ids"][i, 1: n - 1]) in sentences
            expect = blocks.encode(np.array([b]), 48).input_ids[0]
            # The block keeps its query sentence exactly when nothing was removed.
            assert np.array_equal(batch["block_ids"][i], expect) == (rate == 0.0)
            assert batch["block_ids"][i, 0] == tok.cls_id
    # The same seed gives the same batches; a restored iterator continues where it stopped.
    it = iter(dataset(0.9))
    next(it)
    state = it.get_state()
    want = next(it)
    resumed = iter(dataset(0.9))
    resumed.set_state(state)
    got = next(resumed)
    for k in ("query_ids", "block_ids", "block_index", "removed"):
        np.testing.assert_array_equal(got[k], want[k])
    other = next(iter(dataset(0.9, seed=1)))
    assert not np.array_equal(other["block_index"], next(iter(dataset(0.9)))["block_index"])


# --------------------------------------------------------------------------- the loss


def test_in_batch_loss_matches_numpy(eight_devices):
    rng = np.random.default_rng(0)
    q, z = rng.normal(size=(2, 6, 5)).astype(np.float32)
    index = np.array([3, 1, 3, 4, 5, 6], np.int32)  # rows 0 and 2 hold the same block
    loss, acc = in_batch_loss(q, z, index)
    want_loss, want_acc = numpy_loss(q, z, index)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert float(acc) == pytest.approx(want_acc)
    unmasked, _ = numpy_loss(q, z, np.arange(6))
    assert abs(want_loss - unmasked) > 1e-3  # the duplicate mask matters here

    # The task's loss: the embedder's query and block embeddings, then the same reference.
    config = ict_config(**{"model.embed_dropout": 0.0, "train.batch_size": 16})
    task = make(config)
    params, _ = initialize.initial_params(config, task.towers, task.mesh)
    inputs, _ = task.prepare(first_batch(task), params, None)
    inputs["block_index"][1] = inputs["block_index"][0]  # a duplicate to mask
    loss, metrics = sharding.jit_sharded(task.loss, task.mesh, task.rules)(
        params, to_global(inputs, task.mesh, task.rules), jax.random.key(0))

    def embed(prefix):
        return task.embedder.apply({"params": params["embedder"]}, inputs[f"{prefix}_ids"],
                                   inputs[f"{prefix}_mask"], inputs[f"{prefix}_types"])

    want_loss, want_acc = numpy_loss(embed("query"), embed("block"), inputs["block_index"])
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert float(metrics["ict_accuracy"]) == pytest.approx(want_acc)

    # realm.score_scale scales ICT's scores as it scales REALM's.
    scaled = make(ict_config(**{"model.embed_dropout": 0.0, "train.batch_size": 16,
                                "realm.score_scale": "inv_sqrt_d"}))
    d = config.model.proj_size or config.model.bert.hidden_size
    assert scaled.score_scale == pytest.approx(d ** -0.5)
    loss, _ = sharding.jit_sharded(scaled.loss, task.mesh, task.rules)(
        params, to_global(inputs, task.mesh, task.rules), jax.random.key(0))
    want_loss, _ = numpy_loss(embed("query") * d ** -0.5, embed("block"), inputs["block_index"])
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)


def test_sharded_equals_single_device(eight_devices):
    config = ict_config(**{"train.batch_size": 16})
    task = make(config)
    assert sharding.mesh_batch_size(task.mesh, task.rules) == 8
    params, _ = initialize.initial_params(config, task.towers, task.mesh)
    inputs, _ = task.prepare(first_batch(task), params, None)
    rng = jax.random.key(3)  # dropout on: the keys must not depend on the layout either
    grad = jax.value_and_grad(task.loss, has_aux=True)
    (loss8, m8), g8 = sharding.jit_sharded(grad, task.mesh, task.rules)(
        params, to_global(inputs, task.mesh, task.rules), rng)

    one = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    host = jax.device_get(params)
    (loss1, m1), g1 = sharding.jit_sharded(grad, one, task.rules)(
        jax.device_put(host, jax.devices()[0]), to_global(inputs, one, task.rules), rng)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5, atol=1e-6)
    assert float(m8["ict_accuracy"]) == float(m1["ict_accuracy"])
    for a, b in zip(jax.tree.leaves(jax.device_get(g8)), jax.tree.leaves(jax.device_get(g1)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_training_raises_in_batch_accuracy(eight_devices):
    """mask_rate=0 (the query stays in its block): a 1-layer model learns to find its block.

    Mean pooling: the tiny model's [CLS] pooler starts with nearly the same embedding for every
    input (its random attention barely mixes tokens into [CLS]), so its first gradients are
    ~1e-3 and 25 steps would measure that start, not whether ICT learns.
    """
    config = ict_config(**{"ict.mask_rate": 0.0, "train.batch_size": 32,
                           "model.embed_dropout": 0.0, "model.pooling": "mean"})
    task = make(config)
    params, _ = initialize.initial_params(config, task.towers, task.mesh)
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    def step(params, opt_state, inputs, rng):
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(
            params, inputs, rng)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics["ict_accuracy"]

    step = sharding.jit_sharded(step, task.mesh, task.rules)
    probe = to_global(task.prepare(first_batch(task, seed=99), params, None)[0], task.mesh,
                      task.rules)
    accuracy = sharding.jit_sharded(lambda p: task.loss(p, probe, jax.random.key(0))[1],
                                    task.mesh, task.rules)
    before = float(accuracy(params)["ict_accuracy"])
    data = iter(task.dataset(0))
    for i in range(25):
        inputs = to_global(task.prepare(next(data), params, None)[0], task.mesh, task.rules)
        params, opt_state, _ = step(params, opt_state, inputs, jax.random.key(i))
    after = float(accuracy(params)["ict_accuracy"])
    assert after >= before + 0.25, (before, after)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ict_run(tmp_path_factory):
    """A 3-step ICT run with a fresh-index evaluation, then resumed to step 5."""
    work = tmp_path_factory.mktemp("ict") / "run"
    first = train(ict_config(**{"train.steps": 3}), work, progress=False)
    resumed = train(ict_config(**{"train.steps": 5}), work, progress=False)
    return work, first, resumed


def test_train_evaluates_and_resumes(ict_run, eight_devices):
    work, first, resumed = ict_run
    assert first.step == 3 and first.origin == "scratch" and first.index_swaps == 0
    assert all(np.isfinite(h["loss"]) for h in first.history)
    assert {"ict_accuracy", "removed_fraction", "grad_norm"} <= set(first.history[0])
    assert "staleness_steps" not in first.history[0]  # no index while training
    recall = first.evals[-1]["fresh_gold_recall_at_5"]
    assert 0.0 <= recall <= 1.0
    assert not (work / "index").exists()
    assert resumed.origin == "workdir" and [h["step"] for h in resumed.history] == [4, 5]
    assert "fresh_gold_recall_at_5" in resumed.evals[-1]


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(ict_run, tmp_path, eight_devices):
    """Same data (the iterator's state in the checkpoint), same parameters, same losses."""
    _, _, resumed = ict_run
    straight = train(ict_config(**{"train.steps": 5}), tmp_path / "straight", progress=False)
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)),
                    jax.tree.leaves(jax.device_get(straight.params)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [h["loss"] for h in straight.history[3:]] == [h["loss"] for h in resumed.history]


def test_ict_workdir_starts_realms_retriever(ict_run, eight_devices):
    work, _, resumed = ict_run
    config = defaults.load_config(os.path.join(ROOT, "configs/tiny.py"),
                                  {"init.embedder_path": str(work)})
    towers = towers_of(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    params, _ = initialize.initial_params(config, towers, mesh)
    ict = jax.device_get(resumed.params["embedder"])
    for a, b in zip(jax.tree.leaves(jax.device_get(params["embedder"])), jax.tree.leaves(ict),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # Not vacuous: ICT moved the embedder away from the seed's random init, which REALM's
    # embedder would otherwise start from (the same seed and tower position).
    scratch, _ = initialize.init_towers(defaults.model_config(config), ("embedder",), mesh,
                                        tuple(config.rules), config.seed)
    assert not np.array_equal(jax.device_get(scratch["embedder"]["proj"]["kernel"]),
                              ict["proj"]["kernel"])


# --------------------------------------------------------------------------- the config


def test_ict_config_is_orqas_recipe():
    c = defaults.load_config(os.path.join(ROOT, "configs/ict.py"))
    assert c.task == "ict" and c.model.bert.preset == "bert_base"
    assert (c.model.proj_size, c.model.pooling) == (128, "cls_pooler")
    assert (c.train.batch_size, c.train.steps, c.train.lr) == (4096, 100_000, 1e-4)
    assert (c.data.query_len, c.data.block_len, c.ict.mask_rate) == (64, 288, 0.9)
    assert c.init.path  # from BERT
    pre = defaults.load_config(os.path.join(ROOT, "configs/pretrain_ccnews.py"))
    assert pre.init.embedder_path.endswith("ict_embedder")  # where this run's docstring writes
    assert pre.data.corpus == c.data.corpus  # ICT's queries come from the blocks REALM searches
    demo = defaults.load_config(os.path.join(ROOT, "configs/ict.py:demo"))
    realm_demo = defaults.load_config(os.path.join(ROOT, "configs/demo_cpu.py"))
    # The demo's embedder is the REALM demo's, so its workdir can be that run's embedder_path.
    for key in ("bert", "pooling", "proj_size", "normalize"):
        assert demo.model[key] == realm_demo.model[key], key
