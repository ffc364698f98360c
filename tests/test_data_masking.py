"""Salient span masking, the tagger, and the random-masking ablations."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realm_jax import checkpoints
from realm_jax.data import masking
from realm_jax.data.tokenizer import WordPiece


@pytest.fixture(scope="module")
def tok():
    return WordPiece(checkpoints.minilm_path() / "vocab.txt")


@pytest.mark.parametrize("text,want", [
    ("The Beatles were formed in Liverpool in 1960.", ["Beatles", "Liverpool", "1960"]),
    ("Charles Darwin published On the Origin of Species on 24 November 1859.",
     ["Charles Darwin", "On the Origin of Species", "24 November 1859"]),
    ("In March 1999 the firm had 3,000 employees and $5.3 million.",
     ["March 1999", "3,000 employees", "$5.3 million"]),
    ("He taught at the University of Oxford for 12 years.",
     ["University of Oxford", "12 years"]),
    ("Paris is the capital.", []),  # one capitalised first word is just grammar
    ("It rose 8,848 m on May 29, 1953.", ["8,848 m", "May 29, 1953"]),
    ("the 1990s saw growth of 4.5% per year", ["1990s", "4.5%"]),
])
def test_regex_tagger(text, want):
    assert [text[a:b] for a, b in masking.RegexTagger()(text)] == want


def test_lexicon_tagger_whole_words_longest_first():
    t = masking.LexiconTagger(["Vel", "Vel Industries", "Oxford"])
    text = "Vel Industries hired Velma in Oxford, not Oxfordshire; Vel agreed."
    assert [text[a:b] for a, b in t(text)] == ["Vel Industries", "Oxford", "Vel"]


def _query(tok, text, length):
    ids, offsets = tok.tokenize_with_offsets([text])[0]
    q = ids[: length - 2]
    n = len(q) + 2
    row = np.full(length, tok.pad_id, np.int32)
    row[0], row[1: n - 1], row[n - 1] = tok.cls_id, q, tok.sep_id
    return row, n, offsets


def _specials_untouched(tok, row, masked, n):
    assert masked.input_ids[0] == tok.cls_id and masked.input_ids[n - 1] == tok.sep_id
    assert (masked.input_ids[n:] == tok.pad_id).all()
    real = masked.positions[masked.weights > 0]
    assert ((real >= 1) & (real <= n - 2)).all()
    np.testing.assert_array_equal(masked.labels[masked.weights > 0], row[real])
    assert (masked.labels[masked.weights == 0] == 0).all()


def test_salient_mask_covers_one_whole_span(tok):
    text = "Saegobra Thiawaeth married Biaza Skiakrouwo in 1882."
    row, n, offsets = _query(tok, text, 32)
    spans = [(0, 18), (27, 43), (47, 51)]
    seen = set()
    for seed in range(30):
        m = masking.salient_span_mask(row, n, offsets, spans, tok.mask_id,
                                      np.random.default_rng(seed), max_masks=10)
        _specials_untouched(tok, row, m, n)
        pos = m.positions[m.weights > 0]
        # every wordpiece overlapping the span, and nothing else
        want = masking.span_token_positions(offsets, m.span)
        np.testing.assert_array_equal(pos, want)
        assert (m.input_ids[pos] == tok.mask_id).all()
        others = np.setdiff1d(np.arange(len(row)), pos)
        np.testing.assert_array_equal(m.input_ids[others], row[others])
        assert tok.decode(row[pos]).replace(" ", "") == text[m.span[0]: m.span[1]].lower(
        ).replace(" ", "")
        seen.add(m.span)
    assert seen == set(spans)  # each span gets chosen


def test_salient_mask_skips_spans_that_do_not_fit(tok):
    text = "Bo met Zeflouprath Skyzhaerkovitch at the end of a very long story in 1882."
    row, n, offsets = _query(tok, text, 16)  # truncated: "1882" lies beyond the query
    long_name = (7, 34)  # > 3 wordpieces
    assert len(masking.span_token_positions(offsets, long_name)) > 3
    assert masking.span_token_positions(offsets, (7, 34))[-1] < n - 1
    year = (text.index("1882"), text.index("1882") + 4)
    rng = np.random.default_rng(0)
    assert masking.salient_span_mask(row, n, offsets, [long_name, year], tok.mask_id, rng,
                                     max_masks=3) is None
    # A span cut by truncation (its last wordpiece would sit where [SEP] is) is refused too.
    row2, n2, off2 = _query(tok, "alpha beta gamma delta epsilon", 5)  # keeps alpha beta gamma
    cut = (11, 22)  # "gamma delta"
    assert masking.salient_span_mask(row2, n2, off2, [cut], tok.mask_id, rng) is None
    bo = (text.index("Bo"), text.index("Bo") + 2)
    m = masking.salient_span_mask(row, n, offsets, [long_name, year, bo], tok.mask_id, rng,
                                  max_masks=3)
    assert m.span == bo and m.weights.sum() == 1


def test_random_token_mask_80_10_10(tok):
    text = " ".join(["alpha beta gamma delta epsilon"] * 4)
    row, n, _ = _query(tok, text, 32)
    rng = np.random.default_rng(0)
    kinds = {"mask": 0, "random": 0, "kept": 0}
    for _ in range(1000):
        m = masking.random_token_mask(row, n, tok.mask_id, tok.vocab_size, tok.special_ids, rng,
                                      max_masks=10)
        _specials_untouched(tok, row, m, n)
        pos = m.positions[m.weights > 0]
        assert len(pos) == min(10, round(0.15 * (n - 2))) and len(set(pos)) == len(pos)
        for p in pos:
            got = m.input_ids[p]
            kinds["mask" if got == tok.mask_id else "kept" if got == row[p] else "random"] += 1
            assert got == tok.mask_id or got not in tok.special_ids
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.025
    assert abs(kinds["random"] / total - 0.1) < 0.02  # (a random draw may equal the original)
    assert abs(kinds["kept"] / total - 0.1) < 0.025


@settings(max_examples=40, deadline=None)
@given(text=st.lists(st.sampled_from(["a", "b", "Über", "xyzzy", "supercalifragilistic",
                                        "1,000", "cats.", "D", "the"]),
                     min_size=1, max_size=20).map(" ".join),
       length=st.integers(3, 24), seed=st.integers(0, 2**31))
def test_random_span_mask_whole_words_property(tok, text, length, seed):
    row, n, _ = _query(tok, text, length)
    cont = np.array([t.startswith("##") for t in tok._inverse])
    m = masking.random_span_mask(row, n, cont, tok.mask_id, np.random.default_rng(seed),
                                 max_masks=4)
    _specials_untouched(tok, row, m, n)
    pos = m.positions[m.weights > 0]
    assert len(pos) <= 4
    if len(pos):
        assert (np.diff(pos) == 1).all()  # one contiguous run
        after = pos[-1] + 1
        if after < n - 1 and cont[row[after]] and len(pos) < 4:
            pytest.fail("a word was cut in half")
        assert (m.input_ids[pos] == tok.mask_id).all()
