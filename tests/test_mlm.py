"""Plain masked LM (task=mlm): the loss against Hugging Face BertForMaskedLM, learning on a
fixed batch, the example builder (masks, 80/10/10, labels, determinism), training end to end
with resume, and a REALM run initialised from the MLM workdir."""

import dataclasses
import os

import jax
import numpy as np
import optax
import pytest
import torch

from realm_jax import checkpoints, defaults, initialize, sharding
from realm_jax.data import loaders
from realm_jax.data import mlm as mlm_data
from realm_jax.data.joins import tokenize_corpus
from realm_jax.tasks.mlm import Mlm
from realm_jax.testing import hf_reference as ref
from realm_jax.testing.tasks import towers_of
from realm_jax.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlm_tiny(**overrides):
    return defaults.load_config(os.path.join(ROOT, "configs/mlm.py:tiny"), overrides)


def mesh8():
    return sharding.make_mesh(dict(data=-1, fsdp=1, model=1))


@pytest.fixture(scope="module")
def tiny_data():
    config = mlm_tiny()
    tok = loaders.load_tokenizer(config)
    corpus = loaders.load_corpus(config)
    return config, tok, corpus, tokenize_corpus(corpus, tok)


def leaves_equal(a, b) -> bool:
    a, b = jax.device_get(a), jax.device_get(b)
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --------------------------------------------------------------------------- the loss


def test_loss_matches_hf_bert_for_masked_lm(tmp_path, eight_devices):
    """Same weights, same ids: our task loss (through the K = 1 encoder and the gathered
    positions) equals BertForMaskedLM's loss with labels −100 off the masked positions."""
    from transformers import BertConfig as HFBertConfig

    hf = ref.build("BertForMaskedLM", HFBertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64), seed=3)
    hf.save_pretrained(tmp_path)
    cfg, pretrained = checkpoints.load_pretrained(tmp_path)
    assert set(pretrained) == {"bert", "mlm_head"}

    config = defaults.base_config()
    config.task = "mlm"
    bert = dataclasses.asdict(cfg.bert)
    bert.update(hidden_dropout=0.0, attention_dropout=0.0)  # HF runs in eval mode
    config.model.bert = bert
    config.mlm.update(max_len=20, max_masks=5)
    task = Mlm(config, mesh8(), None, None, None)

    rng = np.random.default_rng(0)
    b, length, m = 4, 20, 5
    ids, mask, types = ref.random_inputs(rng, b, length, 99)
    positions = np.zeros((b, m), np.int32)
    weights = np.zeros((b, m), np.float32)
    labels = np.zeros((b, m), np.int32)
    hf_labels = np.full((b, length), -100, np.int64)
    for i, n in enumerate([5, 3, 1, 4]):  # rows with padding (weight 0) positions
        pos = np.sort(rng.choice(np.arange(1, length // 2), size=n, replace=False))
        positions[i, :n], weights[i, :n] = pos, 1.0
        labels[i, :n] = rng.integers(3, 99, size=n)
        hf_labels[i, pos] = labels[i, :n]
    inputs = {"input_ids": ids.astype(np.int32), "input_mask": mask.astype(np.int32),
              "input_types": types.astype(np.int32), "mlm_positions": positions,
              "mlm_labels": labels, "mlm_weights": weights}
    params = {"encoder": {"bert": pretrained["bert"], **pretrained["mlm_head"]}}
    loss, metrics = task.loss(params, inputs, jax.random.key(0))

    with torch.no_grad():
        out = hf(ref.torch_tensor(ids), attention_mask=ref.torch_tensor(mask),
                 token_type_ids=ref.torch_tensor(types), labels=ref.torch_tensor(hf_labels))
    np.testing.assert_allclose(float(loss), float(out.loss), atol=1e-4, rtol=0)
    hf_pred = ref.to_numpy(out.logits).argmax(-1)  # [B, L]
    at = hf_labels != -100
    np.testing.assert_allclose(float(metrics["mlm_accuracy"]),
                               float((hf_pred[at] == hf_labels[at]).mean()), atol=1e-6)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_data, eight_devices):
    config, tok, corpus, blocks = tiny_data
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "model"))  # one device: compiles fastest
    task = Mlm(config, mesh, corpus, blocks, tok)
    batcher = mlm_data.make_batcher("corpus", corpus, tok, blocks=blocks, max_len=task.max_len,
                                    max_masks=task.max_masks)
    batch = mlm_data.fixed_batch(batcher, np.arange(16), seed=0)
    inputs = {k: batch[k] for k in mlm_data.DEVICE_KEYS}
    params, _ = initialize.init_towers(task.cfg, task.towers, mesh, task.rules, seed=0)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, rng):
        (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, inputs, rng)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    with sharding.activate(mesh, task.rules):
        losses = []
        for i in range(6):
            params, state, loss = step(params, state, jax.random.key(i))
            losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1.0, losses


# --------------------------------------------------------------------------- the data


def test_block_batcher_masks_bodies_like_bert(tiny_data):
    config, tok, corpus, blocks = tiny_data
    max_len, max_masks = 48, 16  # enough masks that BERT's 15 % is never capped
    batcher = mlm_data.make_batcher("corpus", corpus, tok, blocks=blocks, max_len=max_len,
                                    max_masks=max_masks, masking="random_token")
    indices = np.arange(3000) % len(corpus)  # each row masks with its own generator
    batch = mlm_data.fixed_batch(batcher, indices, seed=1)
    original = blocks.encode(indices, max_len)
    ids, pos, lab, w = (batch[k] for k in ("input_ids", "mlm_positions", "mlm_labels",
                                           "mlm_weights"))
    n_masks = w.sum(1)
    assert (n_masks >= 1).all() and (n_masks <= max_masks).all()
    # 15 % of the body (the title and the special tokens are never candidates).
    body = ((original.token_type_ids == 1) & (original.input_ids != tok.sep_id)).sum(1)
    np.testing.assert_array_equal(n_masks, np.maximum(1, np.round(0.15 * body)))
    rows = np.repeat(np.arange(len(indices)), max_masks).reshape(-1, max_masks)
    real = w > 0
    r, p = rows[real], pos[real]
    np.testing.assert_array_equal(lab[real], original.input_ids[r, p])  # labels: original ids
    assert (original.token_type_ids[r, p] == 1).all()  # in the body …
    assert not np.isin(original.input_ids[r, p], tok.special_ids).any()  # … never a special
    untouched = np.ones_like(ids, bool)
    untouched[r, p] = False
    np.testing.assert_array_equal(ids[untouched], original.input_ids[untouched])
    np.testing.assert_array_equal(batch["input_mask"], original.attention_mask)
    # 80 % [MASK] / 10 % a random wordpiece / 10 % kept (≈ 12k masked positions).
    shown = ids[r, p]
    as_mask = np.mean(shown == tok.mask_id)
    kept = np.mean(shown == lab[real])
    assert len(shown) > 5000
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03, (as_mask, kept)
    assert abs((1 - as_mask - kept) - 0.1) < 0.03
    # Deterministic for a seed, different for another.
    again = mlm_data.fixed_batch(batcher, indices[:64], seed=1)
    np.testing.assert_array_equal(again["input_ids"], ids[:64])
    other = mlm_data.fixed_batch(batcher, indices[:64], seed=2)
    assert not np.array_equal(other["mlm_positions"], pos[:64])


def test_salient_and_sentence_sources(tiny_data):
    config, tok, corpus, blocks = tiny_data
    salient = mlm_data.make_batcher("corpus", corpus, tok, blocks=blocks, max_len=48,
                                    max_masks=4, masking="salient")
    batch = mlm_data.fixed_batch(salient, np.arange(len(corpus)), seed=0)
    w = batch["mlm_weights"] > 0
    assert ((batch["mlm_weights"].sum(1) >= 1) & (batch["mlm_weights"].sum(1) <= 4)).all()
    for i in np.flatnonzero(~batch["fallback"]):  # one whole span, every wordpiece [MASK]ed
        p = batch["mlm_positions"][i][w[i]]
        assert (np.diff(p) == 1).all() and (batch["input_ids"][i, p] == tok.mask_id).all()
    assert (~batch["fallback"]).mean() > 0.5

    sentences = loaders.load_pretrain_sentences(config, corpus)
    batcher = mlm_data.make_batcher("sentences", sentences, tok, max_len=32, max_masks=4)
    batch = mlm_data.fixed_batch(batcher, np.arange(8), seed=0)
    assert set(mlm_data.DEVICE_KEYS) <= set(batch) and batch["input_ids"].shape == (8, 32)
    enc = tok.encode_queries([sentences[i]["text"] for i in range(8)], 32)
    w = batch["mlm_weights"] > 0
    rows = np.repeat(np.arange(8), 4).reshape(8, 4)
    np.testing.assert_array_equal(batch["mlm_labels"][w],
                                  enc.input_ids[rows[w], batch["mlm_positions"][w]])


@pytest.mark.parametrize("source", ["reading", "facts"])
def test_reading_source_joins_each_sentence_with_its_block(tiny_data, source):
    """`[CLS] masked sentence [SEP] body [SEP]`: the masked span is in the body that follows
    (the encoder can learn to read it), in REALM's join layout (segment 1 on the body). The
    block is the sentence's own ("reading") or the one holding the fact it restates
    ("facts": the generated KB's pre-training sentences, which are not in the corpus)."""
    from realm_jax.data.examples import Sentences, corpus_sentences

    config, tok, corpus, blocks = tiny_data
    if source == "reading":
        sentences, key = Sentences.from_records(corpus_sentences(corpus)), "block"
    else:
        sentences, key = loaders.load_pretrain_sentences(config, corpus), "gold_block"
        assert all(sentences[i]["block"] == -1 for i in range(len(sentences)))
    query_len, max_len = 24, 72
    masks = 4 if source == "reading" else 12  # a fact's value (a made-up name) runs long
    batcher = mlm_data.make_batcher(source, sentences, tok, blocks=blocks, max_len=max_len,
                                    max_masks=masks, masking="salient", query_len=query_len)
    idx = np.arange(min(40, len(sentences)))
    batch = batcher(idx, np.random.default_rng(0))
    assert batch["input_ids"].shape == (len(idx), max_len)
    checked = 0
    for i, row in enumerate(batch["input_ids"]):
        seps = np.flatnonzero(row == tok.sep_id)
        assert row[0] == tok.cls_id and len(seps) == 2
        body = row[seps[0] + 1: seps[1]]
        block = int(sentences[int(idx[i])][key])
        expect = blocks.encode(np.array([block]), max_len).input_ids[0]
        expect_seps = np.flatnonzero(expect == tok.sep_id)
        np.testing.assert_array_equal(body, expect[expect_seps[0] + 1: expect_seps[1]][
            :len(body)])  # the body of the sentence's own block (no title)
        types = batch["input_types"][i]
        assert (types[seps[0] + 1: seps[1] + 1] == 1).all() and (types[: seps[0] + 1] == 0).all()
        w = batch["mlm_weights"][i] > 0
        labels = batch["mlm_labels"][i][w]
        positions = batch["mlm_positions"][i][w]
        assert (row[positions] == tok.mask_id).all() and (positions < seps[0]).all()
        if batch["truncated"][i] or batch["fallback"][i] or not len(labels):
            continue
        hits = [j for j in range(len(body) - len(labels) + 1)
                if np.array_equal(body[j: j + len(labels)], labels)]
        assert hits, (i, labels, body)  # the answer is there to be read
        checked += 1
    assert checked >= len(idx) // 2
    if source == "facts":  # a sentence that does not know its block cannot be read
        unknown = Sentences.from_records([{**sentences[0], "gold_block": -1}])
        with pytest.raises(ValueError, match="1 sentences of the batch have no gold_blocks"):
            mlm_data.make_batcher(source, unknown, tok, blocks=blocks, max_len=max_len,
                                  max_masks=masks, masking="salient", query_len=query_len
                                  )(np.array([0]), np.random.default_rng(0))


def test_dataset_resumes_from_its_state(tiny_data):
    config, tok, corpus, blocks = tiny_data
    make = lambda: iter(mlm_data.mlm_dataset(  # noqa: E731
        "corpus", corpus, tok, blocks=blocks, batch_size=8, seed=5, max_len=48, max_masks=4))
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = next(it)
    resumed = make()
    resumed.set_state(state)
    got = next(resumed)
    for k in mlm_data.DEVICE_KEYS:
        np.testing.assert_array_equal(got[k], want[k])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, eight_devices):
    """2 steps, then resumed to 3 in the same workdir; and 3 steps without a break."""
    base = tmp_path_factory.mktemp("mlm")
    first = train(mlm_tiny(**{"train.steps": 2}), base / "resumed", progress=False)
    resumed = train(mlm_tiny(), base / "resumed", progress=False)
    straight = train(mlm_tiny(), base / "straight", progress=False)
    return base, first, resumed, straight


@pytest.mark.slow
def test_train_evaluate_and_resume(mlm_run):
    base, first, resumed, straight = mlm_run
    assert first.step == 2 and first.origin == "scratch"
    assert resumed.step == 3 and resumed.origin == "workdir"
    assert all(np.isfinite(h["loss"]) for h in straight.history)
    assert {"loss", "mlm_accuracy", "grad_norm"} <= set(straight.history[0])
    assert "staleness_steps" not in straight.history[0]  # nothing is searched
    assert {"eval_mlm_loss", "eval_mlm_accuracy"} <= set(straight.evals[-1])
    assert not (base / "straight" / "index").exists()
    # The resumed run continues the same data and parameters: its last step is the straight
    # run's, bitwise.
    assert resumed.history[-1]["loss"] == straight.history[-1]["loss"]
    assert leaves_equal(resumed.params, straight.params)
    assert resumed.evals[-1] == straight.evals[-1]


@pytest.mark.slow
def test_realm_starts_from_the_mlm_encoder(mlm_run, eight_devices):
    """A REALM config with init.path = the MLM workdir starts with its encoder, head included
    (transform, transform_norm, output_bias): equal to trained weights, which no random init
    is."""
    base, _, _, straight = mlm_run
    _, towers = checkpoints.load_pretrained(base / "straight")
    assert set(towers) == {"encoder"}
    trained = jax.device_get(straight.params["encoder"])
    assert float(np.abs(trained["output_bias"]).max()) > 0  # moved from its zero init

    path = os.path.join(ROOT, "configs/tiny.py")
    realm = defaults.load_config(path, {"init.path": str(base / "straight")})
    assert realm.task == "realm_mlm"
    params, _ = initialize.initial_params(realm, towers_of(realm), mesh8())
    assert leaves_equal(params["encoder"], trained)
    for head in ("transform", "transform_norm", "output_bias"):
        assert leaves_equal(params["encoder"][head], trained[head]), head
