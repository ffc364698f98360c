"""Parity of `Realm` with Hugging Face's `RealmForOpenQA` + `RealmRetriever` (transformers
4.46.3), and loading HF open-QA directories.

A randomly initialised small open-QA model over 240 generated blocks (real BERT uncased
vocabulary, so texts tokenise as words) is saved the way the released models are (weights with
`block_emb`, tokenizer, pickled `block_records.npy`), converted once with
`realm_jax.convert --allow_pickle`, and loaded with `Realm.load`. For 24 questions the retrieved
block ids, the reader's inputs and span logits (to 1e-4) and the predicted answer strings must
equal Hugging Face's.
"""

import numpy as np
import pytest
import torch

from realm_jax import checkpoints
from realm_jax.convert import convert
from realm_jax.inference import Realm
from realm_jax.testing import hf_reference as ref

TOL = 1e-4
NUM_BLOCKS = 240
NUM_QUESTIONS = 24
EXTRAS = ["café", "naïve", "well-known", "(1859)", "U.S.", "3.5", "e-mail", "Zürich", "don't"]


def _words(vocab_file, rng, n=1500) -> list[str]:
    tokens = [t for t in vocab_file.read_text().split("\n")
              if t.isalpha() and t.isascii() and len(t) >= 3]
    return list(rng.choice(tokens, size=n, replace=False))


def _sentence(rng, words, lo, hi, end=".") -> str:
    out = []
    for _ in range(int(rng.integers(lo, hi))):
        w = str(rng.choice(words)) if rng.random() > 0.08 else str(rng.choice(EXTRAS))
        out.append(w.capitalize() if rng.random() < 0.15 else w)
        if rng.random() < 0.08:
            out[-1] += ","
    return " ".join(out).capitalize() + end


@pytest.fixture(scope="module")
def openqa(tmp_path_factory):
    """(HF model, HF tokenizer, questions, converted directory)."""
    rng = np.random.default_rng(0)
    vocab = checkpoints.minilm_path() / "vocab.txt"
    words = _words(vocab, rng)
    # Block lengths vary around the reader's budget, so some bodies are cut to fit.
    blocks = [" ".join(_sentence(rng, words, 3, 14) for _ in range(int(rng.integers(1, 5))))
              for _ in range(NUM_BLOCKS)]
    questions = [_sentence(rng, words, 3, 9, end="?") for _ in range(NUM_QUESTIONS)]
    config = ref.realm_config(vocab_size=30522, max_position_embeddings=128, reader_seq_len=64,
                              num_block_records=NUM_BLOCKS, reader_beam_size=3,
                              searcher_beam_size=6, max_span_width=4)
    model = ref.build("RealmForOpenQA", config, seed=7, noise=0.2)
    hf_dir = tmp_path_factory.mktemp("hf_openqa")
    block_emb = rng.normal(size=(NUM_BLOCKS, config.retriever_proj_size)).astype(np.float32)
    _, tokenizer = ref.save_openqa(model, blocks, vocab, hf_dir, block_emb)
    out = tmp_path_factory.mktemp("converted")
    convert("hf_realm", hf_dir, out, allow_pickle=True)
    return model, tokenizer, questions, hf_dir, out


class _Recording:
    """Wraps HF's retriever to keep the block ids and reader inputs it was given."""

    def __init__(self, inner):
        self.inner, self.ids, self.inputs = inner, [], []

    def __call__(self, ids, *args, **kwargs):
        out = self.inner(ids, *args, **kwargs)
        self.ids.append(np.asarray(ids))
        self.inputs.append(out[3])
        return out


@pytest.fixture(scope="module")
def hf_outputs(openqa):
    """Per question: HF's retrieved ids, reader inputs, span logits [R, C] and answer string."""
    model, tokenizer, questions, _, _ = openqa
    retriever = model.retriever
    model.retriever = recording = _Recording(retriever)
    span_logits = []
    # qa_outputs returns the span logits; the caller then adds the retrieval logits in place.
    hook = model.reader.qa_outputs.register_forward_hook(
        lambda m, i, o: span_logits.append(o[0].detach().clone()))
    answers = []
    try:
        for q in questions:
            with torch.no_grad():
                out = model(**tokenizer([q], return_tensors="pt"), return_dict=True)
            answers.append(tokenizer.decode(out.predicted_answer_ids))
    finally:
        hook.remove()
        model.retriever = retriever
    return recording.ids, recording.inputs, [ref.to_numpy(x) for x in span_logits], answers


@pytest.fixture(scope="module")
def realm(openqa):
    return Realm.load(openqa[4])


def test_converted_directory_is_complete(openqa, realm):
    _, _, _, hf_dir, out = openqa
    assert len(realm.corpus) == NUM_BLOCKS == realm.searcher.num_blocks
    assert realm.searcher.engine == "exact" and realm.reader_beam == 3
    assert realm.query_tower == "embedder" and realm.has_reader
    records = np.load(hf_dir / "block_records.npy", allow_pickle=True)
    assert [realm.corpus[i]["text"] for i in (0, 17, NUM_BLOCKS - 1)] == [
        records[i].decode() for i in (0, 17, NUM_BLOCKS - 1)]
    assert (out / "tokenized").is_dir()  # the corpus was cut into wordpieces once, at convert


def test_retrieval_reader_logits_and_answers_match_hf(openqa, hf_outputs, realm):
    _, tokenizer, questions, _, _ = openqa
    hf_ids, hf_inputs, hf_logits, hf_answers = hf_outputs
    ours = realm.read(questions)
    answers = realm.answer(questions)
    width = realm.cfg.max_span_width
    cut = 0
    for i, q in enumerate(questions):
        assert ours.block_ids[i].tolist() == hf_ids[i].tolist(), q
        # The reader's inputs: HF pads to its longest join, we to data.reader_len.
        hf_in = hf_inputs[i]
        length = hf_in.input_ids.shape[1]
        np.testing.assert_array_equal(ours.inputs.input_ids[i, :, :length],
                                      ref.to_numpy(hf_in.input_ids))
        np.testing.assert_array_equal(ours.inputs.token_type_ids[i, :, :length],
                                      ref.to_numpy(hf_in.token_type_ids))
        assert not ours.inputs.attention_mask[i, :, length:].any()
        cut += int(ours.inputs.truncated[i].sum())
        # Span logits wherever a span lies inside the block on both sides.
        starts, ends = ours.starts, ours.ends
        hf_starts = np.concatenate([np.arange(length - w) for w in range(width)])
        hf_ends = np.concatenate([np.arange(w, length) for w in range(width)])
        hf_pos = {(s, e): c for c, (s, e) in enumerate(zip(hf_starts, hf_ends, strict=True))}
        pairs = [(c, hf_pos[(s, e)]) for c, (s, e) in enumerate(zip(starts, ends, strict=True))
                 if (s, e) in hf_pos]
        ours_c, hf_c = (np.array(x) for x in zip(*pairs, strict=True))
        got, want = ours.span_logits[i][:, ours_c], hf_logits[i][:, hf_c]
        allowed = want > -1e30
        assert np.array_equal(got > -1e30, allowed), q
        assert allowed.any()
        np.testing.assert_allclose(got[allowed], want[allowed], atol=TOL, rtol=0, err_msg=q)
        # Spans reaching past HF's padded length are outside every block: masked.
        assert (np.delete(ours.span_logits[i], ours_c, axis=1) < -1e30).all()
        # The answer: the same wordpieces, and our text is the slice of the block they cover.
        a = answers[i]
        assert a.decoded == hf_answers[i], q
        assert a.text == a.block_text[a.start_char:a.end_char]
        ids, offsets = realm.tokenizer.tokenize_with_offsets([a.block_text])[0]
        first = [o[0] for o in offsets].index(a.start_char)
        last = [o[1] for o in offsets].index(a.end_char)
        assert tokenizer.decode(ids[first: last + 1]) == hf_answers[i]
    assert cut > 0  # some blocks were cut to fit the reader: truncation agrees too


def test_hf_directory_without_conversion_is_refused_with_the_command(openqa, tmp_path):
    _, _, _, hf_dir, _ = openqa
    with pytest.raises(ValueError, match="python -m realm_jax.convert .*--allow_pickle"):
        Realm.load(hf_dir)
    convert("hf_realm", hf_dir, tmp_path / "weights_only")  # block records not allowed
    assert (tmp_path / "weights_only" / checkpoints.OUR_MARKER).exists()
    with pytest.raises(FileNotFoundError, match="no corpus and index.*--allow_pickle"):
        Realm.load(tmp_path / "weights_only")
