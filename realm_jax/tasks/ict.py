"""The Inverse Cloze Task (Lee et al. 2019, ORQA §5): the retriever's warm start for REALM.

Per batch (data/ict.py builds the pairs):
  host:   one block per row; a random sentence of its body is the query, removed from the
          block with probability `ict.mask_rate`; nothing is searched (no index);
  device: the ONE shared embedder embeds the B queries and the B blocks; every query scores
          every block of the global batch, logits = q @ z.T [B, B], and the loss is softmax
          cross-entropy with the diagonal as the label — the other rows' blocks are the
          negatives. A block that appears in two rows is masked out of the other row's
          negatives (it is that row's positive too, not evidence against it).

The logits span the whole global batch: the train step runs on global jax Arrays under jit, so
XLA gathers the block embeddings across devices (and hosts) as the released code concatenates
them across TPU cores — more negatives than one shard's.

The workdir's `embedder` is REALM's `init.embedder_path` (checkpoints.load_pretrained).
Shapes: B global batch, Lq query_len, Lb block_len, d embedding size.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.data.ict import ict_dataset, nonempty_blocks
from realm_jax.data.pipeline import mesh_shard
from realm_jax.models import Embedder
from realm_jax.retrieval.searcher import Searcher
from realm_jax.tasks.common import PyTree, Task, retrieval_scale

# The score of a masked (duplicate) negative: exp() of it is 0 in float32, and unlike -inf it
# keeps every intermediate of the softmax and its gradient finite.
MASKED_LOGIT = -1e9


def in_batch_loss(q: jax.Array, z: jax.Array, block_index: jax.Array, scale: float = 1.0
                  ) -> tuple[jax.Array, jax.Array]:
    """ICT's in-batch softmax: query i's positive is block i, the others are its negatives.

    Args:
      q: [B, d] query embeddings.
      z: [B, d] block embeddings, row i the block query i was drawn from.
      block_index: [B] corpus index of each row's block; rows j ≠ i with the same index as row
        i are not negatives of query i (masked out of its softmax).
      scale: the factor on q·z (`losses.score_scale`, the same as REALM's retriever scores).
    Returns:
      (mean cross-entropy [], in-batch accuracy [] = mean of argmax_j logits[i, j] == i).
    """
    logits = jnp.einsum("id,jd->ij", q, z) * scale  # [B, B]
    b = logits.shape[0]
    diagonal = jnp.eye(b, dtype=bool)
    duplicate = (block_index[:, None] == block_index[None, :]) & ~diagonal
    logits = jnp.where(duplicate, MASKED_LOGIT, logits)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.diagonal(log_p))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(b))
    return loss, accuracy


class Ict(Task):
    name = "ict"
    towers = ("embedder",)
    index_mode = "none"  # the train step searches nothing; evaluation builds its own index

    def __init__(self, *args: Any):
        super().__init__(*args)
        c = self.config
        self.query_len = int(c.data.query_len)
        self.block_len = int(c.data.block_len)
        self.mask_rate = float(c.ict.mask_rate)
        self.embedder = Embedder(self.cfg)
        # One scale for the retriever's scores, in ICT as in REALM (realm.score_scale): with
        # 128-d LayerNorm'd vectors raw in-batch logits start at ±tens of nats, and a random
        # 2-layer BERT's ICT stayed at chance accuracy for 400 steps (loss above log B).
        self.score_scale = retrieval_scale(c)

    @functools.cached_property
    def drawable(self) -> np.ndarray:
        """[n] corpus indices of the blocks with a body: the only ones ICT can ask about."""
        return nonempty_blocks(self.blocks)

    # ------------------------------------------------------------------ host side
    def dataset(self, seed: int):
        c = self.config
        return ict_dataset(self.corpus, self.tokenizer, self.drawable,
                           batch_size=c.train.batch_size, seed=seed, query_len=self.query_len,
                           block_len=self.block_len, mask_rate=self.mask_rate,
                           shard=mesh_shard(self.mesh, self.rules))

    def prepare(self, batch, params, searcher: Searcher | None):
        """The batch is already the step's input: ICT retrieves nothing on the host."""
        del params, searcher
        inputs = {k: batch[k] for k in self.input_shapes(0)}
        # Rows of this host whose query sentence left the block (≈ mask_rate): a check that the
        # run trains on the task it was configured for.
        host = {"removed_fraction": float(np.mean(batch["removed"]))}
        return inputs, host

    def input_shapes(self, batch_size: int):
        b, i32 = batch_size, np.int32
        shapes = {}
        for prefix, length in (("query", self.query_len), ("block", self.block_len)):
            shapes.update({f"{prefix}_{f}": ((b, length), i32) for f in ("ids", "mask", "types")})
        shapes["block_index"] = ((b,), i32)
        return shapes

    # ------------------------------------------------------------------ device side
    def loss(self, params, inputs, rng):
        r_query, r_block = jax.random.split(rng)
        x = inputs
        embed = functools.partial(self.embedder.apply, {"params": params["embedder"]},
                                  deterministic=False)
        q = embed(x["query_ids"], x["query_mask"], x["query_types"],
                  rngs={"dropout": r_query})  # [B, d]
        z = embed(x["block_ids"], x["block_mask"], x["block_types"],
                  rngs={"dropout": r_block})  # [B, d]
        loss, accuracy = in_batch_loss(q, z, x["block_index"], self.score_scale)
        return loss, {"ict_accuracy": accuracy}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params: PyTree, searcher: Searcher | None, fresh: bool = False
                 ) -> dict[str, float]:
        """Gold-block recall@k of the eval split's questions against a FRESH exact index of the
        current embedder (ICT keeps no index while training; `searcher` is None).

        Only where questions carry gold blocks (the generated KB): real QA sets have none, and
        re-embedding a whole corpus to measure nothing would be waste.
        """
        del searcher, fresh
        if not self.recall.available():
            return {}
        recall = self.recall.fresh(params["embedder"], params["embedder"])
        return {f"fresh_gold_recall_at_{k}": v for k, v in recall.items()}
