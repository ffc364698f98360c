"""The asynchronous index refresher: newest embedder checkpoint → block embeddings → index.

REALM's index goes stale as the embedder trains; the paper re-embedded 13M blocks on 16 extra
TPUs about every 500 steps while 64 TPUs trained. This process is that job (DESIGN §4):

  1. cold start: before any checkpoint exists, embed the corpus with the initial (pretrained)
     embedder — the same parameters training starts from (`initialize.initial_params`) — and
     publish it as version 0, so training has an index at step 0;
  2. for each new checkpoint (`checkpoints_iterator` over WORKDIR/checkpoints): restore only the
     embedder (a partial orbax restore), embed every block in sharded jitted batches, build the
     ScaNN index if the config asks for it, and publish through `retrieval.store`.

A checkpoint that vanishes or is unreadable mid-restore is skipped (the next one supersedes it);
a kill at any moment leaves `LATEST` naming a complete version, because `store.publish` only
moves `LATEST` after the new version is fully on disk.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from realm_jax import (
    defaults,
    initialize,
    multihost,
    restore,
    run_checkpoints,
    sharding,
    workdir_lock,
)
from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.joins import TokenizedBlocks, tokenize_corpus
from realm_jax.data.loaders import load_corpus, load_tokenizer
from realm_jax.embedding import block_runner
from realm_jax.retrieval import store

log = logging.getLogger(__name__)


def _scann_config(config: ml_collections.ConfigDict):
    from realm_jax.retrieval.scann_index import ScannConfig

    s = config.retrieval.scann
    return ScannConfig(
        num_leaves=s.num_leaves or None, num_leaves_to_search=s.num_leaves_to_search or None,
        reorder_k=s.reorder_k, parallel_search=s.parallel,
    )


def publish_index(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    step: int,
    embeddings: np.ndarray,
    corpus_fp: str,
) -> epath.Path:
    """Build the configured index over `embeddings` and publish it as version `step`."""
    write_extra = None
    if config.retrieval.engine == "scann":
        from realm_jax.retrieval.scann_index import ScannIndex

        index = ScannIndex.build(embeddings, _scann_config(config))
        write_extra = lambda d: index.save(d / "scann")  # noqa: E731
    elif config.retrieval.engine != "exact":
        raise ValueError(f"retrieval.engine={config.retrieval.engine!r}; accepted: exact, scann")
    meta = {
        "checkpoint_step": int(step),
        "corpus_fingerprint": corpus_fp,
        "engine": config.retrieval.engine,
        "model": json.dumps(config.model.to_dict(), sort_keys=True),
    }
    t0 = time.time()
    try:
        path = store.publish(workdir, step, embeddings, meta, keep=config.refresh.keep,
                             write_extra=write_extra)
    except store.LatestAhead as e:  # name a concurrent refresher only if a lock shows one
        other = workdir_lock.other_holder(workdir_lock.refresher_lock(workdir))
        if other is None:
            raise
        raise store.LatestAhead(f"{e}; another refresher publishes into this index: "
                                f"{other}") from None
    log.info("published %s in %.1fs", path, time.time() - t0)
    return path


class Refresher:
    """Keeps WORKDIR/index up to date with WORKDIR/checkpoints. See the module docstring."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: epath.PathLike,
        corpus: BlockCorpus | None = None, progress: bool = True,
        blocks: TokenizedBlocks | None = None,
    ):
        """`corpus` and its tokenisation `blocks`: the trainer's own (sync mode), so a run
        tokenises its corpus once; loaded from the config when not given."""
        if blocks is not None and corpus is None:
            raise ValueError("Refresher: `blocks` given without the `corpus` they tokenise")
        self.config = config
        self.workdir = run_checkpoints.absolute(workdir)
        self.mesh = sharding.make_mesh(dict(config.mesh))
        tokenizer = load_tokenizer(config)
        self.corpus = load_corpus(config, tokenizer) if corpus is None else corpus
        self.corpus_fp = self.corpus.fingerprint
        self.blocks = tokenize_corpus(self.corpus, tokenizer) if blocks is None else blocks
        self.embedder = block_runner(config, self.mesh)
        # The restore target (shapes + shardings) depends only on the config: build it once.
        self._abstract = initialize.abstract_towers(
            defaults.model_config(config), ["embedder"], self.mesh, tuple(config.rules))
        self.progress = progress
        self.published: list[int] = []

    def refresh_with(self, step: int, params: Any) -> None:
        """Embed the corpus with embedder `params` and publish it as version `step` (the
        trainer's sync mode calls this in-process).

        On several hosts every host embeds (a collective: each device its rows of every batch,
        gathered everywhere), the primary alone publishes (one writer per store, DESIGN §4),
        and all return only once the version is on disk, so each may load it at once.
        """
        embeddings = self.embedder.embed_blocks(params, self.blocks, console=self.progress)
        if multihost.is_primary():
            publish_index(self.config, self.workdir, step, embeddings, self.corpus_fp)
        multihost.barrier(f"realm_index_published_v{step}")
        self.published.append(step)

    def cold_start(self) -> bool:
        """Publish version 0 from the initial embedder if no index exists yet."""
        # The primary's view decides: embedding is a collective that all hosts enter or none.
        if multihost.agree(store.latest_step(self.workdir) is not None):
            return False
        params, _ = initialize.initial_params(self.config, ["embedder"], self.mesh)
        self.refresh_with(0, params["embedder"])
        return True

    def refresh_step(self, step: int) -> bool:
        """Re-embed with checkpoint `step`'s embedder; False (logged) if it cannot be read."""
        latest = multihost.agree(store.latest_step(self.workdir))
        if latest is not None and step <= latest:
            return False
        params, error = None, None
        with restore.reading(self.workdir) as manager:
            try:
                params = restore.read_towers(manager, step, self._abstract)[1]["embedder"]
            except Exception as e:  # noqa: BLE001  deleted / half-written: the next supersedes
                error = f"{type(e).__name__}: {e}"
        # Hosts go on to embed (a collective) only if every one of them restored the step.
        failed = multihost.gather(np.array([error is not None]))
        if failed.any():
            log.warning("skipping checkpoint %d: %s", step,
                        error or f"hosts {np.flatnonzero(failed).tolist()} could not read it")
            return False
        self.refresh_with(step, params)
        return True

    def newest_checkpoint(self) -> int | None:
        """The newest checkpoint step as the primary sees it (the same on every host)."""
        with restore.reading(self.workdir) as manager:
            return multihost.agree(manager.latest_step())

    def run(self, once: bool = False, timeout_s: float | None = None) -> list[int]:
        """Cold start if needed, then follow checkpoints (`once`: only the newest, then return).

        Returns the steps published by this call.

        Raises:
          workdir_lock.WorkdirBusy: another refresher publishes into this index (named).
        """
        # One refresher per index (WORKDIR/index/.refresher.lock, not the trainer's lock).
        with workdir_lock.hold(workdir_lock.refresher_lock(self.workdir), "refresher"):
            return self._run(once, timeout_s)

    def _run(self, once: bool, timeout_s: float | None) -> list[int]:
        from orbax.checkpoint import checkpoint_utils

        self.cold_start()
        if once:
            step = self.newest_checkpoint()
            if step is not None:
                self.refresh_step(step)
            return list(self.published)
        ckpt_dir = run_checkpoints.checkpoint_dir(self.workdir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # Multi-host: orbax's iterator polls on the primary and broadcasts, so every host gets
        # the same steps and the same timeout.
        for step in checkpoint_utils.checkpoints_iterator(
            ckpt_dir, timeout=timeout_s, seconds_to_sleep=1
        ):
            newest = self.newest_checkpoint()  # skip intermediate steps we have fallen behind on
            self.refresh_step(newest if newest is not None and newest > step else step)
        return list(self.published)
