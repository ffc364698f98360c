"""ORQA fine-tuning (DESIGN §1): frozen block index, trained query tower, span reader.

Per batch of questions:
  host:   embed the questions with the current query tower → search the frozen index for the
          top S = searcher_beam_size blocks; mark which contain an answer string (a regular
          expression answer: the text it matches in them); join each question with its top
          R = reader_beam_size blocks and locate the answer spans;
  device: re-embed the questions (trainable), score them against the S frozen block embeddings
          (the retriever's logits; gathered from the index table already on the devices, so
          no [B, S, d] copy crosses from the host), read the top R with the span reader, and
          take ORQA's loss (retriever and reader marginal log-likelihoods).

Batched over questions: the released ORQA trains on one question per step; we do not copy
that limitation. Shapes: B batch, S searcher beam, R reader beam, L reader_len, A answer
occurrences kept per block, d embedding size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.data import loaders
from realm_jax.data.joins import answer_spans, blocks_with_answer, join_reader
from realm_jax.data.pipeline import mesh_shard, qa_dataset
from realm_jax.data.qa import answers_in
from realm_jax.models import Embedder, SpanReader
from realm_jax.models.losses import orqa_loss
from realm_jax.models.reader import correct_spans, orqa_logits, span_candidates
from realm_jax.retrieval import mips
from realm_jax.retrieval.searcher import Searcher
from realm_jax.tasks.common import PyTree, Task, retrieve_host_rows

MAX_ANSWER_SPANS = 8


class Orqa(Task):
    name = "orqa"
    towers = ("query_embedder", "reader")
    index_mode = "frozen"

    def __init__(self, *args):
        super().__init__(*args)
        c = self.config
        self.searcher_beam = int(c.orqa.searcher_beam_size)
        self.reader_beam = int(c.orqa.reader_beam_size)
        if not 1 <= self.reader_beam <= self.searcher_beam:
            raise ValueError(f"orqa.reader_beam_size={self.reader_beam} must be in "
                             f"[1, searcher_beam_size={self.searcher_beam}]")
        self.query_len = int(c.data.query_len)
        self.reader_len = int(c.data.reader_len)
        self.embedder = Embedder(self.cfg)
        self.reader = SpanReader(self.cfg)
        self._eval_qa = None

    def dataset(self, seed: int):
        c = self.config
        return qa_dataset(loaders.load_qa_split(c, "train"), self.tokenizer,
                          batch_size=c.train.batch_size, seed=seed, question_len=self.query_len,
                          shard=mesh_shard(self.mesh, self.rules))

    def prepare(self, batch, params, searcher: Searcher):
        s = min(self.searcher_beam, searcher.num_blocks)
        r = min(self.reader_beam, s)
        ids, _ = retrieve_host_rows(self.queries, params["query_embedder"], searcher,
                                    batch["question_ids"], batch["question_mask"],
                                    batch["question_types"], s)  # [B, S], best first
        regex = batch.get("is_regex", np.zeros(len(ids), bool))
        answers = [self.matched_strings(a, row) if rx else a
                   for a, row, rx in zip(batch["answers"], ids, regex, strict=True)]
        answer_ids = [self.tokenizer.tokenize(a) for a in answers]
        retrieval_correct = blocks_with_answer(self.blocks, ids, answer_ids)  # [B, S]
        reader = join_reader(batch["question_ids"], batch["question_len"], self.blocks,
                             ids[:, :r], self.reader_len)
        starts, ends, _ = answer_spans(reader.input_ids, reader.block_mask, answer_ids,
                                       MAX_ANSWER_SPANS)  # [B, R, A]
        inputs = {
            "question_ids": batch["question_ids"], "question_mask": batch["question_mask"],
            "question_types": batch["question_types"],
            "block_ids": ids.astype(np.int32),  # [B, S]: rows of the frozen table
            "retrieval_correct": retrieval_correct,
            "reader_ids": reader.input_ids, "reader_mask": reader.attention_mask,
            "reader_types": reader.token_type_ids, "block_mask": reader.block_mask,
            "gold_starts": starts, "gold_ends": ends,
        }
        host = {f"answer_recall_at_{s}": float(retrieval_correct.any(-1).mean()),
                f"answer_recall_at_{r}": float(retrieval_correct[:, :r].any(-1).mean())}
        return inputs, host

    def matched_strings(self, patterns: list[str], block_ids: np.ndarray) -> list[str]:
        """The text that regular-expression answers (CuratedTrec) match in the bodies of these
        blocks (`qa.answers_in`): what the retriever's targets and the reader's gold spans
        then look for, as for literal answers."""
        found = [m for b in block_ids if b >= 0
                 for m in answers_in(self.corpus[int(b)]["text"], patterns, is_regex=True)]
        return list(dict.fromkeys(found))

    def device_inputs(self, host_inputs, searcher: Searcher):
        return {**super().device_inputs(host_inputs, searcher),
                "block_table": searcher.device_table().table}  # [N_padded, d], row-sharded

    def abstract_inputs(self, batch_size: int, num_blocks: int = 0):
        """With the frozen table of `num_blocks` rows (at least the searcher beam), stored
        in `retrieval.table_dtype`."""
        rows = mips.padded_rows(max(num_blocks, self.searcher_beam), self.mesh, self.rules)
        dtype = mips.table_dtype(self.config.retrieval.table_dtype)
        return {**super().abstract_inputs(batch_size),
                "block_table": jax.ShapeDtypeStruct(
                    (rows, self.cfg.embedding_dim), dtype,
                    sharding=mips.table_sharding(self.mesh, self.rules))}

    def input_shapes(self, batch_size: int):
        """Assumes at least `searcher_beam_size` blocks (`prepare` clips S to the index)."""
        b, s, r, i32 = batch_size, self.searcher_beam, self.reader_beam, np.int32
        reader = (b, r, self.reader_len)
        shapes = {f"question_{f}": ((b, self.query_len), i32) for f in ("ids", "mask", "types")}
        shapes.update({f"reader_{f}": (reader, i32) for f in ("ids", "mask", "types")})
        shapes.update(block_ids=((b, s), i32), retrieval_correct=((b, s), np.bool_),
                      block_mask=(reader, i32), gold_starts=((b, r, MAX_ANSWER_SPANS), i32),
                      gold_ends=((b, r, MAX_ANSWER_SPANS), i32))
        return shapes

    def loss(self, params, inputs, rng):
        r_query, r_reader = jax.random.split(rng)
        x = inputs
        q = self.embedder.apply({"params": params["query_embedder"]}, x["question_ids"],
                                x["question_mask"], x["question_types"], deterministic=False,
                                rngs={"dropout": r_query})  # [B, d]
        block_emb = mips.sharded_gather_rows(x["block_table"], x["block_ids"], mesh=self.mesh,
                                             rules=self.rules)  # [B, S, d], frozen
        retrieval_logits = jnp.einsum("bd,bsd->bs", q, block_emb.astype(q.dtype))  # [B, S]
        r = x["reader_ids"].shape[1]
        span_logits = self.reader.apply(
            {"params": params["reader"]}, x["reader_ids"], x["reader_mask"], x["reader_types"],
            x["block_mask"], deterministic=False, rngs={"dropout": r_reader})  # [B, R, C]
        joint = orqa_logits(span_logits, retrieval_logits[:, :r])  # [B, R, C]
        starts, ends = span_candidates(x["reader_ids"].shape[-1], self.cfg.max_span_width)
        span_correct = correct_spans(starts, ends, x["gold_starts"], x["gold_ends"])
        loss, aux = orqa_loss(retrieval_logits, x["retrieval_correct"], joint, span_correct)
        b = joint.shape[0]
        best = jnp.argmax(joint.reshape(b, -1), axis=-1)
        metrics = {
            "retriever_loss": jnp.mean(aux["retriever_loss"]),
            "reader_loss": jnp.mean(aux["reader_loss"]),
            "train_span_accuracy": jnp.mean(
                jnp.take_along_axis(span_correct.reshape(b, -1), best[:, None], 1)),
        }
        return loss, metrics

    def evaluate(self, params: PyTree, searcher: Searcher, fresh: bool = False
                 ) -> dict[str, float]:
        """Exact match and answer recall@`eval.recall_k` on the eval split with the inference
        path: the same numbers, under the same keys, as `realm_jax.evaluate` on this run."""
        from realm_jax.evaluation import evaluate as evaluate_qa
        from realm_jax.inference import Realm

        c = self.config.eval
        qa = loaders.load_qa_split(self.config, c.split)
        realm = Realm(self.config, params, searcher, corpus=self.corpus, blocks=self.blocks,
                      tokenizer=self.tokenizer, mesh=self.mesh)
        metrics, _ = evaluate_qa(realm, qa, batch_size=c.batch_size, k=int(c.recall_k),
                                 max_examples=c.max_examples)
        return {k: float(v) for k, v in metrics.items() if np.isscalar(v)}
