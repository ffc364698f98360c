"""The pre-training example source: one sentence per example, with its salient spans.

An example is `{"text": str, "spans": int32 [S, 2] char spans, "block": int, "gold_block":
int}`: `block` is the corpus index of the block the sentence was taken from (the trivial
retrieval to refuse; −1 when the sentence is not in the corpus) and `gold_block` the block that
holds the fact it states where that is known (the synthetic KB), else −1.

Sentences come from the corpus itself (every block sentence with at least one salient span, as
REALM pre-trains on Wikipedia sentences), or precomputed with their spans in a JSONL file
(the synthetic KB writes one). `Sentences` holds them in memory; the TFDS builder
`realm_sentences` stores them as array_record for corpora too large for memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from realm_jax.data import sources
from realm_jax.data.blocks import BlockCorpus, split_sentences
from realm_jax.data.masking import RegexTagger, Tagger


def _spans_array(spans: Any) -> np.ndarray:
    arr = np.asarray(spans if spans is not None else [], np.int32).reshape(-1, 2)
    return arr


@dataclasses.dataclass
class Sentences:
    """An in-memory, random-access pre-training source (columnar: cheap for millions)."""

    texts: list[str]
    blocks: np.ndarray  # [N] int32
    gold_blocks: np.ndarray  # [N] int32
    span_offsets: np.ndarray  # [N + 1] int64 into span_flat
    span_flat: np.ndarray  # [T, 2] int32

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> Sentences:
        texts, blocks, gold, spans = [], [], [], []
        for r in records:
            texts.append(r["text"])
            blocks.append(int(r.get("block", -1)))
            gold.append(int(r.get("gold_block", -1)))
            spans.append(_spans_array(r.get("spans")))
        counts = np.fromiter((len(s) for s in spans), np.int64, len(spans))
        return cls(texts, np.asarray(blocks, np.int32), np.asarray(gold, np.int32),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.concatenate(spans) if spans else np.zeros((0, 2), np.int32))

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        return {"text": self.texts[i],
                "spans": self.span_flat[self.span_offsets[i]: self.span_offsets[i + 1]],
                "block": int(self.blocks[i]), "gold_block": int(self.gold_blocks[i])}


def corpus_sentences(
    corpus: BlockCorpus,
    tagger: Tagger | None = None,
    min_spans: int = 1,
    stats: sources.ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Every sentence of every block with ≥ min_spans salient spans, tagged, in corpus order."""
    tagger = tagger or RegexTagger()
    stats = stats if stats is not None else sources.ReadStats()
    for start in range(0, len(corpus), 4096):
        ids = range(start, min(start + 4096, len(corpus)))
        for i, row in zip(ids, corpus.get_many(ids), strict=True):
            text = row["text"]
            for a, b in split_sentences(text):
                sentence = text[a:b]
                spans = tagger(sentence)
                stats.add("sentences")
                if len(spans) < min_spans:
                    stats.add("sentences_without_spans")
                    continue
                yield {"text": sentence, "spans": _spans_array(spans), "block": i,
                       "gold_block": -1}


def _example(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError("expected an object with a string 'text'")
    spans = _spans_array(record.get("spans", []))
    if len(spans) and ((spans[:, 0] < 0).any() or (spans[:, 1] > len(record["text"])).any()
                       or (spans[:, 0] >= spans[:, 1]).any()):
        raise ValueError(f"'spans' {spans.tolist()} do not lie inside the text")
    return {"text": record["text"], "spans": spans, "block": int(record.get("block", -1)),
            "gold_block": int(record.get("gold_block", -1))}


def jsonl_sentences(
    path: epath.PathLike, skip_bad: bool = False, stats: sources.ReadStats | None = None
) -> Iterator[dict[str, Any]]:
    """Precomputed examples: `{"text", "spans": [[start, end], …], "block", "gold_block"}`."""
    return sources.read_jsonl(path, _example, skip_bad, stats)


# --------------------------------------------------------------------------- TFDS storage


@dataclasses.dataclass
class RealmSentencesConfig(tfds.core.BuilderConfig):
    """source: "corpus" (`path` = a prepared realm_blocks dir, tagged with `tagger`) or
    "jsonl" (`path` = precomputed examples)."""

    source: str = "corpus"
    path: str = ""
    tagger: str = "regex"
    skip_bad: bool = False


class RealmSentences(sources.LocalBuilder):
    """TFDS builder `realm_sentences`: split "train", examples as documented above."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [RealmSentencesConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "spans": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
                "block": np.int64, "gold_block": np.int64,
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c: RealmSentencesConfig = self.builder_config
        if c.source == "jsonl":
            records = jsonl_sentences(c.path, c.skip_bad)
        elif c.source == "corpus":
            if c.tagger != "regex":
                raise ValueError(f"unknown tagger {c.tagger!r}; precompute spans into JSONL")
            records = corpus_sentences(BlockCorpus.load(c.path), RegexTagger())
        else:
            raise ValueError(f"unknown realm_sentences source {c.source!r}")
        yield from enumerate(records)


def _decode(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"text": r["text"].decode("utf-8"), "spans": r["spans"],
            "block": int(r["block"]), "gold_block": int(r["gold_block"])}


def build_sentences(out_dir: epath.PathLike, *, source: str, path: str, name: str,
                    tagger: str = "regex", skip_bad: bool = False) -> Any:
    """Prepare a `realm_sentences` dataset (array_record) and return it as a random-access
    source of examples."""
    builder = RealmSentences(
        config=RealmSentencesConfig(name=name, source=source, path=str(path), tagger=tagger,
                                    skip_bad=skip_bad),
        data_dir=str(out_dir), file_format="array_record")
    builder.download_and_prepare()
    return load_sentences(builder.data_dir)


def load_sentences(path: epath.PathLike) -> Sequence[dict[str, Any]]:
    """A prepared `realm_sentences` version directory → random-access examples."""
    return sources.DecodedSource(
        tfds.builder_from_directory(str(path)).as_data_source(split="train"), _decode)
