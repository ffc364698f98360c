"""A task ready to `prepare` batches without training: for tests of what a task feeds."""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from realm_jax import defaults, initialize, sharding
from realm_jax.data.joins import tokenize_corpus
from realm_jax.data.loaders import load_corpus, load_tokenizer
from realm_jax.retrieval import mips, store
from realm_jax.retrieval.searcher import Searcher
from realm_jax.tasks import make_task


def task_with_random_index(config: Any, mesh: Any, index_dir: str, seed: int = 0
                           ) -> tuple[Any, dict[str, Any], Searcher]:
    """(task, freshly initialised params, a searcher over random block embeddings): every
    host-side path of `Task.prepare` runs, whatever it retrieves."""
    tok, corpus = load_tokenizer(config), load_corpus(config)
    task = make_task(config, mesh, corpus, tokenize_corpus(corpus, tok), tok)
    params, _ = initialize.init_towers(defaults.model_config(config), task.towers, mesh)
    d = defaults.model_config(config).embedding_dim
    table = np.random.default_rng(seed).normal(size=(len(corpus), d)).astype(np.float32)
    version = store.IndexVersion(0, table, {}, epath.Path(index_dir))
    return task, params, Searcher(version, "exact", mips.ExactIndex.build(table, mesh), mesh)


def towers_of(config: Any) -> tuple[str, ...]:
    """The towers `config`'s task trains (its `Task.towers`, the one place that says so)."""
    return make_task(config, sharding.make_mesh(dict(config.mesh)), None, None, None).towers
