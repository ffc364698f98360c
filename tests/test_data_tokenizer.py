"""Tokenizer layouts, the null block, pre-tokenised blocks and the vectorised joins."""

import numpy as np
import pytest

from realm_jax import checkpoints
from realm_jax.data import joins
from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.tokenizer import WordPiece, title_budget


@pytest.fixture(scope="module")
def tok():
    return WordPiece(checkpoints.minilm_path() / "vocab.txt")


def _tokens(tok, row):
    return [tok.id_to_token(int(i)) for i in row]


@pytest.mark.parametrize("missing", ["[CLS]", "[SEP]", "[MASK]"])
def test_vocab_without_specials_is_refused(tmp_path, missing):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat"]
    words.remove(missing)
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    with pytest.raises(ValueError, match=r"lacks special.*\[" + missing[1:-1]):
        WordPiece(tmp_path / "vocab.txt")


def test_query_and_block_layouts(tok):
    q = tok.encode_queries(["Who wrote it?"], 8)
    assert _tokens(tok, q.input_ids[0]) == ["[CLS]", "who", "wrote", "it", "?", "[SEP]",
                                            "[PAD]", "[PAD]"]
    assert q.attention_mask[0].tolist() == [1] * 6 + [0] * 2
    assert not q.token_type_ids.any() and not q.truncated.any()

    b = tok.encode_blocks(["Title"], ["the body"], 8)
    assert _tokens(tok, b.input_ids[0]) == ["[CLS]", "title", "[SEP]", "the", "body", "[SEP]",
                                            "[PAD]", "[PAD]"]
    assert b.token_type_ids[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]

    null = tok.encode_block_ids([[]], [[]], 6)  # the null document
    assert _tokens(tok, null.input_ids[0]) == ["[CLS]", "[SEP]", "[SEP]", "[PAD]", "[PAD]",
                                               "[PAD]"]
    assert null.token_type_ids[0].tolist() == [0, 0, 1, 0, 0, 0]
    assert null.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0]


def test_truncation_is_flagged_and_keeps_special_tokens(tok):
    q = tok.encode_queries(["a b c d e f g h", "a b"], 5)
    assert q.truncated.tolist() == [True, False]
    assert _tokens(tok, q.input_ids[0]) == ["[CLS]", "a", "b", "c", "[SEP]"]
    long_title = " ".join(["word"] * 100)
    b = tok.encode_blocks([long_title], ["x " * 100], 40)
    n_title = list(b.input_ids[0]).index(tok.sep_id) - 1
    assert n_title == title_budget(40) and b.truncated[0]
    assert b.input_ids[0, -1] == tok.sep_id and b.attention_mask[0].all()


def test_literal_special_strings_stay_text(tok):
    ids = tok.tokenize(["a [SEP] b [MASK]"])[0]
    assert tok.sep_id not in ids and tok.mask_id not in ids


@pytest.fixture(scope="module")
def tokenized(tok):
    corpus = BlockCorpus.from_blocks([
        {"title": "Alpha", "text": "alpha body one two three"},
        {"title": "", "text": "beta"},
        {"title": "Gamma Delta", "text": " ".join(["long"] * 50)},
    ])
    return corpus, joins.tokenize_corpus(corpus, tok)


def test_tokenized_blocks_encode_like_the_tokenizer(tok, tokenized, tmp_path):
    corpus, tb = tokenized
    want = tok.encode_blocks([corpus[i]["title"] for i in range(3)],
                             [corpus[i]["text"] for i in range(3)], 16)
    got = tb.encode(np.arange(3), 16)
    for field in ("input_ids", "attention_mask", "token_type_ids", "truncated"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), field)
    null = tb.encode(np.array([-1]), 16)
    np.testing.assert_array_equal(null.input_ids, tok.encode_block_ids([[]], [[]], 16).input_ids)
    # Saved and memory-mapped back: identical, and tied to the corpus fingerprint.
    tb.save(tmp_path / "tok")
    again = joins.TokenizedBlocks.load(tmp_path / "tok")
    np.testing.assert_array_equal(again.encode(np.arange(3), 16).input_ids, got.input_ids)
    assert again.fingerprint == corpus.fingerprint


def test_tokenize_corpus_cache(tok, tokenized, tmp_path):
    corpus, tb = tokenized
    first = joins.tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    second = joins.tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    np.testing.assert_array_equal(first.bodies.flat, second.bodies.flat)


def test_mlm_join_keeps_the_query_prefix_identical(tok, tokenized):
    _, tb = tokenized
    q = tok.encode_queries(["who is alpha?", "a much longer query about beta"], 12)
    block_ids = np.array([[-1, 0, 2], [1, 2, 0]])
    j = joins.join_mlm(q.input_ids, q.lengths, tb, block_ids, 24)
    assert j.input_ids.shape == (2, 3, 24)
    for b in range(2):
        n = q.lengths[b]
        for k in range(3):  # the query part is identical for every candidate
            np.testing.assert_array_equal(j.input_ids[b, k, :n], q.input_ids[b, :n])
            assert not j.token_type_ids[b, k, :n].any()
    assert _tokens(tok, j.input_ids[0, 0, :7]) == ["[CLS]", "who", "is", "alpha", "?", "[SEP]",
                                                   "[SEP]"]  # the null document
    assert j.attention_mask[0, 0].sum() == 7
    row = _tokens(tok, j.input_ids[0, 1])
    assert row[6:12] == ["alpha", "body", "one", "two", "three", "[SEP]"]
    assert j.token_type_ids[0, 1, 6:12].all() and not j.token_type_ids[0, 1, 12:].any()
    assert j.truncated[0, 2] and j.input_ids[0, 2, -1] == tok.sep_id  # cut, still closed
    # Body strings tokenised afresh give the same joins as the corpus's pre-tokenised blocks.
    bodies = ["", "alpha body one two three", " ".join(["long"] * 50),
              "beta", " ".join(["long"] * 50), "alpha body one two three"]
    fresh = joins.TokenizedBlocks.from_lists([[] for _ in bodies], tok.tokenize(bodies), tok)
    np.testing.assert_array_equal(
        joins.join_mlm(q.input_ids, q.lengths, fresh, np.arange(6).reshape(2, 3), 24).input_ids,
        j.input_ids)


def test_reader_join_and_answer_spans(tok, tokenized):
    _, tb = tokenized
    q = tok.encode_queries(["what follows alpha?"], 10)
    r = joins.join_reader(q.input_ids, q.lengths, tb, np.array([[0, 1]]), 20)
    n = q.lengths[0]
    assert r.block_mask[0, 0, :n].sum() == 0 and r.block_mask[0, 0, n: n + 5].all()
    assert r.block_mask[0, 0, n + 5] == 0  # the closing [SEP] is no answer position
    answers = [tok.tokenize(["body one", "beta", "nowhere"])]
    starts, ends, has = joins.answer_spans(r.input_ids, r.block_mask, answers)
    assert has.tolist() == [[True, True]]
    assert (starts[0, 0, 0], ends[0, 0, 0]) == (n + 1, n + 2)
    assert (starts[0, 1, 0], ends[0, 1, 0]) == (n, n)
    # The question itself contains "alpha": a span there must not count.
    s2, _, has2 = joins.answer_spans(r.input_ids, r.block_mask, [tok.tokenize(["what"])])
    assert not has2.any() and (s2 == -1).all()
