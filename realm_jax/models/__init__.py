"""REALM's towers: BERT body, embedder (retriever), knowledge-augmented encoder, span reader."""

from realm_jax.models.bert import BertEncoder
from realm_jax.models.config import BertConfig, RealmModelConfig
from realm_jax.models.embedder import Embedder, relevance_scores
from realm_jax.models.mlm import KnowledgeAugEncoder
from realm_jax.models.reader import SpanReader, orqa_logits, span_candidates

__all__ = [
    "BertConfig",
    "BertEncoder",
    "Embedder",
    "KnowledgeAugEncoder",
    "RealmModelConfig",
    "SpanReader",
    "orqa_logits",
    "relevance_scores",
    "span_candidates",
]
