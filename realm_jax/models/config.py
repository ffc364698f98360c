"""Model hyper-parameters as frozen dataclasses.

Flax modules take these as attributes, so they must be hashable (frozen) and
free of arrays. Experiment configs (`configs/*.py`, ml_collections) hold a
`model` dict that `RealmModelConfig.from_dict` turns into this object; weight
importers build it from a Hugging Face `config.json` with `from_hf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Hugging Face activation names we support. `gelu_new` is the tanh
# approximation used by TF BERT and HF REALM; `gelu` is the exact erf form that
# sentence-transformers' MiniLM was trained with.
ACTIVATIONS = ("gelu_new", "gelu", "relu")
POOLINGS = ("cls_pooler", "mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """One BERT body. Defaults are BERT-base as used by REALM."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu_new"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype: "bfloat16" on TPU
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass (saves memory)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; accepted: {ACTIVATIONS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BertConfig:
        """`bert_base`, `minilm_l6_h384` (all-MiniLM-L6-v2) or `tiny` (tests)."""
        presets = {
            "bert_base": {},
            "minilm_l6_h384": dict(
                hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                hidden_act="gelu",
            ),
            "tiny": dict(
                vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                max_position_embeddings=128,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown BERT preset {name!r}; accepted: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


# How many blocks are searched, read and marginalised over is the experiment's, not the
# model's: orqa.searcher_beam_size / orqa.reader_beam_size / retrieval.k, one key each. Models
# saved when these were model fields still carry them; `from_dict` drops them.
SEARCH_KEYS = ("reader_beam_size", "searcher_beam_size", "num_candidates")


@dataclasses.dataclass(frozen=True)
class RealmModelConfig:
    """Everything the REALM towers need. One BERT size serves all towers, as in HF REALM."""

    bert: BertConfig = dataclasses.field(default_factory=BertConfig)
    # Retriever (embedder) head.
    proj_size: int = 128  # 0 = no projection: the pooled BERT output is the embedding
    pooling: str = "cls_pooler"
    embed_dropout: float = 0.1  # after the projection LayerNorm, train only (released code)
    normalize: bool = False  # L2-normalise embeddings (sentence-transformers style)
    share_embedders: bool = True  # one embedder for queries and blocks
    # Reader (ORQA span scorer).
    span_hidden_size: int = 256
    max_span_width: int = 10
    reader_layer_norm_eps: float = 1e-3

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; accepted: {POOLINGS}")

    @property
    def embedding_dim(self) -> int:
        """d of the retriever's vectors: the projection's size, or BERT's width without one."""
        return self.proj_size or self.bert.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RealmModelConfig:
        """Inverse of `to_dict`; accepts an ml_collections ConfigDict too."""
        d = {k: v for k, v in dict(d).items() if k not in SEARCH_KEYS}
        bert = d.pop("bert", {})
        if not isinstance(bert, BertConfig):
            bert = dict(bert)
            preset = bert.pop("preset", None)
            bert = BertConfig.preset(preset, **bert) if preset else BertConfig(**bert)
        _check_keys(cls, d)
        return cls(bert=bert, **d)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> RealmModelConfig:
        """From a Hugging Face `config.json` (REALM or BERT)."""
        bert = BertConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            hidden_act=hf.get("hidden_act", "gelu"),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
        )
        kw: dict[str, Any] = {}
        for ours, theirs in [
            ("proj_size", "retriever_proj_size"),
            ("span_hidden_size", "span_hidden_size"),
            ("max_span_width", "max_span_width"),
            ("reader_layer_norm_eps", "reader_layer_norm_eps"),
        ]:
            if theirs in hf:
                kw[ours] = hf[theirs]
        kw.update(overrides)
        return cls(bert=bert, **kw)


def _check_keys(cls: type, d: Mapping[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; accepted: {sorted(names)}")
