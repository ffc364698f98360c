"""Blocks: size limit, exact coverage, stable uids, the TFDS builder and bad input."""

import hashlib
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realm_jax import checkpoints
from realm_jax.data import blocks, examples, sources
from realm_jax.data.blocks import BlockCorpus, Chunker, block_uid, split_sentences
from realm_jax.data.tokenizer import WordPiece, clean_text
from realm_jax.errors import UserError

DOCS = [
    ("Charles Darwin", "Charles Darwin was an English naturalist. He was born on 12 February "
     "1809 in Shrewsbury. Dr. Darwin's book, On the Origin of Species, appeared in 1859!\n\n"
     "He died in 1882. " + " ".join(f"w{i}" for i in range(400)) + " ok."),
    ("Empty", "   \n "),
    ("Café", "Zürich – 東京 naïve text. Ünïcödé sentence two? Yes."),
    ("", "A document without a title. " * 30),
    ("Long word", "x" + "ab" * 40 + " " + "supercalifragilistic" * 3 + " end."),
]


@pytest.fixture(scope="module")
def tok():
    return WordPiece(checkpoints.minilm_path() / "vocab.txt")


def _check_blocks(tok, docs, out, limit):
    by_doc = {}
    for b in out:
        by_doc.setdefault(b.doc, []).append(b)
        enc = tok.encode_blocks([b.title], [b.text], limit)
        assert not enc.truncated[0], (b.title, b.text)  # fits as the retriever reads it
        assert enc.attention_mask[0].sum() <= limit
        assert b.text == clean_text(docs[b.doc][1])[b.start: b.end]
        assert b.uid == block_uid(b.title, b.text)
    for d, (_, raw) in enumerate(docs):
        text = clean_text(raw)  # lone surrogates → U+FFFD, same length
        got = by_doc.get(d, [])
        if not text.strip():
            assert not got
            continue
        # In order, non-overlapping, only whitespace between / around: covers text exactly once.
        cursor = 0
        for b in got:
            assert b.start >= cursor and not text[cursor: b.start].strip()
            cursor = b.end
        assert not text[cursor:].strip()
        assert re.sub(r"\s", "", "".join(b.text for b in got)) == re.sub(r"\s", "", text)


@pytest.mark.parametrize("limit", [32, 64, 288])
def test_blocks_fit_and_cover_each_document_once(tok, limit):
    stats = sources.ReadStats()
    out = list(Chunker(tok, limit).chunk_documents(DOCS, stats))
    _check_blocks(tok, DOCS, out, limit)
    assert stats["empty_documents"] == 1 and stats["documents"] == len(DOCS)
    assert stats["blocks"] == len(out)
    if limit == 32:
        assert stats["split_sentences"] >= 2  # the 400-word sentence and the long words


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab. \n!?ÉZ1,")) | st.characters(),
                        max_size=300), min_size=1, max_size=3))
def test_block_coverage_property(tok, texts):
    docs = [(f"T{i}", t) for i, t in enumerate(texts)]
    _check_blocks(tok, docs, list(Chunker(tok, 24).chunk_documents(docs)), 24)


def test_sentence_splitting():
    text = "Dr. Smith met J. R. Tolkien in 1950. They talked! Was it good? yes.\nNew line"
    got = [text[a:b] for a, b in split_sentences(text)]
    assert got == ["Dr. Smith met J. R. Tolkien in 1950.", "They talked!", "Was it good? yes.",
                   "New line"]


def test_uids_are_stable():
    # Pinned value: a change here breaks every index built before it.
    assert block_uid("Title", "Body text.") == hashlib.sha1(
        b"Title\x1fBody text.").hexdigest() == "712255429e2ccd256af0edd03b513bd56b1197cc"
    c1 = BlockCorpus.from_blocks([{"title": "a", "text": "b"}, {"title": "", "text": "c"}])
    c2 = BlockCorpus.from_blocks([{"title": "a", "text": "b"}, {"title": "", "text": "c"}])
    c3 = BlockCorpus.from_blocks([{"title": "", "text": "c"}, {"title": "a", "text": "b"}])
    assert c1.fingerprint == c2.fingerprint != c3.fingerprint
    assert list(c1.uids) == [block_uid("a", "b"), block_uid("", "c")]
    assert c1.uids.hashes().dtype == np.int64 and len(set(c1.uids.hashes())) == 2


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tfds_builder_matches_in_memory_chunking(tok, tmp_path):
    docs = [d for d in DOCS]
    _write_jsonl(tmp_path / "docs.jsonl", [{"title": t, "text": x} for t, x in docs])
    vocab = checkpoints.minilm_path() / "vocab.txt"
    corpus, stats = blocks.build_corpus(tmp_path / "tfds", source="jsonl",
                                        path=str(tmp_path / "docs.jsonl"), vocab_file=vocab,
                                        max_block_wordpieces=64, name="t64")
    memory = BlockCorpus.from_blocks(list(Chunker(tok, 64).chunk_documents(docs)))
    assert len(corpus) == len(memory) and corpus.fingerprint == memory.fingerprint
    assert corpus[3] == memory[3] and {"title", "text", "uid", "doc"} <= set(corpus[3])
    assert stats["empty_documents"] == 1
    # Loaders by version dir, by data_dir, by tfds: name; uids survive the sidecar.
    path = tmp_path / "tfds" / "realm_blocks" / "t64" / "1.0.0"
    for spec, kw in ((path, {}), (tmp_path / "tfds", {}),
                     ("tfds:realm_blocks/t64", {"data_dir": str(tmp_path / "tfds")})):
        again = BlockCorpus.load(spec, **kw)
        assert again.fingerprint == corpus.fingerprint and list(again.uids) == list(memory.uids)
    (path / blocks.UIDS_FILE).unlink()  # prepared elsewhere: uids re-read from the records
    assert BlockCorpus.load(path).fingerprint == corpus.fingerprint
    # Pre-training sentences straight from the corpus, stored as array_record too.
    sents = examples.build_sentences(tmp_path / "tfds", source="corpus", path=str(path),
                                     name="s")
    assert len(sents) > 0
    s = sents[0]
    assert s["block"] >= 0 and s["spans"].shape[1] == 2
    assert s["text"] in corpus[s["block"]]["text"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"title": "ok", "text": "fine"}\n\n{"title": "x", "text": \n'
                  b'{"title": 3, "text": "t"}\n{"title": "u", "text": "caf\xff\xfe"}\n'
                  b'{"title": "s", "text": "lone \\ud800 surrogate"}\n')
    with pytest.raises(sources.BadInputError, match=r"bad\.jsonl:3: "):
        list(sources.jsonl_documents(p))
    stats = sources.ReadStats()
    docs = list(sources.jsonl_documents(p, skip_bad=True, stats=stats))
    assert [t for t, _ in docs] == ["ok", "u", "s"]
    assert stats["bad_lines"] == 2 and stats["invalid_utf8_lines"] == 1
    assert "\ufffd" in docs[1][1] and docs[2][1] == "lone \ufffd surrogate"
    assert stats["lone_surrogates_replaced"] == 1


def test_builder_skip_bad_counts(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text('{"title": "a", "text": "Some text."}\nnot json\n{"text": ""}\n')
    vocab = checkpoints.minilm_path() / "vocab.txt"
    with pytest.raises(sources.BadInputError, match="docs.jsonl:2"):
        blocks.build_corpus(tmp_path / "o1", source="jsonl", path=str(p), vocab_file=vocab)
    corpus, stats = blocks.build_corpus(tmp_path / "o2", source="jsonl", path=str(p),
                                        vocab_file=vocab, skip_bad=True)
    assert len(corpus) == 1 and stats["bad_lines"] == 1 and stats["empty_documents"] == 1


def test_an_empty_jsonl_corpus_is_refused_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    vocab = checkpoints.minilm_path() / "vocab.txt"
    with pytest.raises(UserError, match=f"{empty}: no blocks: the jsonl source holds no "
                                        "document with text"):
        blocks.build_corpus(tmp_path / "o", source="jsonl", path=str(empty), vocab_file=vocab)


def test_command_flags_take_underscores_and_the_old_hyphens(tmp_path, capsys):
    records = np.array([b"first block", b"second block"], dtype=object)
    np.save(tmp_path / "block_records.npy", records, allow_pickle=True)
    for spelling, out in (("--allow_pickle", "o1"), ("--allow-pickle", "o2")):
        blocks.main(["--source", "hf_block_records", "--path",
                     str(tmp_path / "block_records.npy"), "--out", str(tmp_path / out),
                     spelling, "--max_block_wordpieces", "64"])
        assert "BlockCorpus(2 blocks" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="^error: .*empty.jsonl: no blocks"):  # one line
        (tmp_path / "empty.jsonl").write_text("")
        blocks.main(["--source", "jsonl", "--path", str(tmp_path / "empty.jsonl"), "--out",
                     str(tmp_path / "o3"), "--vocab",
                     str(checkpoints.minilm_path() / "vocab.txt")])


def test_text_folder_and_hf_records_sources(tmp_path, tok):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "Some_Title.txt").write_bytes(b"Body of the page. Bad \xff byte.")
    stats = sources.ReadStats()
    docs = list(sources.text_folder_documents(tmp_path / "txt", stats))
    assert docs[0][0] == "Some Title" and "\ufffd" in docs[0][1]
    records = np.array([b"first block", b"second block"], dtype=object)
    np.save(tmp_path / "block_records.npy", records, allow_pickle=True)
    with pytest.raises(ValueError, match="--allow_pickle"):
        blocks.build_corpus(tmp_path / "o", source="hf_block_records",
                            path=str(tmp_path / "block_records.npy"))
    corpus, _ = blocks.build_corpus(tmp_path / "o2", source="hf_block_records",
                                    path=str(tmp_path / "block_records.npy"), allow_pickle=True)
    assert [corpus[i]["text"] for i in range(2)] == ["first block", "second block"]
