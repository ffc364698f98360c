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

from realm_jax.data import loaders
from realm_jax.data.joins import join_mlm
from realm_jax.data.pipeline import mesh_shard, pretrain_dataset
from realm_jax.models import Embedder, KnowledgeAugEncoder
from realm_jax.models.embedder import relevance_scores
from realm_jax.models.losses import marginal_mlm_loss
from realm_jax.retrieval.searcher import Searcher, realm_candidates
from realm_jax.tasks.common import PyTree, Task, gold_recall, query_tower, search_host_rows


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
        self.fetch = self.k - 1 + int(c.retrieval.extra)
        self.query_len = int(c.data.query_len)
        self.block_len = int(c.data.block_len)
        self.join_len = self.query_len + self.block_len
        self.embedder = Embedder(self.cfg)
        self.encoder = KnowledgeAugEncoder(self.cfg)
        self._eval_qa = None

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

    def prepare(self, batch, params, searcher: Searcher):
        fetch = min(self.fetch, searcher.num_blocks)
        q = self.queries.embed_host_rows(query_tower(params), batch["query_ids"],
                                         batch["query_mask"], batch["query_types"])
        ids, _ = search_host_rows(searcher, q, fetch)  # [B, fetch]
        source = batch["source_block"]
        source_hash = np.where(source >= 0, self.hashes[np.maximum(source, 0)], 0)
        cands = realm_candidates(ids, source_hash, self.hashes, self.k)  # [B, K]
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
            "mlm_weights": batch["mlm_weights"],
        }
        # The generated KB knows which block states the masked fact (−1: unknown). The key is
        # there on every host, NaN without gold blocks, so hosts can average it (Task.prepare).
        gold = batch["gold_blocks"]
        hit = (cands[:, 1:] == gold[:, None]).any(-1)[gold >= 0]
        host = {"gold_recall_at_k": float(hit.mean()) if hit.size else float("nan")}
        return inputs, host

    def input_shapes(self, batch_size: int):
        b, k, m, i32 = batch_size, self.k, int(self.config.data.max_masks), np.int32
        shapes = {}
        for prefix, shape in (("query", (b, self.query_len)), ("cand", (b, k, self.block_len)),
                              ("join", (b, k, self.join_len))):
            shapes.update({f"{prefix}_{f}": (shape, i32) for f in ("ids", "mask", "types")})
        shapes.update(mlm_positions=((b, m), i32), mlm_labels=((b, m), i32),
                      mlm_weights=((b, m), np.float32))
        return shapes

    # ------------------------------------------------------------------ device side
    def loss(self, params, inputs, rng):
        r_query, r_cand, r_enc = jax.random.split(rng, 3)
        x = inputs
        q = self.embedder.apply({"params": query_tower(params)}, x["query_ids"], x["query_mask"],
                                x["query_types"], deterministic=False,
                                rngs={"dropout": r_query})  # [B, d]
        z = self.embedder.apply({"params": params["embedder"]}, x["cand_ids"], x["cand_mask"],
                                x["cand_types"], deterministic=False,
                                rngs={"dropout": r_cand})  # [B, K, d]
        retrieval_logits = relevance_scores(q, z)  # [B, K]
        mlm_logits = self.encoder.apply(
            {"params": params["encoder"]}, x["join_ids"], x["join_mask"], x["join_types"],
            x["mlm_positions"], deterministic=False, rngs={"dropout": r_enc})  # [B, K, M, V]
        loss, aux = marginal_mlm_loss(mlm_logits, x["mlm_labels"], x["mlm_weights"],
                                      retrieval_logits, self.config.train.mlm_variant)
        p_z = jax.nn.softmax(retrieval_logits, axis=-1)
        metrics = {
            "mlm_accuracy": aux["accuracy"],
            "retrieval_utility": jnp.mean(aux["retrieval_utility"]),
            "p_null": jnp.mean(p_z[:, 0]),
            "p_top": jnp.mean(jnp.max(p_z, axis=-1)),
        }
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params: PyTree, searcher: Searcher) -> dict[str, float]:
        """Gold-block recall@k of the eval split's questions against the current index."""
        c = self.config.eval
        if not loaders.is_synthetic(self.config) and not self.config.data.get("qa", ""):
            return {}
        if self._eval_qa is None:
            qa = loaders.load_qa_split(self.config, c.split)
            n = len(qa) if not c.max_examples else min(len(qa), c.max_examples)
            rows = [qa[i] for i in range(n)]
            self._eval_qa = ([r["question"] for r in rows],
                             np.array([r.get("gold_block", -1) for r in rows], np.int32))
        questions, gold = self._eval_qa
        recall = gold_recall(self.queries, query_tower(params), searcher, self.tokenizer,
                             questions, gold, c.recall_k, self.query_len)
        return {f"gold_recall_at_{c.recall_k}": recall}
