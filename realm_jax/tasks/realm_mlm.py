"""REALM pre-training: retrieve with a stale index, re-embed the candidates, marginal MLM loss.

Per batch (DESIGN §1):
  host:   embed the masked queries with the current query tower → search the index for the top
          k − 1 + extra blocks → drop the query's own block (by uid) → prepend the null
          document, keep k → tokenise the k candidates and the k query+body joins;
  device: re-embed the query and the k candidates with the *current* parameters (so the
          document tower gets gradients through p(z|x) = softmax over the k), run the
          knowledge-augmented encoder on the joins, and take the marginal MLM loss.

Shapes: B batch, K = retrieval.k candidates (null first), Lq query_len, Lb block_len,
L = Lq + Lb joined length, M max_masks.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import multihost
from realm_jax.data import loaders
from realm_jax.data.joins import NULL_BLOCK, blocks_with_answer, join_mlm
from realm_jax.data.pipeline import PretrainBatcher, mesh_shard, pretrain_dataset, to_global
from realm_jax.models import Embedder, KnowledgeAugEncoder
from realm_jax.models.embedder import relevance_scores
from realm_jax.models.losses import (
    candidate_log_likelihood,
    inbatch_negative_scores,
    realm_loss,
)
from realm_jax.retrieval.searcher import Searcher
from realm_jax.tasks.common import (
    PyTree,
    Task,
    query_tower,
    recall_ks,
    retrieval_scale,
    retrieve_host_rows,
)


def masked_spans(positions: np.ndarray, labels: np.ndarray, weights: np.ndarray
                 ) -> list[list[list[int]]]:
    """Per row, [its masked wordpieces] when they are one contiguous run (the salient span),
    else [] (random-token masking has no span to look for): the "answer" of the `match`
    retriever loss, looked for in each candidate's body by `joins.blocks_with_answer` (the
    body is what the encoder reads of a block: REALM's join has no title).

    positions, labels, weights: [B, M], the masked wordpieces in order.
    """
    out: list[list[list[int]]] = []
    for pos, lab, w in zip(positions, labels, weights, strict=True):
        keep = w > 0
        contiguous = keep.any() and bool(np.all(np.diff(pos[keep]) == 1))
        out.append([lab[keep].tolist()] if contiguous else [])
    return out


class RealmMlm(Task):
    name = "realm_mlm"

    def __init__(self, *args: Any):
        super().__init__(*args)
        c = self.config
        self.towers = ("embedder", "encoder") if self.cfg.share_embedders else (
            "embedder", "query_embedder", "encoder")
        self.k = int(c.retrieval.k)
        if self.k < 2:
            raise ValueError(f"retrieval.k={self.k}: REALM needs the null document and at "
                             "least one retrieved block")
        # k - 1 retrieved blocks besides the null document, none of them the query's own block
        # (trivial retrieval): more than the corpus holds would pad with null documents.
        if self.corpus is not None and self.k > len(self.corpus):
            raise ValueError(f"retrieval.k={self.k} is larger than the corpus, which has "
                             f"{len(self.corpus)} blocks: set retrieval.k <= {len(self.corpus)}")
        self.fetch = self.k - 1 + int(c.retrieval.extra)
        self.query_len = int(c.data.query_len)
        self.block_len = int(c.data.block_len)
        self.join_len = self.query_len + self.block_len
        self.embedder = Embedder(self.cfg)
        self.encoder = KnowledgeAugEncoder(self.cfg)
        r = c.get("realm", {})  # resolved configs written before the section existed lack it
        self.score_scale = retrieval_scale(c)
        self.retriever_loss = r.get("retriever_loss", "marginal")
        self.teacher_temperature = float(r.get("teacher_temperature", 1.0))
        self.inbatch_negatives = bool(r.get("inbatch_negatives", False))
        if self.inbatch_negatives and self.retriever_loss == "marginal":
            raise ValueError('realm.inbatch_negatives needs realm.retriever_loss="pdist" or '
                             '"match": the marginal has no target for blocks it did not read')

    @functools.cached_property
    def hashes(self) -> np.ndarray:
        """[N] int64 uid hashes of the corpus blocks (trivial-retrieval check)."""
        return self.corpus.uids.hashes()

    # ------------------------------------------------------------------ host side
    def dataset(self, seed: int):
        c = self.config
        return pretrain_dataset(
            loaders.load_pretrain_sentences(c, self.corpus), self.tokenizer,
            batch_size=c.train.batch_size, seed=seed, query_len=self.query_len,
            max_masks=c.data.max_masks, masking=c.data.masking,
            shard=mesh_shard(self.mesh, self.rules))

    def candidates(self, batch, params, searcher: Searcher) -> np.ndarray:
        """[B, K] block ids: the null document, then the top K − 1 retrieved with the current
        query tower, trivial retrievals dropped."""
        fetch = min(self.fetch, searcher.num_blocks)
        ids, _ = retrieve_host_rows(self.queries, query_tower(params), searcher,
                                    batch["query_ids"], batch["query_mask"],
                                    batch["query_types"], fetch)  # [B, fetch]
        source = batch["source_block"]
        source_hash = np.where(source >= 0, self.hashes[np.maximum(source, 0)], 0)
        return realm_candidates(ids, source_hash, self.hashes, self.k)

    def prepare(self, batch, params, searcher: Searcher):
        cands = self.candidates(batch, params, searcher)  # [B, K]
        inputs = self.inputs(batch, cands)
        # The generated KB knows which block states the masked fact (−1: unknown). The key is
        # there on every host, NaN without gold blocks, so hosts can average it (Task.prepare).
        gold = batch["gold_blocks"]
        hit = (cands[:, 1:] == gold[:, None]).any(-1)[gold >= 0]
        host = {"gold_recall_at_k": float(hit.mean()) if hit.size else float("nan")}
        return inputs, host

    def inputs(self, batch, cands: np.ndarray) -> dict[str, np.ndarray]:
        """The device inputs of a batch with the candidates `cands` [B, K]."""
        b = cands.shape[0]
        enc = self.blocks.encode(cands.reshape(-1), self.block_len)
        join = join_mlm(batch["query_ids"], batch["query_len"], self.blocks, cands,
                        self.join_len)
        inputs = {
            "query_ids": batch["query_ids"], "query_mask": batch["query_mask"],
            "query_types": batch["query_types"],
            "cand_ids": enc.input_ids.reshape(b, self.k, -1),
            "cand_mask": enc.attention_mask.reshape(b, self.k, -1),
            "cand_types": enc.token_type_ids.reshape(b, self.k, -1),
            "join_ids": join.input_ids, "join_mask": join.attention_mask,
            "join_types": join.token_type_ids,
            "mlm_positions": batch["mlm_positions"], "mlm_labels": batch["mlm_labels"],
            "mlm_weights": batch["mlm_weights"], "cand_block": cands.astype(np.int32),
        }
        # The null document (and null padding) has no body, so it never matches.
        inputs["cand_match"] = blocks_with_answer(self.blocks, cands, masked_spans(
            batch["mlm_positions"], batch["mlm_labels"], batch["mlm_weights"]))
        return inputs

    def gold_candidates(self, cands: np.ndarray, gold: np.ndarray) -> np.ndarray:
        """[B, K]: `candidates` [B, K] with the gold block [B] second, after the null document,
        and the retrieved others after it (rows without a gold block, −1, as retrieved)."""
        cands = cands.copy()
        for row, g in zip(cands, gold, strict=True):
            if g >= 0:
                others = [c for c in row[1:] if c != g]
                row[1:] = [g, *others][: self.k - 1]
        return cands

    def input_shapes(self, batch_size: int):
        b, k, m, i32 = batch_size, self.k, int(self.config.data.max_masks), np.int32
        shapes = {}
        for prefix, shape in (("query", (b, self.query_len)), ("cand", (b, k, self.block_len)),
                              ("join", (b, k, self.join_len))):
            shapes.update({f"{prefix}_{f}": (shape, i32) for f in ("ids", "mask", "types")})
        shapes.update(mlm_positions=((b, m), i32), mlm_labels=((b, m), i32),
                      mlm_weights=((b, m), np.float32), cand_match=((b, k), np.bool_),
                      cand_block=((b, k), i32))
        return shapes

    # ------------------------------------------------------------------ device side
    def loss(self, params, inputs, rng):
        return self._forward(params, inputs, rng, deterministic=False)

    def _forward(self, params, inputs, rng, deterministic: bool):
        """(loss, metrics) of a batch; dropout only when not `deterministic` (training)."""
        r_query, r_cand, r_enc = jax.random.split(rng, 3)
        x = inputs
        q = self.embedder.apply({"params": query_tower(params)}, x["query_ids"], x["query_mask"],
                                x["query_types"], deterministic=deterministic,
                                rngs={"dropout": r_query})  # [B, d]
        z = self.embedder.apply({"params": params["embedder"]}, x["cand_ids"], x["cand_mask"],
                                x["cand_types"], deterministic=deterministic,
                                rngs={"dropout": r_cand})  # [B, K, d]
        retrieval_logits = relevance_scores(q, z) * self.score_scale  # [B, K]
        negatives = (inbatch_negative_scores(q, z, x["cand_block"], self.score_scale)
                     if self.inbatch_negatives else None)  # [B, B·K]
        mlm_logits = self.encoder.apply(
            {"params": params["encoder"]}, x["join_ids"], x["join_mask"], x["join_types"],
            x["mlm_positions"], deterministic=deterministic, rngs={"dropout": r_enc})
        loss, aux = realm_loss(mlm_logits, x["mlm_labels"], x["mlm_weights"], retrieval_logits,
                               self.config.train.mlm_variant, self.retriever_loss,
                               self.teacher_temperature, x["cand_match"], negatives)
        p_z = jax.nn.softmax(retrieval_logits, axis=-1)
        metrics = {
            "mlm_accuracy": aux["accuracy"],
            "retrieval_utility": jnp.mean(aux["retrieval_utility"]),
            "retriever_loss": aux["retriever_loss"],
            "p_null": jnp.mean(p_z[:, 0]),
            "p_top": jnp.mean(jnp.max(p_z, axis=-1)),
        }
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params: PyTree, searcher: Searcher, fresh: bool = False
                 ) -> dict[str, float]:
        """Held-out measures of what the retriever and the encoder learned (synthetic KB, or
        a config with QA data for recall):

        - `gold_recall_at_k`: gold-block recall@k of the eval split's questions against the
          live index (stale by up to a refresh interval);
        - `fresh_gold_recall_at_k` (`eval.fresh_index`): the same against an index of the
          current embedder — the live one if `fresh` (the caller knows it was embedded from
          these parameters), else re-embedded now — so retriever quality and staleness
          separate;
        - `heldout_retrieval_utility`, `heldout_mlm_accuracy` (synthetic KB): on the
          pre-training sentences of the eval split's entities, never trained on, retrieved
          with the live index: log p(y|x) − log p(y|x, null document) per masked token (the
          paper's App. D says it rises through pre-training);
        - `heldout_gold_gain`, `heldout_teacher_gold_first` (synthetic KB, the same
          sentences): whether the encoder *reads*, whatever the retriever finds. With the gold
          block put among the candidates (`gold_candidates`): log p(y|gold, x) − log p(y|null,
          x) per masked token, and the share of sentences whose gold block the encoder
          predicts best from, of the K − 1 real candidates — what the pdist teacher tells the
          retriever (chance: 1 / (K − 1)). Near 0 and near chance, the retriever's signal is
          noise whatever the loss (Guu et al. §3.4's cold start);
        - `heldout_fresh_gold_recall_at_k` (synthetic KB and `eval.fresh_index`, the same
          sentences, masked as REALM queries them): gold-block recall against the fresh index.
          What REALM teaches the retriever on its own task, beside what carries over to the
          questions (`fresh_gold_recall_at_k`): the two can move apart (README "a small BERT
          that reads": REALM raised it while the questions' recall@1 fell).
        """
        c = self.config.eval
        out: dict[str, float] = {}
        synthetic = loaders.is_synthetic(self.config)
        current_index = None
        if c.get("fresh_index", False) and (synthetic or self.recall.available()):
            # A fresh live index answers the same searches again: no re-embedding.
            current_index = searcher if fresh else self.recall.fresh_searcher(
                params["embedder"])
        if self.recall.available():
            live = self.recall.against(query_tower(params), searcher)
            out.update({f"gold_recall_at_{k}": v for k, v in live.items()})
            if current_index is not None:
                current = live if fresh else self.recall.against(query_tower(params),
                                                                 current_index)
                out.update({f"fresh_gold_recall_at_{k}": v for k, v in current.items()})
        if synthetic:
            out.update(self.heldout_utility(params, searcher))
            if current_index is not None:
                out.update({f"heldout_fresh_gold_recall_at_{k}": v for k, v in
                            self.heldout_recall(params, current_index).items()})
        return out

    @functools.cached_property
    def _heldout_batches(self) -> list[dict[str, Any]]:
        """This host's rows of fixed, masked held-out batches of `train.batch_size` rows:
        the first `eval.heldout_sentences` pre-training sentences of the eval split."""
        c = self.config
        source = loaders.synthetic_sentences(c, (c.eval.split,))
        b = int(c.train.batch_size)
        n = min(len(source), int(c.eval.get("heldout_sentences", 128))) // b * b
        shard = mesh_shard(self.mesh, self.rules)
        per_host = b // shard.shard_count
        batches = []
        for start in range(0, n, b):
            first = start + shard.shard_index * per_host
            batcher = PretrainBatcher(source, self.tokenizer, self.query_len,
                                      int(c.data.max_masks), c.data.masking, first_row=first)
            batches.append(batcher(np.arange(first, first + per_host),
                                   np.random.default_rng((c.seed, start))))
        return batches

    @functools.cached_property
    def _eval_step(self):
        def step(params, inputs):
            _, metrics = self._forward(params, inputs, jax.random.key(0), deterministic=True)
            return metrics

        return jax.jit(step)

    @functools.cached_property
    def _reading_step(self):
        def step(params, inputs):
            """Sums over the rows with a gold block (candidate 1, `has_gold` [B]): (gold −
            null) per-token log-likelihood, gold best of the real candidates, rows."""
            x, has_gold = inputs, inputs["has_gold"]
            logits = self.encoder.apply({"params": params["encoder"]}, x["join_ids"],
                                        x["join_mask"], x["join_types"], x["mlm_positions"],
                                        deterministic=True)
            ll = candidate_log_likelihood(logits, x["mlm_labels"], x["mlm_weights"])  # [B, K]
            first = (ll[:, 1] > jnp.max(ll[:, 2:], axis=-1) if self.k > 2
                     else jnp.ones_like(has_gold))
            return (jnp.sum((ll[:, 1] - ll[:, 0]) * has_gold), jnp.sum(first * has_gold),
                    jnp.sum(has_gold))

        return jax.jit(step)

    def heldout_utility(self, params: PyTree, searcher: Searcher) -> dict[str, float]:
        """Retrieval utility, MLM accuracy and the reading measures on held-out sentences
        (see `evaluate`)."""
        sums: dict[str, float] = {}
        gain = first = rows = 0.0
        batches = self._heldout_batches
        for batch in batches:
            cands = self.candidates(batch, params, searcher)  # one search for both measures
            inputs = self.inputs(batch, cands)
            metrics = jax.device_get(self._eval_step(params, to_global(inputs, self.mesh,
                                                                       self.rules)))
            for k in ("retrieval_utility", "mlm_accuracy"):
                sums[k] = sums.get(k, 0.0) + float(metrics[k]) / len(batches)
            gold = self.inputs(batch, self.gold_candidates(cands, batch["gold_blocks"]))
            gold["has_gold"] = (batch["gold_blocks"] >= 0).astype(np.float32)
            g, f, n = jax.device_get(self._reading_step(
                params, to_global(gold, self.mesh, self.rules)))
            gain, first, rows = gain + float(g), first + float(f), rows + float(n)
        out = {f"heldout_{k}": v for k, v in sums.items()}
        if rows:
            out.update(heldout_gold_gain=gain / rows, heldout_teacher_gold_first=first / rows)
        return out

    def heldout_recall(self, params: PyTree, searcher: Searcher) -> dict[int, float]:
        """{k: gold-block recall@k} (`recall_ks`) of the held-out sentences (`evaluate`),
        queried as REALM queries them (masked), in `searcher`; the sums of every host's rows."""
        ks = recall_ks(self.config)
        hits, rows = np.zeros(len(ks)), 0.0
        for batch in self._heldout_batches:
            ids, _ = retrieve_host_rows(self.queries, query_tower(params), searcher,
                                        batch["query_ids"], batch["query_mask"],
                                        batch["query_types"], min(max(ks), searcher.num_blocks))
            gold = batch["gold_blocks"]  # [b]
            keep = gold >= 0
            rank = np.where(ids[keep] == gold[keep, None], np.arange(ids.shape[1]),
                            ids.shape[1]).min(-1)  # [kept]
            hits += [(rank < k).sum() for k in ks]
            rows += keep.sum()
        totals = np.asarray(multihost.gather(np.array([[*hits, rows]], np.float64))).sum(0)
        if not totals[-1]:
            return {}
        return {k: float(totals[i] / totals[-1]) for i, k in enumerate(ks)}


def realm_candidates(
    ids: np.ndarray, source_hashes: np.ndarray, block_hashes: np.ndarray, k: int
) -> np.ndarray:
    """Raw search results → the k candidates of a pre-training step, null document first.

    Prohibits trivial retrievals (DESIGN §1): a retrieved block whose uid equals the query's
    source block's uid is dropped (comparing uids, not indices, also drops duplicates of it).

    Args:
      ids: [B, k - 1 + extra] search results, best first.
      source_hashes: [B] int64 uid hash of each query's own block (`Uids.hashes()`), or any
        value not in `block_hashes` (e.g. 0) when the query has no source block.
      block_hashes: [N] int64 uid hashes of the corpus.
      k: candidates kept, including the null document.

    Returns:
      [B, k] int32 block ids; column 0 is `NULL_BLOCK` (−1). If fewer than k − 1 results
      survive, the row is padded with further null documents, which the marginal treats
      as ordinary (uninformative) candidates.
    """
    ids = np.asarray(ids, np.int64)
    b = ids.shape[0]
    trivial = block_hashes[ids] == np.asarray(source_hashes, np.int64)[:, None]  # [B, R]
    # Stable sort on the drop flag keeps the search order among the survivors.
    order = np.argsort(trivial, axis=1, kind="stable")
    kept = np.take_along_axis(ids, order, 1)
    kept = np.where(np.take_along_axis(trivial, order, 1), NULL_BLOCK, kept)[:, : k - 1]
    if kept.shape[1] < k - 1:
        kept = np.pad(kept, ((0, 0), (0, k - 1 - kept.shape[1])), constant_values=NULL_BLOCK)
    return np.concatenate([np.full((b, 1), NULL_BLOCK), kept], axis=1).astype(np.int32)
