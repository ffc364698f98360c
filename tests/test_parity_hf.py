"""Parity with the reference: Hugging Face transformers 4.46.3 REALM (torch), same weights.

Each HF model is randomly initialised (all tensors perturbed), saved with `save_pretrained`,
loaded back through `realm_jax.checkpoints.load_pretrained`, and compared on the same ids.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from realm_jax import checkpoints
from realm_jax.models import Embedder, KnowledgeAugEncoder, SpanReader, relevance_scores
from realm_jax.models.losses import marginal_mlm_loss, orqa_loss
from realm_jax.models.reader import correct_spans, orqa_logits, span_candidates
from realm_jax.testing import hf_reference as ref

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_config():
    return ref.realm_config()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf_config):
    """{class name: (torch model, directory)} for every HF REALM class we import."""
    out = {}
    for i, name in enumerate(
        ["RealmEmbedder", "RealmKnowledgeAugEncoder", "RealmReader", "RealmScorer",
         "RealmForOpenQA"]
    ):
        model = ref.build(name, hf_config, seed=i)
        d = tmp_path_factory.mktemp(name)
        ref.save(model, d)
        out[name] = (model, d)
    return out


def test_embedder_matches(saved, hf_config):
    model, d = saved["RealmEmbedder"]
    cfg, params = checkpoints.load_pretrained(d)
    assert set(params) == {"embedder"}
    ids, mask, types = ref.random_inputs(np.random.default_rng(0), 5, 20, hf_config.vocab_size)
    with torch.no_grad():
        want = model(ref.torch_tensor(ids), attention_mask=ref.torch_tensor(mask),
                     token_type_ids=ref.torch_tensor(types)).projected_score
    got = Embedder(cfg).apply({"params": params["embedder"]}, ids, mask, types)
    assert got.shape == (5, hf_config.retriever_proj_size)
    np.testing.assert_allclose(np.asarray(got), ref.to_numpy(want), atol=TOL, rtol=0)


def test_scorer_relevance_matches(saved, hf_config):
    model, d = saved["RealmScorer"]
    cfg, params = checkpoints.load_pretrained(d)
    rng = np.random.default_rng(1)
    k = hf_config.num_candidates
    q_ids, q_mask, q_types = ref.random_inputs(rng, 2, 12, hf_config.vocab_size)
    c_ids, c_mask, c_types = (x.reshape(2, k, 20) for x in
                              ref.random_inputs(rng, 2 * k, 20, hf_config.vocab_size))
    with torch.no_grad():
        want = model(
            ref.torch_tensor(q_ids), attention_mask=ref.torch_tensor(q_mask),
            token_type_ids=ref.torch_tensor(q_types),
            candidate_input_ids=ref.torch_tensor(c_ids),
            candidate_attention_mask=ref.torch_tensor(c_mask),
            candidate_token_type_ids=ref.torch_tensor(c_types),
        ).relevance_score
    embed = Embedder(cfg)
    p = {"params": params["embedder"]}
    q_params = {"params": params.get("query_embedder", params["embedder"])}
    got = relevance_scores(embed.apply(q_params, q_ids, q_mask, q_types),
                           embed.apply(p, c_ids, c_mask, c_types))
    np.testing.assert_allclose(np.asarray(got), ref.to_numpy(want), atol=TOL, rtol=0)


def test_knowledge_aug_encoder_logits_and_loss_match(saved, hf_config):
    model, d = saved["RealmKnowledgeAugEncoder"]
    cfg, params = checkpoints.load_pretrained(d)
    assert set(params) == {"encoder"}
    rng = np.random.default_rng(2)
    b, k, length, v = 2, hf_config.num_candidates, 24, hf_config.vocab_size
    ids, mask, types = ref.random_inputs(rng, b * k, length, v)
    relevance = rng.normal(size=(b, k)).astype(np.float32)
    labels = np.full((b, length), -100, np.int64)
    for i in range(b):  # a few masked positions per query, inside the shortest sequence
        pos = rng.choice(np.arange(1, length // 2), size=3, replace=False)
        labels[i, pos] = rng.integers(3, v, size=3)
    mlm_mask = (labels != -100).astype(np.int64)
    with torch.no_grad():
        out = model(
            ref.torch_tensor(ids), attention_mask=ref.torch_tensor(mask),
            token_type_ids=ref.torch_tensor(types),
            relevance_score=ref.torch_tensor(relevance), labels=ref.torch_tensor(labels),
            mlm_mask=ref.torch_tensor(mlm_mask),
        )
    enc = KnowledgeAugEncoder(cfg)
    shaped = lambda x: x.reshape(b, k, length)  # noqa: E731
    logits = enc.apply({"params": params["encoder"]}, shaped(ids), shaped(mask), shaped(types))
    np.testing.assert_allclose(
        np.asarray(logits).reshape(b * k, length, v), ref.to_numpy(out.logits), atol=TOL, rtol=0
    )
    loss, _ = marginal_mlm_loss(logits, np.maximum(labels, 0), mlm_mask, relevance)
    np.testing.assert_allclose(float(loss), float(out.loss), atol=TOL, rtol=0)

    # Gathering only the masked positions gives the same loss (the path training uses).
    positions = np.stack([np.flatnonzero(m) for m in mlm_mask])  # [B, 3]
    gathered = enc.apply({"params": params["encoder"]}, shaped(ids), shaped(mask),
                         shaped(types), mlm_positions=positions)
    pos_labels = np.take_along_axis(labels, positions, 1)
    loss_g, _ = marginal_mlm_loss(gathered, pos_labels, np.ones_like(pos_labels), relevance)
    np.testing.assert_allclose(float(loss_g), float(out.loss), atol=TOL, rtol=0)


def _reader_case(rng, hf_config, length=24):
    s, r = hf_config.searcher_beam_size, hf_config.reader_beam_size
    ids, mask, types = ref.random_inputs(rng, r, length, hf_config.vocab_size)
    block_mask = (types == 1) & (mask == 1)
    relevance = rng.normal(size=(s,)).astype(np.float32)
    has_answers = np.array([True, False, True, False, False, True][:s])
    starts = np.full((r, 2), -1, np.int64)
    ends = np.full((r, 2), -1, np.int64)
    for i in range(r):  # one gold span inside each block (width ≤ max_span_width)
        inside = np.flatnonzero(block_mask[i])
        st = int(rng.choice(inside[:-2]))
        starts[i, 0], ends[i, 0] = st, st + 1
    return ids, mask, types, block_mask, relevance, has_answers, starts, ends


def test_reader_logits_and_loss_match(saved, hf_config):
    model, d = saved["RealmReader"]
    cfg, params = checkpoints.load_pretrained(d)
    assert set(params) == {"reader"}
    ids, mask, types, block_mask, relevance, has_answers, starts, ends = _reader_case(
        np.random.default_rng(3), hf_config
    )
    t = ref.torch_tensor
    with torch.no_grad():
        out = model(
            t(ids), attention_mask=t(mask), token_type_ids=t(types), relevance_score=t(relevance),
            block_mask=t(block_mask), start_positions=t(starts), end_positions=t(ends),
            has_answers=t(has_answers),
        )
        seq = model.realm(t(ids), attention_mask=t(mask), token_type_ids=t(types))[0]
        want_logits, _, _ = model.qa_outputs(seq, t(block_mask))
        want_logits = want_logits + t(relevance[: hf_config.reader_beam_size])[:, None]

    span = SpanReader(cfg).apply({"params": params["reader"]}, ids, mask, types, block_mask)
    joint = orqa_logits(span, relevance[: hf_config.reader_beam_size])  # [R, C]
    # Compare where spans are allowed; masked spans carry the most negative float on both sides.
    allowed = ref.to_numpy(want_logits) > -1e30
    np.testing.assert_allclose(np.asarray(joint)[allowed], ref.to_numpy(want_logits)[allowed],
                               atol=TOL, rtol=0)
    assert np.array_equal(np.asarray(joint) > -1e30, allowed)

    cs, ce = span_candidates(ids.shape[1], cfg.max_span_width)
    span_ok = correct_spans(cs, ce, jnp.asarray(starts), jnp.asarray(ends))
    loss, aux = orqa_loss(relevance[None], has_answers[None], joint[None], span_ok[None])
    np.testing.assert_allclose(float(aux["retriever_loss"][0]), float(out.retriever_loss),
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(float(aux["reader_loss"][0]), float(out.reader_loss),
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(float(loss), float(out.loss), atol=TOL, rtol=0)
    # Same prediction: best block, then best span.
    assert int(jnp.argmax(jnp.max(joint, axis=1))) == int(out.block_idx)
    assert int(jnp.argmax(jnp.max(joint, axis=0))) == int(out.candidate)


def test_openqa_checkpoint_loads_embedder_and_reader(saved, hf_config):
    model, d = saved["RealmForOpenQA"]
    cfg, params = checkpoints.load_pretrained(d)
    assert set(params) == {"embedder", "reader"}
    ids, mask, types = ref.random_inputs(np.random.default_rng(4), 3, 16, hf_config.vocab_size)
    t = ref.torch_tensor
    with torch.no_grad():
        want = model.embedder(t(ids), attention_mask=t(mask), token_type_ids=t(types))[0]
    got = Embedder(cfg).apply({"params": params["embedder"]}, ids, mask, types)
    np.testing.assert_allclose(np.asarray(got), ref.to_numpy(want), atol=TOL, rtol=0)


def test_gradients_match_torch(saved, hf_config):
    """d loss / d params of the knowledge-augmented encoder agree with torch's autograd."""
    model, d = saved["RealmKnowledgeAugEncoder"]
    cfg, params = checkpoints.load_pretrained(d)
    rng = np.random.default_rng(5)
    b, k, length, v = 1, hf_config.num_candidates, 16, hf_config.vocab_size
    ids, mask, types = ref.random_inputs(rng, b * k, length, v)
    relevance = rng.normal(size=(b, k)).astype(np.float32)
    labels = np.full((b, length), -100, np.int64)
    labels[0, [2, 5]] = [7, 11]
    mlm_mask = (labels != -100).astype(np.int64)
    t = ref.torch_tensor
    model.zero_grad()
    out = model(t(ids), attention_mask=t(mask), token_type_ids=t(types),
                relevance_score=t(relevance), labels=t(labels), mlm_mask=t(mlm_mask))
    out.loss.backward()
    want = ref.to_numpy(model.realm.encoder.layer[0].intermediate.dense.weight.grad).T

    def loss_fn(p):
        logits = KnowledgeAugEncoder(cfg).apply(
            {"params": p}, *(x.reshape(b, k, length) for x in (ids, mask, types)))
        return marginal_mlm_loss(logits, np.maximum(labels, 0), mlm_mask, relevance)[0]

    grads = jax.grad(loss_fn)(params["encoder"])
    got = np.asarray(grads["bert"]["layer_0"]["intermediate"]["kernel"])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert np.abs(want).max() > 1e-4  # the comparison is not between two zero tensors
