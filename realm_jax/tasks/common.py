"""What both tasks share: the task interface, query embedding for search, retrieval recall."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from realm_jax import defaults, sharding
from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.joins import TokenizedBlocks
from realm_jax.data.tokenizer import WordPiece
from realm_jax.models import Embedder
from realm_jax.retrieval.searcher import Searcher

PyTree = Any


def query_tower(params: dict[str, PyTree]) -> PyTree:
    """The tower that embeds questions/queries: a separate query tower if trained, else the
    shared embedder."""
    return params["query_embedder"] if "query_embedder" in params else params["embedder"]


class QueryEncoder:
    """Texts or token ids → query embeddings [B, d] on the host (deterministic, jitted).

    Batches are padded to a multiple of the mesh's batch shards, and at most `batch_size` rows
    go through one call, so the function compiles for a handful of shapes only.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh, batch_size: int = 64):
        self.config = config
        self.mesh = mesh
        self.rules = tuple(config.rules)
        self.shards = sharding.mesh_batch_size(mesh, self.rules)
        self.batch_size = -(-batch_size // self.shards) * self.shards
        module = Embedder(defaults.model_config(config))
        self._embed = sharding.jit_sharded(
            lambda p, ids, mask, types: module.apply({"params": p}, ids, mask, types),
            mesh, self.rules, out_shardings=sharding.replicated(mesh))

    def embed_ids(self, params: PyTree, ids: np.ndarray, mask: np.ndarray, types: np.ndarray
                  ) -> np.ndarray:
        """[B, L] int32 arrays → float32 [B, d] (B any size)."""
        n = ids.shape[0]
        out = []
        for start in range(0, n, self.batch_size):
            rows = slice(start, min(start + self.batch_size, n))
            m = rows.stop - rows.start
            pad = (-m) % self.shards
            arrays = [np.pad(a[rows], ((0, pad), (0, 0))) for a in (ids, mask, types)]
            placed = [jax.device_put(a, sharding.batch_sharding(self.mesh, 2, self.rules))
                      for a in arrays]
            out.append(np.asarray(self._embed(params, *placed))[:m])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_texts(self, params: PyTree, tokenizer: WordPiece, texts: Sequence[str],
                    max_length: int) -> np.ndarray:
        enc = tokenizer.encode_queries(list(texts), max_length)
        return self.embed_ids(params, enc.input_ids, enc.attention_mask, enc.token_type_ids)


def gold_recall(
    encoder: QueryEncoder, params: PyTree, searcher: Searcher, tokenizer: WordPiece,
    questions: Sequence[str], gold_blocks: np.ndarray, k: int, max_length: int,
) -> float:
    """Fraction of questions whose gold block is in the top-k of `searcher` (gold ≥ 0 only)."""
    gold = np.asarray(gold_blocks)
    keep = gold >= 0
    if not keep.any():
        return float("nan")
    texts = [q for q, ok in zip(questions, keep, strict=True) if ok]
    ids, _ = searcher.search(encoder.embed_texts(params, tokenizer, texts, max_length), k)
    return float((ids == gold[keep][:, None]).any(-1).mean())


class Task(abc.ABC):
    """A training task: towers, host-side preparation of a batch, and a pure loss."""

    name: str
    towers: tuple[str, ...]

    def __init__(self, config: ml_collections.ConfigDict, mesh, corpus: BlockCorpus,
                 blocks: TokenizedBlocks, tokenizer: WordPiece):
        self.config = config
        self.mesh = mesh
        self.rules = tuple(config.rules)
        self.cfg = defaults.model_config(config)
        self.corpus = corpus
        self.blocks = blocks
        self.tokenizer = tokenizer
        self.queries = QueryEncoder(config, mesh, batch_size=max(config.eval.batch_size, 8))

    @abc.abstractmethod
    def dataset(self, seed: int) -> Any:
        """The grain IterDataset of host training batches."""

    @abc.abstractmethod
    def prepare(self, batch: dict[str, Any], params: PyTree, searcher: Searcher
                ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Host batch → (per-host device inputs as numpy, host metrics such as recall)."""

    @abc.abstractmethod
    def loss(self, params: PyTree, inputs: dict[str, jax.Array], rng: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure: (scalar loss, scalar metrics) of one batch; differentiated w.r.t. params."""

    @abc.abstractmethod
    def evaluate(self, params: PyTree, searcher: Searcher) -> dict[str, float]:
        """Held-out metrics on `config.eval.split` with the current index."""


def make_task(config: ml_collections.ConfigDict, mesh, corpus: BlockCorpus,
              blocks: TokenizedBlocks, tokenizer: WordPiece) -> Task:
    if config.task == "realm_mlm":
        from realm_jax.tasks.realm_mlm import RealmMlm

        return RealmMlm(config, mesh, corpus, blocks, tokenizer)
    if config.task == "orqa":
        from realm_jax.tasks.orqa import Orqa

        return Orqa(config, mesh, corpus, blocks, tokenizer)
    raise ValueError(f"task={config.task!r}; accepted: realm_mlm, orqa")
