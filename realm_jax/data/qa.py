"""Open-domain QA sets and their metric: NQ-open, WebQuestions, CuratedTrec, synthetic.

All sets share one record, `{"question": str, "answers": [str, …], "gold_block": int}`
(gold_block −1 when unknown: only the synthetic KB knows which block holds the answer). Inputs
are JSONL in the NQ-open format (`{"question", "answer": [...]}`; "answers" is accepted too),
built by the TFDS builder `realm_qa` into array_record, or TFDS `natural_questions_open` when it
is prepared locally. CuratedTrec's answers are regular expressions.

Exact match is the official SQuAD / NQ evaluation: lower-case, strip punctuation, the articles
a/an/the and extra whitespace, then compare strings. CuratedTrec matches its patterns as DrQA
and ORQA do: `re.match` (anchored at the start), case-insensitive.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from realm_jax.data import sources

FORMATS = ("nq_open", "web_questions", "curated_trec", "synthetic")
# The TFDS catalog names NQ-open `natural_questions_open` (features question, answer[]).
TFDS_ALIASES = {"natural_questions/open": "natural_questions_open"}
REGEX_FORMATS = ("curated_trec",)


# --------------------------------------------------------------------------- the metric


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 `normalize_answer`: lower, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """True when the normalised prediction equals any normalised gold answer."""
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in answers)


def regex_match(prediction: str, patterns: Sequence[str]) -> bool:
    """CuratedTrec: any pattern `re.match`es the prediction (case-insensitive)."""
    for pattern in patterns:
        try:
            if re.match(pattern, prediction, flags=re.IGNORECASE | re.UNICODE) is not None:
                return True
        except re.error:
            continue
    return False


def answer_match(prediction: str, answers: Sequence[str], is_regex: bool = False) -> bool:
    return regex_match(prediction, answers) if is_regex else exact_match(prediction, answers)


def answers_in(text: str, answers: Sequence[str], is_regex: bool = False) -> list[str]:
    """The answers a block's text bears, as strings found in it (ORQA's "has answer").

    Literal answers: each answer whose normalised form occurs in the normalised text as whole
    words (returned as given). Regular expressions (CuratedTrec): the non-empty substrings of
    the raw text that a pattern `re.search`es (case-insensitive), in order, each once; a pattern
    that does not compile matches nothing. Why strings: training locates an answer by its
    wordpieces, so a pattern must first become the text it matched in this block.
    """
    if is_regex:
        found: list[str] = []
        for pattern in answers:
            try:
                matches = re.finditer(pattern, text, flags=re.IGNORECASE | re.UNICODE)
                found += [m.group(0).strip() for m in matches if m.group(0).strip()]
            except re.error:
                continue
        return list(dict.fromkeys(found))
    body = f" {normalize_answer(text)} "
    return [a for a in answers if (n := normalize_answer(a)) and f" {n} " in body]


def has_answer(text: str, answers: Sequence[str], is_regex: bool = False) -> bool:
    """Whether a block's text bears one of the answers (`answers_in`): evaluation's recall@k
    and training's retriever targets."""
    return bool(answers_in(text, answers, is_regex))


# --------------------------------------------------------------------------- records


def _validator(is_regex: bool):
    def validate(record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise ValueError(f"expected an object, got {type(record).__name__}")
        q = record.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ValueError("field 'question' is missing, empty or not a string")
        answers = record.get("answer", record.get("answers"))
        if isinstance(answers, str):
            answers = [answers]
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) for a in answers)):
            raise ValueError("field 'answer' must be a non-empty list of strings")
        if is_regex:
            for a in answers:
                try:
                    re.compile(a)
                except re.error as e:
                    raise ValueError(f"answer pattern {a!r} is not a regular expression: {e}"
                                     ) from e
        gold = record.get("gold_block", -1)
        if not isinstance(gold, int):
            raise ValueError("field 'gold_block' must be an integer")
        return {"question": q, "answers": answers, "gold_block": gold}

    return validate


def jsonl_qa(
    path: epath.PathLike,
    fmt: str = "nq_open",
    skip_bad: bool = False,
    stats: sources.ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Validated QA records of a JSONL file (errors name `file:line`)."""
    _check_format(fmt)
    return sources.read_jsonl(path, _validator(fmt in REGEX_FORMATS), skip_bad, stats)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown QA format {fmt!r}; accepted: {FORMATS}")


@dataclasses.dataclass
class QaSet:
    """Random-access QA examples: `qa[i] -> {"question", "answers", "gold_block"}`."""

    source: Any
    is_regex: bool = False
    name: str = ""

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _qa_record(self.source[int(i)])


def _qa_record(r: Mapping[str, Any]) -> dict[str, Any]:
    answers = r.get("answers", r.get("answer"))
    if isinstance(answers, np.ndarray | list | tuple):
        answers = [_str(a) for a in answers]
    else:
        answers = [_str(answers)]
    return {"question": _str(r["question"]), "answers": answers,
            "gold_block": int(r.get("gold_block", -1))}


def _str(x: Any) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes | np.bytes_) else str(x)


# --------------------------------------------------------------------------- TFDS


@dataclasses.dataclass
class RealmQaConfig(tfds.core.BuilderConfig):
    """format: one of FORMATS; splits: split name → JSONL path."""

    format: str = "nq_open"
    splits: tuple[tuple[str, str], ...] = ()
    skip_bad: bool = False


class RealmQa(sources.LocalBuilder):
    """TFDS builder `realm_qa`: one split per given JSONL file, records as documented above."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [RealmQaConfig(name="default")]

    def __init__(self, *args, **kwargs):
        self.stats = sources.ReadStats()
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                "answers": tfds.features.Sequence(tfds.features.Text()),
                "gold_block": np.int64,
            }),
            metadata=tfds.core.MetadataDict(
                format=self.builder_config.format,
                is_regex=self.builder_config.format in REGEX_FORMATS),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c: RealmQaConfig = self.builder_config
        _check_format(c.format)
        return {split: self._generate_examples(path) for split, path in c.splits}

    def _generate_examples(self, path: str):
        c: RealmQaConfig = self.builder_config
        yield from enumerate(jsonl_qa(path, c.format, c.skip_bad, self.stats))


def build_qa(
    out_dir: epath.PathLike, *, name: str, fmt: str, splits: Mapping[str, epath.PathLike],
    skip_bad: bool = False,
) -> dict[str, QaSet]:
    """Prepare a `realm_qa` dataset from JSONL files and return its splits."""
    config = RealmQaConfig(name=name, format=fmt, skip_bad=skip_bad,
                           splits=tuple((k, str(v)) for k, v in splits.items()))
    builder = RealmQa(config=config, data_dir=str(out_dir), file_format="array_record")
    builder.download_and_prepare()
    return {s: load_qa(builder.data_dir, s) for s in splits}


def load_qa(spec: str | epath.PathLike, split: str, data_dir: str | None = None,
            fmt: str | None = None, skip_bad: bool = False) -> QaSet:
    """A QA split from: a prepared `realm_qa` version directory; a TFDS name such as
    `natural_questions_open` (alias `natural_questions/open`; prepared locally as
    array_record, nothing is downloaded; split "validation" is NQ dev); or a JSONL file (read
    into memory; `fmt` says which format)."""
    s = str(spec)
    path = epath.Path(s)
    if s.endswith(".jsonl"):
        fmt = fmt or "nq_open"
        return QaSet(list(jsonl_qa(path, fmt, skip_bad)), fmt in REGEX_FORMATS, s)
    if (path / "dataset_info.json").exists():
        builder = tfds.builder_from_directory(s)
        meta = builder.info.metadata or {}
        is_regex = bool(meta.get("is_regex", False)) if fmt is None else fmt in REGEX_FORMATS
        return QaSet(builder.as_data_source(split=split), is_regex, f"{s}[{split}]")
    try:  # a registered TFDS dataset such as natural_questions_open
        source = tfds.data_source(TFDS_ALIASES.get(s, s), split=split, data_dir=data_dir,
                                  download=False)
    except Exception as e:
        raise FileNotFoundError(
            f"QA spec {s!r} is neither a .jsonl file, a prepared dataset directory, nor a TFDS "
            f"dataset prepared under {data_dir or 'the default data_dir'}") from e
    return QaSet(source, (fmt or "") in REGEX_FORMATS, f"{s}[{split}]")
