"""Plain BERT masked-LM (task=mlm): the knowledge-augmented encoder's warm start, no retrieval.

REALM's encoder starts from a BERT with an MLM head. MiniLM, our default weights, ships none,
so a REALM run from MiniLM starts with a random head and first has to learn masked-LM at all
before it can learn to read the retrieved blocks. This task trains the `encoder` tower
(`models.KnowledgeAugEncoder`, BERT + the tied MLM head) on masked text alone; its workdir is
then a REALM run's `init.path` (`initialize.pretrained_towers` grafts the encoder whole, head
included). Trained from BERT it is also the paper's "baseline encoder" row.

Per batch: host — nothing to retrieve (`index_mode = "none"`), the batch is `data.mlm`'s;
device — the encoder reads `[CLS] text [SEP]` as one candidate (K = 1) and the loss is the
mean cross-entropy over masked positions. Shapes: B batch, L max_len, M max_masks, V vocab.

Config (`defaults.base_config` `mlm`): source "corpus" | "sentences" | "reading" | "facts",
masking, max_len (0 = data.block_len), max_masks (0 = data.max_masks), eval_examples (0 =
eval.max_examples or 256).
Evaluation: the held-out MLM loss and accuracy on a fixed set of masked examples — on the
generated KB the pre-training sentences of the entities in `eval.split`, otherwise the last
blocks of the corpus (kept out of training when the source is the corpus).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import multihost, sharding
from realm_jax.data import loaders
from realm_jax.data import mlm as mlm_data
from realm_jax.data.examples import Sentences, corpus_sentences
from realm_jax.data.pipeline import mesh_shard
from realm_jax.models import KnowledgeAugEncoder
from realm_jax.models.losses import token_log_probs
from realm_jax.retrieval.searcher import Searcher
from realm_jax.tasks.common import PyTree, Task

Array = jax.Array
DEFAULT_EVAL_EXAMPLES = 256


def masked_lm_loss(mlm_logits: Array, labels: Array, weights: Array
                   ) -> tuple[Array, dict[str, Array]]:
    """Mean cross-entropy over the masked positions of a batch (BERT's MLM loss).

    Args:
      mlm_logits: [B, M, V] logits at the masked positions.
      labels: [B, M] original ids (any id where `weights` is 0).
      weights: [B, M] 1 for a real masked position, 0 for padding.

    Returns:
      (loss [], aux) with aux = {"accuracy": [] argmax accuracy over masked positions,
      "nll_sum", "correct_sum", "weight_sum": [] the sums behind both, for exact means over
      several batches}.
    """
    w = weights.astype(jnp.float32)
    logp = token_log_probs(mlm_logits[:, None], labels)[:, 0]  # [B, M], K = 1
    nll_sum = -jnp.sum(logp * w)
    correct_sum = jnp.sum((jnp.argmax(mlm_logits, -1) == labels) * w)
    weight_sum = jnp.sum(w)
    denom = jnp.maximum(weight_sum, 1.0)
    aux = {"accuracy": correct_sum / denom, "nll_sum": nll_sum, "correct_sum": correct_sum,
           "weight_sum": weight_sum}
    return nll_sum / denom, aux


class Mlm(Task):
    name = "mlm"
    towers = ("encoder",)
    index_mode = "none"

    def __init__(self, *args: Any):
        super().__init__(*args)
        c = self.config
        m = c.mlm
        if m.source not in mlm_data.SOURCES:
            raise ValueError(f"mlm.source={m.source!r}; accepted: {mlm_data.SOURCES}")
        self.source = str(m.source)
        self.masking = str(m.masking)
        self.max_len = int(m.max_len or c.data.block_len)
        self.max_masks = int(m.max_masks or c.data.max_masks)
        if self.max_len > self.cfg.bert.max_position_embeddings:
            raise ValueError(f"mlm.max_len={self.max_len} exceeds the model's "
                             f"{self.cfg.bert.max_position_embeddings} positions")
        self.encoder = KnowledgeAugEncoder(self.cfg)
        self._eval_batch: dict[str, np.ndarray] | None = None
        self._eval_fn = None

    # ------------------------------------------------------------------ data
    @property
    def num_eval(self) -> int:
        """How many held-out examples `evaluate` scores."""
        return int(self.config.mlm.eval_examples or self.config.eval.max_examples
                   or DEFAULT_EVAL_EXAMPLES)

    def _holds_out_corpus(self) -> bool:
        """Whether evaluation reads the corpus' last blocks (then training must not)."""
        return not loaders.is_synthetic(self.config)

    def dataset(self, seed: int):
        c = self.config
        num = None
        if self.source == "corpus":
            examples = self.corpus
            if self._holds_out_corpus():
                num = len(self.corpus) - min(self.num_eval, len(self.corpus) // 2)
        elif self.source == "reading":
            examples = Sentences.from_records(corpus_sentences(self.corpus))
        elif self.source == "facts":
            examples = self._fact_sentences(loaders.load_pretrain_sentences(c, self.corpus))
        else:
            examples = loaders.load_pretrain_sentences(c, self.corpus)
        return mlm_data.mlm_dataset(
            self.source, examples, self.tokenizer, batch_size=c.train.batch_size, seed=seed,
            blocks=self.blocks, num_examples=num, max_len=self.max_len,
            max_masks=self.max_masks, masking=self.masking, query_len=int(c.data.query_len),
            mask_rate=float(c.mlm.get("mask_rate", 0.15)),
            shard=mesh_shard(self.mesh, self.rules))

    @staticmethod
    def _fact_sentences(sentences: Any) -> Sentences:
        """The sentences that know the block holding their fact (source "facts")."""
        known = Sentences.from_records(r for r in (sentences[i] for i in range(len(sentences)))
                                       if r["gold_block"] >= 0)
        if not len(known):
            raise ValueError(f"mlm.source='facts': none of the {len(sentences)} pre-training "
                             "sentences knows its gold block (the generated KB's do; "
                             "data.sentences files may carry a gold_block field)")
        return known

    def prepare(self, batch, params, searcher: Searcher | None):
        del params, searcher  # nothing is retrieved
        return {k: batch[k] for k in mlm_data.DEVICE_KEYS}, {}

    def input_shapes(self, batch_size: int):
        b, length, m, i32 = batch_size, self.max_len, self.max_masks, np.int32
        return {"input_ids": ((b, length), i32), "input_mask": ((b, length), i32),
                "input_types": ((b, length), i32), "mlm_positions": ((b, m), i32),
                "mlm_labels": ((b, m), i32), "mlm_weights": ((b, m), np.float32)}

    # ------------------------------------------------------------------ device side
    def logits(self, encoder_params: PyTree, inputs: dict[str, Array],
               rng: Array | None = None) -> Array:
        """[B, M, V] MLM logits at the masked positions; dropout only when `rng` is given.

        The encoder's contract is [B, K, L] (a query joined with K candidates): plain MLM is
        one candidate, the text itself.
        """
        x = inputs
        kw = {"deterministic": True} if rng is None else {
            "deterministic": False, "rngs": {"dropout": rng}}
        out = self.encoder.apply({"params": encoder_params}, x["input_ids"][:, None],
                                 x["input_mask"][:, None], x["input_types"][:, None],
                                 x["mlm_positions"], **kw)  # [B, 1, M, V]
        return out[:, 0]

    def loss(self, params, inputs, rng):
        logits = self.logits(params["encoder"], inputs, rng)
        loss, aux = masked_lm_loss(logits, inputs["mlm_labels"], inputs["mlm_weights"])
        return loss, {"mlm_accuracy": aux["accuracy"]}

    # ------------------------------------------------------------------ evaluation
    def eval_batch(self) -> dict[str, np.ndarray]:
        """The fixed held-out examples (built once, the same masks at every evaluation)."""
        if self._eval_batch is not None:
            return self._eval_batch
        c = self.config
        kw = dict(max_len=self.max_len, max_masks=self.max_masks, masking=self.masking)
        if loaders.is_synthetic(c):
            pool = loaders.load_synthetic(c).sentences((c.eval.split,))
            if self.source == "facts":  # held-out people's facts, read from their blocks
                batcher = mlm_data.make_batcher("facts", pool, self.tokenizer, blocks=self.blocks,
                                                query_len=int(c.data.query_len), **kw)
            else:
                batcher = mlm_data.make_batcher("sentences", pool, self.tokenizer, **kw)
            indices = np.arange(min(self.num_eval, len(pool)))
        else:
            batcher = mlm_data.make_batcher("corpus", self.corpus, self.tokenizer,
                                            blocks=self.blocks, **kw)
            n = min(self.num_eval, len(self.corpus) // 2)
            indices = np.arange(len(self.corpus) - n, len(self.corpus))
        if not len(indices):
            raise ValueError(f"no held-out MLM examples for eval.split={c.eval.split!r}")
        batch = mlm_data.fixed_batch(batcher, indices, seed=c.seed)
        self._eval_batch = {k: batch[k] for k in mlm_data.DEVICE_KEYS}
        return self._eval_batch

    def evaluate(self, params: PyTree, searcher: Searcher | None, fresh: bool = False
                 ) -> dict[str, float]:
        """Held-out MLM loss and accuracy: token-weighted means over all eval examples."""
        del searcher, fresh
        if self._eval_fn is None:
            def sums(encoder_params, inputs):
                logits = self.logits(encoder_params, inputs)
                _, aux = masked_lm_loss(logits, inputs["mlm_labels"], inputs["mlm_weights"])
                return jnp.stack([aux["nll_sum"], aux["correct_sum"], aux["weight_sum"]])

            self._eval_fn = sharding.jit_sharded(sums, self.mesh, self.rules,
                                                 out_shardings=sharding.replicated(self.mesh))
        batch = self.eval_batch()
        shards = sharding.mesh_batch_size(self.mesh, self.rules)
        n = len(batch["input_ids"])
        # One shape for every call (one compilation): the last chunk is padded to full size
        # with weight-0 rows (mlm_weights pad with 0).
        size = -(-min(max(int(self.config.eval.batch_size), 1), n) // shards) * shards
        total = np.zeros(3, np.float64)
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            pad = size - (rows.stop - rows.start)
            placed = {k: multihost.put_global(
                          np.pad(v[rows], ((0, pad),) + ((0, 0),) * (v.ndim - 1)),
                          sharding.batch_sharding(self.mesh, v.ndim, self.rules))
                      for k, v in batch.items()}
            total += np.asarray(self._eval_fn(params["encoder"], placed), np.float64)
        nll, correct, weight = total
        weight = max(weight, 1.0)
        return {"eval_mlm_loss": float(nll / weight), "eval_mlm_accuracy": float(correct / weight)}
