"""A run's data from its config: tokenizer, corpus, pre-training sentences, QA splits.

Trainer, refresher, evaluation and inference all call these, so every process of a run builds
the same corpus from the same config (the index's `corpus_fingerprint` checks it).

Config keys (defaults.base_config `data`):
  vocab      a vocab.txt path or "minilm" (the packaged uncased BERT vocabulary);
  corpus     "synthetic" (the generated knowledge base, data.synthetic) or a prepared
             `realm_blocks` dataset / JSONL file (`BlockCorpus.load`);
  sentences  pre-training examples: "" with a synthetic corpus (its paraphrased facts), a
             prepared `realm_sentences` directory, a JSONL file, or "corpus" (every block
             sentence with a salient span, tagged with the regex tagger);
  qa         QA splits: "" with a synthetic corpus, else a `load_qa` spec (realm_qa directory,
             TFDS name such as natural_questions_open, or a JSONL file with `{split}` in it);
  tfds_data_dir  where registered TFDS datasets are prepared ("" = TFDS's default).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

from realm_jax.data import synthetic
from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.examples import Sentences, corpus_sentences, jsonl_sentences, load_sentences
from realm_jax.data.qa import QaSet, load_qa
from realm_jax.data.sources import ReadStats
from realm_jax.data.tokenizer import WordPiece
from realm_jax.errors import UserError


def _minilm_vocab() -> epath.Path:
    from realm_jax import checkpoints

    return checkpoints.minilm_path() / "vocab.txt"


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab: str) -> WordPiece:
    return WordPiece(_minilm_vocab() if vocab == "minilm" else epath.Path(vocab))


def load_tokenizer(config: ml_collections.ConfigDict) -> WordPiece:
    return _tokenizer(str(config.data.vocab))


@functools.lru_cache(maxsize=2)
def _synthetic(num_entities: int, seed: int, vocab: str, block_len: int
               ) -> synthetic.SyntheticData:
    kb = synthetic.generate(num_entities=num_entities, seed=seed)
    return kb.build(_tokenizer(vocab), block_len)


def load_synthetic(config: ml_collections.ConfigDict) -> synthetic.SyntheticData:
    """The generated knowledge base cut at `data.block_len` (cached per process)."""
    s = config.data.synthetic
    return _synthetic(int(s.num_entities), int(s.seed), str(config.data.vocab),
                      int(config.data.block_len))


def is_synthetic(config: ml_collections.ConfigDict) -> bool:
    return config.data.corpus == "synthetic"


def load_corpus(config: ml_collections.ConfigDict, tokenizer: WordPiece | None = None
                ) -> BlockCorpus:
    """The run's corpus: a prepared `realm_blocks` dataset, or "synthetic" — the generated
    knowledge base cut at `data.block_len`, deterministic from its seed."""
    del tokenizer  # the synthetic corpus uses the config's vocabulary (load_tokenizer)
    spec = config.data.corpus
    if spec == "synthetic":
        return load_synthetic(config).corpus
    if not spec:
        raise ValueError("config.data.corpus is empty: name a realm_blocks dataset or 'synthetic'")
    return BlockCorpus.load(spec, _tfds_data_dir(config))


def synthetic_sentences(config: ml_collections.ConfigDict, splits: Sequence[str]
                        ) -> Sentences:
    """The generated KB's pre-training sentences of `splits`, of the facts
    `data.synthetic.pretrain_attributes` names (None or absent: all)."""
    attributes = config.data.synthetic.get("pretrain_attributes", None)
    return load_synthetic(config).sentences(
        tuple(splits), None if attributes is None else tuple(attributes))


def load_pretrain_sentences(
    config: ml_collections.ConfigDict, corpus: BlockCorpus | None = None
) -> Sequence[dict[str, Any]]:
    """Pre-training examples (`{"text", "spans", "block", "gold_block"}`, random access)."""
    spec = config.data.get("sentences", "")
    if not spec:
        if not is_synthetic(config):
            raise ValueError("config.data.sentences is empty: name a realm_sentences dataset, "
                             "a JSONL file, or 'corpus'")
        splits = tuple(config.data.synthetic.get("pretrain_splits", synthetic.SPLITS))
        return synthetic_sentences(config, splits)
    if spec == "corpus":
        corpus = corpus or load_corpus(config)
        stats = ReadStats()
        sentences = Sentences.from_records(corpus_sentences(corpus, stats=stats))
        if not len(sentences):
            raise UserError(
                f"data.sentences=corpus: none of the {stats['sentences']} sentences of the "
                f"{len(corpus)} blocks has a salient span the regex tagger finds (a capitalised "
                "name, a date or a number), so there is nothing to mask: precompute spans into "
                "a JSONL file for data.sentences")
        return sentences
    if str(spec).endswith(".jsonl"):
        return Sentences.from_records(jsonl_sentences(spec))
    return load_sentences(spec)


def load_qa_split(config: ml_collections.ConfigDict, split: str) -> QaSet:
    """One QA split; synthetic questions carry their gold block."""
    spec = config.data.get("qa", "")
    if not spec:
        if not is_synthetic(config):
            raise ValueError("config.data.qa is empty: name a realm_qa dataset, a TFDS QA "
                             "dataset or a JSONL file")
        if split not in synthetic.SPLITS:
            raise ValueError(f"split {split!r}; the synthetic KB has {synthetic.SPLITS}")
        return load_synthetic(config).qa(split)
    fmt = config.data.get("qa_format", "") or None
    return load_qa(str(spec).replace("{split}", split), split, data_dir=_tfds_data_dir(config),
                   fmt=fmt)


def _tfds_data_dir(config: ml_collections.ConfigDict) -> str | None:
    """`data.tfds_data_dir`, or None for TFDS's default (configs saved before the key existed
    have none)."""
    return config.data.get("tfds_data_dir", "") or None
