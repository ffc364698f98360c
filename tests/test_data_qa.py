"""Open-QA sets: the official EM normalisation, CuratedTrec regexes, readers and builders."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from realm_jax import defaults
from realm_jax.data import qa, sources
from realm_jax.data.loaders import load_qa_split

# (prediction, gold answers, expected EM) — the SQuAD/NQ normalisation, case by case.
EM_TABLE = [
    ("Charles Darwin", ["charles darwin"], True),  # case
    ("the Beatles", ["Beatles"], True),  # leading article
    ("The  Beatles.", ["beatles"], True),  # article, extra space, punctuation
    ("a cat", ["an cat"], True),  # both articles stripped
    ("theatre", ["atre"], False),  # "the" inside a word is no article
    ("Andrew the Apostle", ["Andrew Apostle"], True),  # articles anywhere
    ("U.S.A.", ["USA"], True),  # punctuation inside
    ("O'Neill", ["ONeill"], True),  # apostrophe is punctuation
    ("rock-n-roll", ["rocknroll"], True),  # hyphen is punctuation
    ("rock n roll", ["rocknroll"], False),  # but spaces stay separators
    ("1,000", ["1000"], True),
    ("Paris", ["London", "paris"], True),  # any of several answers
    ("Paris, France", ["Paris"], False),  # no partial credit
    ("", ["a"], True),  # "a" normalises to the empty string
    ("", ["anything"], False),
    ("café", ["cafe"], False),  # accents are kept (official script does not strip them)
    ("  tab\tand\nnewline ", ["tab and newline"], True),
    ("an", ["the"], True),
]


@pytest.mark.parametrize("prediction,answers,expected", EM_TABLE)
def test_exact_match_table(prediction, answers, expected):
    assert qa.exact_match(prediction, answers) is expected


def test_normalize_matches_official_script():
    # The official function, verbatim (SQuAD v1.1 evaluate-v1.1.py).
    import re
    import string

    def official(s):
        def remove_articles(text):
            return re.sub(r"\b(a|an|the)\b", " ", text)

        def white_space_fix(text):
            return " ".join(text.split())

        def remove_punc(text):
            exclude = set(string.punctuation)
            return "".join(ch for ch in text if ch not in exclude)

        return white_space_fix(remove_articles(remove_punc(s.lower())))

    for prediction, answers, _ in EM_TABLE:
        for s in [prediction, *answers]:
            assert qa.normalize_answer(s) == official(s)


@pytest.mark.parametrize("prediction,patterns,expected", [
    ("George Washington", [r"(George\s+)?Washington"], True),
    ("washington", [r"(George\s+)?Washington"], True),  # case-insensitive
    ("President Washington", [r"(George\s+)?Washington"], False),  # anchored at the start
    ("1969 or so", [r"19(69|70)"], True),  # re.match: only the start is anchored
    ("1971", [r"19(69|70)"], False),
    ("x", [r"(", r"x"], True),  # a broken pattern is skipped, not fatal
])
def test_regex_match(prediction, patterns, expected):
    assert qa.regex_match(prediction, patterns) is expected
    assert qa.answer_match(prediction, patterns, is_regex=True) is expected


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl_formats_and_errors(tmp_path):
    p = tmp_path / "nq.jsonl"
    _write(p, [{"question": "who?", "answer": ["me"]}, {"question": "what?", "answers": ["it"]},
               {"question": "one?", "answer": "single"}])
    got = list(qa.jsonl_qa(p))
    assert [r["answers"] for r in got] == [["me"], ["it"], ["single"]]
    assert all(r["gold_block"] == -1 for r in got)
    bad = tmp_path / "bad.jsonl"
    _write(bad, [{"question": "ok?", "answer": ["a"]}, {"question": "", "answer": ["a"]},
                 {"question": "q?", "answer": []}, "{broken"])
    with pytest.raises(sources.BadInputError, match=r"bad\.jsonl:2: .*question"):
        list(qa.jsonl_qa(bad))
    stats = sources.ReadStats()
    assert len(list(qa.jsonl_qa(bad, skip_bad=True, stats=stats))) == 1
    assert stats["bad_lines"] == 3
    trec = tmp_path / "trec.jsonl"
    _write(trec, [{"question": "q?", "answer": ["(unclosed"]}])
    with pytest.raises(sources.BadInputError, match=r"trec\.jsonl:1: .*regular expression"):
        list(qa.jsonl_qa(trec, "curated_trec"))
    with pytest.raises(ValueError, match="unknown QA format"):
        qa.jsonl_qa(p, "squad")


def test_tfds_builder_and_loaders(tmp_path):
    for split in ("train", "test"):
        _write(tmp_path / f"{split}.jsonl", [
            {"question": f"{split} q{i}?", "answer": [f"Wash(ington)?{i}"], "gold_block": i}
            for i in range(5)])
    sets = qa.build_qa(tmp_path / "tfds", name="trec", fmt="curated_trec",
                       splits={"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"})
    test = sets["test"]
    assert len(test) == 5 and test.is_regex
    assert test[2] == {"question": "test q2?", "answers": ["Wash(ington)?2"], "gold_block": 2}
    hits = [qa.answer_match(p, test[i]["answers"], test.is_regex)
            for i, p in enumerate(["washington0", "wash1", "no", "Wash3", "x"])]
    assert np.mean(hits) == pytest.approx(0.6)
    # The same data reloaded by directory keeps its regex flag; JSONL loads directly.
    again = qa.load_qa(tmp_path / "tfds" / "realm_qa" / "trec" / "1.0.0", "train")
    assert again.is_regex and again[0]["question"] == "train q0?"
    direct = qa.load_qa(str(tmp_path / "train.jsonl"), "train")
    assert not direct.is_regex and direct[4]["gold_block"] == 4
    # An unprepared TFDS dataset (natural_questions/open here) is a clear error, no download.
    with pytest.raises(FileNotFoundError, match="natural_questions/open"):
        qa.load_qa("natural_questions/open", "validation", data_dir=str(tmp_path / "none"))


class _FakeNqOpen(sources.LocalBuilder, skip_registration=True):
    """Writes files shaped like a locally prepared TFDS natural_questions_open (no download)."""

    name = "natural_questions_open"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"question": np.str_, "answer": tfds.features.Sequence(np.str_)}))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"question": "who wrote it?", "answer": ["Me", "I"]}


def test_tfds_natural_questions_open_path(tmp_path):
    """The registered TFDS builder reads a locally prepared array_record NQ-open."""
    _FakeNqOpen(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    for name in ("natural_questions_open", "natural_questions/open"):
        nq = qa.load_qa(name, "validation", data_dir=str(tmp_path))
        assert len(nq) == 1 and not nq.is_regex
        assert nq[0] == {"question": "who wrote it?", "answers": ["Me", "I"], "gold_block": -1}
    # A run finds it through its config (configs/orqa_nq.py: data.qa, data.tfds_data_dir).
    config = defaults.base_config()
    config.data.update(qa="natural_questions_open", tfds_data_dir=str(tmp_path))
    assert load_qa_split(config, "validation")[0]["answers"] == ["Me", "I"]
    config.data.tfds_data_dir = str(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_qa_split(config, "validation")


def test_answers_in_gives_the_text_each_answer_bears():
    text = "In 1859 Charles Darwin published On the Origin of Species; Darwin's rival: Wallace."
    assert qa.answers_in(text, ["charles darwin", "The origin of species", "1860", "darwi"]) == [
        "charles darwin", "The origin of species"]
    # Patterns: the substrings they match (raw text, any case), each once, in pattern order.
    assert qa.answers_in(text, [r"darwin", r"\d{4}", r"(unclosed", r"x*"], is_regex=True) == [
        "Darwin", "1859"]
    assert qa.has_answer(text, [r"wall\w+"], is_regex=True)
    assert not qa.has_answer(text, [r"^Darwin"], is_regex=True) and not qa.has_answer(text, [])
