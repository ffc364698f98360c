"""What every task shares: the task interface, query embedding for search, retrieval recall.

Multi-host: a training batch is split over hosts (each holds its own rows), but exact search
over the index sharded on all devices is a collective that every host must enter with the same
global queries. So `retrieve_host_rows` places every host's rows in one global batch and, for
exact search, embeds and searches it in one device call whose only outputs are the top-k ids
and scores (every host gets all of them and keeps its own rows); ScaNN searches on the host,
so there the embeddings come back (`EmbedRunner.embed_host_rows`) and each host searches its
own rows (`search_host_rows`).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from realm_jax import defaults, sharding
from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.joins import TokenizedBlocks
from realm_jax.data.pipeline import to_global
from realm_jax.data.tokenizer import WordPiece
from realm_jax.embedding import EmbedRunner, HostQueries, block_runner, query_runner
from realm_jax.retrieval.searcher import Searcher

PyTree = Any


def query_tower(params: dict[str, PyTree]) -> PyTree:
    """The tower that embeds questions/queries: a separate query tower if trained, else the
    shared embedder."""
    return params["query_embedder"] if "query_embedder" in params else params["embedder"]


def retrieval_scale(config: ml_collections.ConfigDict) -> float:
    """The factor on the retriever's scores f(x, z) (`realm.score_scale`, see
    `losses.score_scale`), for every task that trains the retriever on them: REALM and ICT."""
    from realm_jax.models.losses import score_scale

    cfg = defaults.model_config(config)
    r = config.get("realm", {})  # resolved configs written before the section existed lack it
    return score_scale(r.get("score_scale", "none"), cfg.embedding_dim)


def retrieve_host_rows(runner: EmbedRunner, params: PyTree, searcher: Searcher, ids: np.ndarray,
                       mask: np.ndarray, types: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids, scores) [b, k] of this host's query rows [b, L] under query tower `params`.

    Exact search: embedded and searched in one device call (`EmbedRunner.retrieve_host_rows`),
    only ids and scores come back. ScaNN searches on the host, so the embeddings come back
    first (`search_host_rows`).
    """
    index = searcher.device_index
    if index is not None:
        return runner.retrieve_host_rows(params, ids, mask, types, index, k)
    return search_host_rows(searcher, runner.embed_host_rows(params, ids, mask, types), k)


def search_host_rows(searcher: Searcher, queries: HostQueries, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids, scores) [b, k] of this host's queries.

    Exact search runs on the index sharded over every host's devices: a collective, so every
    host searches the whole global batch (the same queries in the same order) and keeps its own
    rows. ScaNN searches this host's copy of the index on the CPU: only its own rows.
    """
    if searcher.engine == "exact":
        ids, scores = searcher.search(queries.all, k)
        return ids[queries.rows], scores[queries.rows]
    return searcher.search(queries.mine, k)


def gold_recall(
    encoder: EmbedRunner, params: PyTree, searcher: Searcher, tokenizer: WordPiece,
    questions: Sequence[str], gold_blocks: np.ndarray, ks: Sequence[int], max_length: int,
) -> dict[int, float]:
    """Per k in `ks`: the fraction of questions whose gold block is in the top-k of
    `searcher` (gold ≥ 0 only); one search of the largest k."""
    gold = np.asarray(gold_blocks)
    keep = gold >= 0
    if not keep.any():
        return {k: float("nan") for k in ks}
    texts = [q for q, ok in zip(questions, keep, strict=True) if ok]
    ids, _ = searcher.search(encoder.embed(params, tokenizer.encode_queries(texts, max_length)),
                             max(ks))
    rank = np.where(ids == gold[keep][:, None], np.arange(ids.shape[1]), ids.shape[1]).min(-1)
    return {k: float((rank < k).mean()) for k in ks}


def recall_ks(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The k of gold-block recall logged: `eval.recall_k`, and 1. Why 1 too: on the generated
    KB a person has ~5 blocks, so recall@5 saturates once the retriever finds the person;
    recall@1 is whether it finds the block with the asked fact."""
    return tuple(sorted({1, int(config.eval.recall_k)}))


def eval_questions(config: ml_collections.ConfigDict) -> tuple[list[str], np.ndarray]:
    """The eval split's questions (at most `eval.max_examples`) and their gold blocks [N]
    (−1 where unknown): what gold recall measures the retriever on."""
    from realm_jax.data import loaders

    c = config.eval
    qa = loaders.load_qa_split(config, c.split)
    n = len(qa) if not c.max_examples else min(len(qa), c.max_examples)
    rows = [qa[i] for i in range(n)]
    return ([r["question"] for r in rows],
            np.array([r.get("gold_block", -1) for r in rows], np.int32))


def fresh_searcher(config: ml_collections.ConfigDict, mesh, embedder_params: PyTree,
                   blocks: TokenizedBlocks, embedder: EmbedRunner | None = None) -> Searcher:
    """An exact, in-memory index of every block embedded with `embedder_params` now.

    Why: the live index is stale by design, so recall against it mixes what the retriever
    learned with how old the index is. Recall against this one measures the retriever alone
    (the same re-embedding the refresher does, not published). `embedder`: the block
    runner to use (default `embedding.block_runner`).
    """
    from realm_jax.retrieval import mips
    from realm_jax.retrieval.store import IndexVersion

    embedder = embedder or block_runner(config, mesh)
    table = embedder.embed_blocks(embedder_params, blocks, console=False)  # [N, d]
    version = IndexVersion(step=-1, embeddings=table, meta={}, path=epath.Path("<fresh>"))
    rules = tuple(tuple(x) for x in config.rules)
    index = mips.ExactIndex.build(table, mesh, dtype=config.retrieval.table_dtype, rules=rules)
    return Searcher(version, "exact", index, mesh, rules)


class GoldRecall:
    """Gold-block recall@k (`recall_ks`) of the eval split's questions, against a given index
    (REALM's live one) or against a fresh one of given block-tower params.

    Why one class: REALM and ICT both measure their retriever so; the questions are read and
    the block embedder compiled once per task, not once per evaluation.
    """

    def __init__(self, task: Task):
        self.task = task

    @functools.cached_property
    def questions(self) -> tuple[list[str], np.ndarray]:
        """The eval split's questions and their gold blocks [N] (`eval_questions`)."""
        return eval_questions(self.task.config)

    def available(self) -> bool:
        """Whether there is anything to measure: questions (the generated KB, or a QA set in
        the config) of which some carry a gold block. Real QA sets carry none."""
        from realm_jax.data import loaders

        c = self.task.config
        if not (loaders.is_synthetic(c) or c.data.get("qa", "")):
            return False
        return bool((self.questions[1] >= 0).any())

    def against(self, query_params: PyTree, searcher: Searcher) -> dict[int, float]:
        """{k: recall@k} of the questions embedded with `query_params`, searched in
        `searcher`."""
        t = self.task
        questions, gold = self.questions
        return gold_recall(t.queries, query_params, searcher, t.tokenizer, questions, gold,
                           recall_ks(t.config), int(t.config.data.query_len))

    def fresh(self, query_params: PyTree, block_params: PyTree) -> dict[int, float]:
        """`against` an exact index of every block embedded with `block_params` now."""
        return self.against(query_params, self.fresh_searcher(block_params))

    def fresh_searcher(self, block_params: PyTree) -> Searcher:
        """An exact index of every block embedded with `block_params` now (`fresh_searcher`),
        with the block runner compiled once per task."""
        t = self.task
        return fresh_searcher(t.config, t.mesh, block_params, t.blocks, self._embedder)

    @functools.cached_property
    def _embedder(self) -> EmbedRunner:
        return block_runner(self.task.config, self.task.mesh)


class Task(abc.ABC):
    """A training task: towers, host-side preparation of a batch, and a pure loss."""

    name: str
    towers: tuple[str, ...]
    # The LiveIndex mode the task needs: None = `config.refresh.mode` (REALM's live index),
    # "frozen" (ORQA: built once), "none" (ICT, plain MLM: nothing is searched while training).
    index_mode: str | None = None

    def __init__(self, config: ml_collections.ConfigDict, mesh, corpus: BlockCorpus | None,
                 blocks: TokenizedBlocks | None, tokenizer: WordPiece | None):
        """corpus, blocks and tokenizer may be None for a task that only computes its loss
        (ahead-of-time compilation): `dataset`, `prepare` and `evaluate` need them."""
        self.config = config
        self.mesh = mesh
        self.rules = tuple(config.rules)
        self.cfg = defaults.model_config(config)
        self.corpus = corpus
        self.blocks = blocks
        self.tokenizer = tokenizer
        self.queries = query_runner(config, mesh, batch_size=max(config.eval.batch_size, 8))
        self.recall = GoldRecall(self)

    @abc.abstractmethod
    def dataset(self, seed: int) -> Any:
        """The grain IterDataset of host training batches."""

    @abc.abstractmethod
    def prepare(self, batch: dict[str, Any], params: PyTree, searcher: Searcher
                ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Host batch → (per-host device inputs as numpy, host metrics such as recall).

        Host metrics are means over this host's rows, with the same keys on every host (NaN
        where a host has nothing to measure): `train` averages them over hosts, a collective.
        """

    @abc.abstractmethod
    def input_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{name: (shape, dtype)} of the device inputs `prepare` builds, for a global batch of
        `batch_size` (all hosts' rows): the train step's input signature without any data."""

    def abstract_inputs(self, batch_size: int, num_blocks: int = 0
                        ) -> dict[str, jax.ShapeDtypeStruct]:
        """`device_inputs`' layout without data: arguments for `jax.jit(step).lower(...)`
        (ahead-of-time compilation, benchmarks/aot.py). `num_blocks`: the index size, for a
        task whose step reads the index on the devices (ORQA)."""
        return {k: jax.ShapeDtypeStruct(
                    shape, dtype, sharding=sharding.batch_sharding(self.mesh, len(shape),
                                                                   self.rules))
                for k, (shape, dtype) in self.input_shapes(batch_size).items()}

    def device_inputs(self, host_inputs: dict[str, Any], searcher: Searcher | None
                      ) -> dict[str, Any]:
        """The train step's inputs: `prepare`'s per-host arrays laid out over the mesh
        (`to_global`), plus what the step reads from arrays already on the devices (ORQA:
        the frozen index's table) instead of a host copy sent with every batch."""
        return to_global(host_inputs, self.mesh, self.rules)

    @abc.abstractmethod
    def loss(self, params: PyTree, inputs: dict[str, jax.Array], rng: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure: (scalar loss, scalar metrics) of one batch; differentiated w.r.t. params."""

    @abc.abstractmethod
    def evaluate(self, params: PyTree, searcher: Searcher | None, fresh: bool = False
                 ) -> dict[str, float]:
        """Held-out metrics on `config.eval.split` with the current index (None for a task
        without one); `fresh`: that index was embedded from these very `params`."""
