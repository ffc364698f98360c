"""Answer questions with a REALM / ORQA model: retrieve evidence blocks, read them, point at the
answer span in the block's own text (DESIGN §1 "Prediction", §3).

    realm = Realm.load("WORKDIR")        # a training run, or a converted HF open-QA directory
    realm.answer("who wrote the origin of species?").text
    realm.retrieve(["q1", "q2"], k=5)    # per question: [Retrieved(block_id, title, text, score)]

What `answer` computes for a batch of B questions (R = orqa.reader_beam_size, L = data.reader_len):
  1. `[CLS] q [SEP]` of data.query_len wordpieces (a longer question is cut and flagged);
  2. the query tower → [B, d] (jitted, the batch sharded over the mesh);
  3. the top max(k, R) blocks of the index: exact on device, or ScaNN when the config asks;
  4. the retrieval logits q·e(z) of the R read blocks, recomputed exactly (ScaNN's are approximate);
  5. the reader joins `[CLS] q [SEP] body [SEP]` [B, R, L], gathered from the pre-tokenised corpus;
  6. the reader (jitted): span logits + retrieval logit, one argmax over every (block, span) —
     the prediction rule of the released ORQA code and of Hugging Face's RealmForOpenQA;
  7. the span's wordpieces → character offsets in the block text (the tokenizer's offsets), so
     the answer is a slice of the evidence, not wordpieces glued back together.

Shapes are few and fixed, so each jitted function compiles a handful of times at most: a batch
is padded to one of two sizes (the mesh's batch split for a single question, `batch_size`
otherwise), and questions and joins are cut to the batch's longest, rounded up to one of
`length_buckets` equal steps of data.query_len / data.reader_len (padding is compute: HF pads
to the longest join too). The compiled functions are cached per (model config, mesh, rules),
so a trainer that builds a new `Realm` for every evaluation reuses them.

On CPU the default `batch_size` holds about CPU_READER_TOKENS joined wordpieces per reader
call: bigger activations fall out of the caches and cost more per question (BERT-base: +30 %
per sequence from 5 to 40 sequences of 320), smaller calls pay the per-call overhead.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from realm_jax import defaults, embedding, initialize, model_dir, multihost, sharding
from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.joins import ReaderInputs, TokenizedBlocks, join_reader, tokenize_corpus
from realm_jax.data.loaders import load_corpus, load_tokenizer
from realm_jax.data.tokenizer import Encoded, WordPiece
from realm_jax.models import RealmModelConfig, SpanReader, orqa_logits, span_candidates
from realm_jax.retrieval import store
from realm_jax.retrieval.searcher import Searcher, open_searcher

log = logging.getLogger(__name__)
PyTree = Any
QUERY_TOWERS = model_dir.QUERY_TOWERS
TOKENIZED_CACHE = "tokenized"  # WORKDIR/tokenized/: the corpus's wordpieces, memory-mapped
# A span whose joint logit is below this was masked out (no block had a readable body).
_MASKED = -1e30
CPU_READER_TOKENS = 2048  # default reader work per call on CPU (module docstring)


class Retrieved(NamedTuple):
    """One retrieved block; unpacks as (block_id, title, text, score)."""

    block_id: int
    title: str
    text: str
    score: float  # relevance f(x, z) = Embed(x)·Embed(z)


@dataclasses.dataclass(frozen=True)
class Answer:
    """The predicted answer of one question and the evidence it comes from.

    `text == block_text[start_char:end_char]`. `decoded` is the span's wordpieces joined back
    (lower-cased, accents stripped for an uncased vocabulary): what Hugging Face's
    `RealmForOpenQA` returns. With `errors="return"`, an invalid question gets an Answer whose
    `error` says why and whose other fields are empty.
    """

    question: str
    text: str
    score: float  # joint logit: span logit + the block's retrieval logit
    probability: float  # softmax over every (block, span) pair of the reader beam
    block_id: int
    title: str
    block_text: str
    start_char: int
    end_char: int
    retrieval_score: float = 0.0
    block_rank: int = -1  # rank of the answer's block in the retrieval (0 = best)
    decoded: str = ""
    truncated: bool = False  # the question was cut to data.query_len wordpieces
    retrieved: tuple[Retrieved, ...] = ()  # the top-k blocks (k = the reader beam by default)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """A dict that strict JSON can hold: a score that is not a finite number (a rejected
        question has none) is None, written `null`, never `NaN`."""
        d = dataclasses.asdict(self)
        d["retrieved"] = [r._asdict() for r in self.retrieved]
        for key in ("score", "probability", "retrieval_score"):
            d[key] = _finite_or_none(d[key])
        for r in d["retrieved"]:
            r["score"] = _finite_or_none(r["score"])
        return d


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


@dataclasses.dataclass(frozen=True)
class ReaderOutput:
    """Everything the reader saw and scored, for analysis and parity tests.

    Shapes: B questions, R read blocks, L = data.reader_len, C span candidates.
    """

    block_ids: np.ndarray  # [B, R] int32, best first
    retrieval_logits: np.ndarray  # [B, R] float32
    span_logits: np.ndarray  # [B, R, C] float32; spans outside the body: most negative float
    starts: np.ndarray  # [C] int32 span starts in the joined sequence
    ends: np.ndarray  # [C] int32 inclusive ends
    inputs: ReaderInputs  # [B, R, L]


def _as_list(questions: str | Sequence[str]) -> tuple[list[str], bool]:
    if isinstance(questions, str):
        return [questions], True
    if isinstance(questions, bytes) or not isinstance(questions, Sequence):
        raise TypeError(f"questions must be a str or a sequence of str, got "
                        f"{type(questions).__name__}")
    return list(questions), False


def check_question(question: Any, where: str = "question") -> str:
    """The question itself, or a ValueError / TypeError saying what is wrong with it."""
    if not isinstance(question, str):
        raise TypeError(f"{where} must be a str, got {type(question).__name__}")
    if not question.strip():
        raise ValueError(f"{where} is empty or whitespace-only: nothing to answer")
    return question


# --------------------------------------------------------------------------- device functions


@functools.lru_cache(maxsize=8)
def _read_fn(cfg: RealmModelConfig, mesh, rules) -> Any:
    """The reader jitted for this model and mesh; cached so every Realm shares it (questions
    are embedded by `embedding.EmbedRunner`, whose function is cached likewise)."""
    reader = SpanReader(cfg)

    def read(params, ids, mask, types, block_mask, retrieval, with_logits):
        span = reader.apply({"params": params}, ids, mask, types, block_mask)  # [B, R, C]
        flat = orqa_logits(span, retrieval).reshape(span.shape[0], -1)  # [B, R*C]
        out = {"best": jnp.argmax(flat, axis=-1).astype(jnp.int32),
               "score": jnp.max(flat, axis=-1), "log_z": jax.nn.logsumexp(flat, axis=-1)}
        if with_logits:
            out["span_logits"] = span
        return out

    return sharding.jit_sharded(read, mesh, rules, out_shardings=sharding.replicated(mesh),
                                static_argnums=(6,))


@dataclasses.dataclass
class _Chunk:
    """One padded batch through the pipeline; every array is cut back to the real rows."""

    start: int
    enc: Encoded  # [m, Lq]
    ids: np.ndarray  # [m, kk] retrieved block ids
    scores: np.ndarray  # [m, kk]
    inputs: ReaderInputs | None = None  # [m, R, L]
    retrieval: np.ndarray | None = None  # [m, R]
    out: dict[str, np.ndarray] | None = None


# --------------------------------------------------------------------------- Realm


class Realm:
    """A REALM / ORQA model ready to answer: query tower, block index, corpus, reader.

    Args:
      config: the run's resolved config (data.query_len, data.reader_len,
        orqa.reader_beam_size, retrieval.*, eval.batch_size, model).
      params: {"query_embedder" or "embedder": tree, optionally "reader": tree}, on device or
        host; without a reader only `retrieve` works.
      searcher: the block index (`retrieval.searcher.open_searcher`).
      corpus, blocks, tokenizer: the blocks the index rows stand for, pre-tokenised
        (`joins.tokenize_corpus`), and the run's tokenizer.
      mesh: devices the jitted functions run on (the batch is split over its batch axes).
      batch_size: the padded size of multi-question batches, rounded up to a multiple of the
        mesh's batch split (default: config.eval.batch_size; on CPU, CPU_READER_TOKENS).
      length_buckets: question and join lengths are rounded up to this many equal steps of
        their maxima (1: always the full data.query_len / data.reader_len; default:
        data.length_buckets).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        params: Mapping[str, PyTree],
        searcher: Searcher,
        *,
        corpus: BlockCorpus,
        blocks: TokenizedBlocks,
        tokenizer: WordPiece,
        mesh,
        batch_size: int | None = None,
        length_buckets: int | None = None,
    ):
        self.config = config
        self.cfg = defaults.model_config(config)
        self.searcher, self.corpus, self.blocks = searcher, corpus, blocks
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = tuple(tuple(r) for r in config.rules)
        self.query_len = int(config.data.query_len)
        self.reader_len = int(config.data.reader_len)
        self.reader_beam = min(int(config.orqa.reader_beam_size), searcher.num_blocks)
        if not len(corpus) == len(blocks) == searcher.num_blocks:
            raise store.IndexStoreError(
                f"index {searcher.version.path} has {searcher.num_blocks} blocks, corpus "
                f"{corpus.description} {len(corpus)}, tokenized blocks {len(blocks)}: they "
                "must be the same corpus")
        if self.query_len + 1 + self.cfg.max_span_width > self.reader_len:
            raise ValueError(f"data.reader_len={self.reader_len} leaves no room for a block "
                             f"after a question of data.query_len={self.query_len}")
        self.min_batch = sharding.mesh_batch_size(mesh, self.rules)
        if batch_size is None:
            on_cpu = mesh.devices.flat[0].platform == "cpu"
            batch_size = (CPU_READER_TOKENS // (self.reader_beam * self.reader_len) if on_cpu
                          else int(config.eval.batch_size))
        self.batch_size = -(-max(int(batch_size), 1) // self.min_batch) * self.min_batch
        self._queries = embedding.query_runner(config, mesh, self.batch_size, length_buckets)
        self.length_buckets = self._queries.length_buckets
        self._read = _read_fn(self.cfg, mesh, self.rules)
        self._in2 = sharding.batch_sharding(mesh, 2, self.rules)
        self._in3 = sharding.batch_sharding(mesh, 3, self.rules)
        self.step = -1  # the checkpoint step `load` restored (−1: built from live params)
        self.set_params(params)

    def set_params(self, params: Mapping[str, PyTree]) -> None:
        """Swap in new parameters (e.g. the trainer's current ones); nothing recompiles."""
        tower = next((t for t in QUERY_TOWERS if t in params), None)
        if tower is None:
            raise ValueError(f"params hold towers {sorted(params)}; a query tower is needed: "
                             f"one of {QUERY_TOWERS}")
        self.query_tower = tower
        self.params = {t: self._on_device(t, p) for t, p in params.items()
                       if t in (tower, "reader")}

    def _on_device(self, tower: str, tree: PyTree) -> PyTree:
        """Host (numpy) params are placed once, sharded as training lays them out; passing
        them to the jitted functions as numpy would copy them on every call."""
        if all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)):
            return tree
        abstract = initialize.abstract_towers(self.cfg, [tower], self.mesh, self.rules)[tower]
        return sharding.shard_like(tree, jax.tree.map(lambda a: a.sharding, abstract))

    @property
    def has_reader(self) -> bool:
        return "reader" in self.params

    # ------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: epath.PathLike,
        step: int | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        mesh=None,
        batch_size: int | None = None,
    ) -> Realm:
        """A training workdir (its newest or given checkpoint, index and corpus) or a Hugging
        Face REALM open-QA directory converted by `python -m realm_jax.convert`.

        Args:
          path: the directory.
          step: checkpoint step (default: the newest). A converted directory has only step 0.
          overrides: dotted config keys applied to the saved config, e.g.
            {"retrieval.engine": "scann"}.
          mesh: devices to run on (default: the config's mesh, or all devices on the data
            axis when this machine has a different number of devices).
          batch_size: see `Realm`.

        Raises:
          FileNotFoundError / store.IndexStoreError / ValueError, naming the path at fault and
          the command that makes it.
        """
        root = epath.Path(path)
        kind = model_dir.detect(root)
        config = model_dir.resolve_paths(
            defaults.load_config(str(root / "config.json"), overrides), root)
        mesh = mesh if mesh is not None else model_dir.inference_mesh(config)
        tokenizer = load_tokenizer(config)
        corpus = load_corpus(config, tokenizer)
        if kind == "run":
            step, params = model_dir.restore_run(root, step, config, mesh)
        else:
            if step not in (None, 0):
                raise ValueError(f"{root} is a converted checkpoint: it has step 0 only")
            step, params = 0, model_dir.load_converted(root, config)
        version = model_dir.load_index(root, corpus, step, kind)
        searcher = open_searcher(version, config, mesh)
        cache = root / TOKENIZED_CACHE  # read if there; written only where we may write
        if not cache.exists() and not os.access(os.fspath(root), os.W_OK):
            cache = None
        blocks = tokenize_corpus(corpus, tokenizer, cache_dir=cache)
        log.info("loaded %s step %d: towers %s, index v%d (%d blocks, %s)", root, step,
                 sorted(params), version.step, version.num_blocks, searcher.engine)
        realm = cls(config, params, searcher, corpus=corpus, blocks=blocks, tokenizer=tokenizer,
                    mesh=mesh, batch_size=batch_size)
        realm.step = step
        return realm

    # ------------------------------------------------------------------------- public API

    def retrieve(
        self, questions: str | Sequence[str], k: int
    ) -> list[Retrieved] | list[list[Retrieved]]:
        """The top-k blocks of each question, best first: (block id, title, text, score).

        Raises ValueError for an empty question (naming its position in the batch).
        """
        qs, single = _as_list(questions)
        self._validate(qs, "raise")
        k = self._check_k(k)
        out: list[list[Retrieved]] = []
        for chunk in self._run(qs, k, read=False):
            out += self._retrieved(chunk.ids, chunk.scores)
        return out[0] if single else out

    def answer(
        self, questions: str | Sequence[str], *, k: int | None = None, errors: str = "raise"
    ) -> Answer | list[Answer]:
        """Answer each question with a span of one of its retrieved blocks (module docstring).

        Args:
          questions: one question or a list of them (answered in padded batches).
          k: how many retrieved blocks to attach to each Answer (`.retrieved`); the reader
            always reads the top `orqa.reader_beam_size`. Default: the reader beam.
          errors: "raise" (default): an empty / whitespace-only question raises ValueError
            before anything runs; "return": it gets an Answer with `.error` set and the other
            questions are answered.

        Returns:
          An Answer for a single string, else a list in input order.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors={errors!r}; accepted: 'raise', 'return'")
        qs, single = _as_list(questions)
        valid, answers = self._validate(qs, errors)
        k = self._check_k(self.reader_beam if k is None else k)  # k=0 is refused, not "unset"
        for chunk in self._run([qs[i] for i in valid], max(k, self.reader_beam), read=True):
            for j, a in enumerate(self._answers(chunk, [qs[i] for i in valid], k)):
                answers[valid[chunk.start + j]] = a
        return answers[0] if single else answers

    def read(self, questions: str | Sequence[str]) -> ReaderOutput:
        """The reader's inputs and span logits for each question's top R blocks (analysis)."""
        qs, _ = _as_list(questions)
        self._validate(qs, "raise")
        chunks = list(self._run(qs, self.reader_beam, read=True, with_logits=True))
        cat = lambda xs: np.concatenate(xs, axis=0)  # noqa: E731
        inputs = ReaderInputs(*(cat([getattr(c.inputs, f.name) for c in chunks])
                                for f in dataclasses.fields(ReaderInputs)))
        starts, ends = span_candidates(self.reader_len, self.cfg.max_span_width)
        return ReaderOutput(cat([c.ids[:, : self.reader_beam] for c in chunks]),
                            cat([c.retrieval for c in chunks]),
                            cat([c.out["span_logits"] for c in chunks]), starts, ends, inputs)

    # ------------------------------------------------------------------------- pipeline

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not (
                1 <= k <= self.searcher.num_blocks):
            raise ValueError(f"k={k!r} must be an int between 1 and the index size "
                             f"{self.searcher.num_blocks}")
        return int(k)

    def _validate(self, qs: list[str], errors: str) -> tuple[list[int], list[Answer | None]]:
        answers: list[Answer | None] = [None] * len(qs)
        valid = []
        for i, q in enumerate(qs):
            try:
                # A returned error sits at its question's position: no index needed there.
                check_question(q, f"question {i}" if errors == "raise" and len(qs) > 1
                               else "question")
                valid.append(i)
            except (TypeError, ValueError) as e:
                if errors == "raise":
                    raise
                answers[i] = Answer(question=q if isinstance(q, str) else repr(q), text="",
                                    score=float("nan"), probability=0.0, block_id=-1, title="",
                                    block_text="", start_char=-1, end_char=-1, error=str(e))
        return valid, answers

    def _sizes(self, n: int) -> Iterator[tuple[int, int, int]]:
        """(start, stop, padded size) of each batch: two fixed sizes, so two compilations."""
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            yield start, stop, self.min_batch if stop - start <= self.min_batch else self.batch_size

    def _run(self, qs: list[str], k: int, read: bool, with_logits: bool = False
             ) -> Iterator[_Chunk]:
        enc_all = self.tokenizer.encode_queries(qs, self.query_len)
        for i in np.flatnonzero(enc_all.truncated):
            log.warning("question %d is longer than data.query_len=%d wordpieces: truncated",
                        i, self.query_len)
        if read and not self.has_reader:
            raise ValueError(
                f"this model has no reader tower (towers: {sorted(self.params)}; a pre-training "
                "run): retrieve() works, answering needs an ORQA fine-tuned run (task=orqa)")
        if not qs:
            return
        q_params = self.params[self.query_tower]
        for start, stop, size in self._sizes(len(qs)):
            m = stop - start
            enc = Encoded(*(None if a is None else a[start:stop] for a in
                            (enc_all.input_ids, enc_all.attention_mask, enc_all.token_type_ids,
                             enc_all.truncated)))
            # [size, d]: padded rows are searched too, so search compiles once per size
            q = embedding.pad_rows(self._queries.embed(q_params, enc), size)
            ids, scores = self.searcher.search(q, k)  # padded rows too: one shape per size
            chunk = _Chunk(start, enc, ids[:m], scores[:m])
            if read:
                top = chunk.ids[:, : self.reader_beam]  # [m, R]
                chunk.retrieval = np.einsum("bd,brd->br", q[:m], self.searcher.embeddings_of(top))
                rin = join_reader(enc.input_ids, enc.lengths, self.blocks, top, self.reader_len)
                if not with_logits:  # `read` keeps the full length: one span layout for all
                    length = max(embedding.bucket_length(int(rin.attention_mask.sum(-1).max()),
                                                         self.reader_len, self.length_buckets),
                                 self.cfg.max_span_width)
                    rin = ReaderInputs(*(a[..., :length] for a in (
                        rin.input_ids, rin.attention_mask, rin.token_type_ids, rin.block_mask)),
                        truncated=rin.truncated)
                chunk.inputs = rin
                dev = [multihost.put_global(embedding.pad_rows(a, size), self._in3) for a in
                       (rin.input_ids, rin.attention_mask, rin.token_type_ids, rin.block_mask)]
                ret = multihost.put_global(embedding.pad_rows(chunk.retrieval, size), self._in2)
                out = self._read(self.params["reader"], *dev, ret, with_logits)
                chunk.out = {key: np.asarray(v)[:m] for key, v in out.items()}
            yield chunk

    def _records(self, ids: np.ndarray) -> dict[int, dict[str, Any]]:
        unique = sorted({int(i) for i in np.asarray(ids).ravel()})
        return dict(zip(unique, self.corpus.get_many(unique), strict=True))

    def _retrieved(self, ids: np.ndarray, scores: np.ndarray,
                   records: Mapping[int, dict[str, Any]] | None = None) -> list[list[Retrieved]]:
        records = records if records is not None else self._records(ids)
        return [[Retrieved(int(i), records[int(i)]["title"], records[int(i)]["text"], float(s))
                 for i, s in zip(row_ids, row_scores, strict=True)]
                for row_ids, row_scores in zip(ids, scores, strict=True)]

    def _answers(self, chunk: _Chunk, qs: list[str], k: int) -> list[Answer]:
        out, rin = chunk.out, chunk.inputs
        records = self._records(chunk.ids)  # [m, max(k, R)]: the read and the listed blocks
        retrieved = self._retrieved(chunk.ids[:, :k], chunk.scores[:, :k], records)
        starts, ends = span_candidates(rin.input_ids.shape[-1], self.cfg.max_span_width)
        num_spans = len(starts)
        qlens = chunk.enc.lengths
        answers = []
        for j in range(len(chunk.ids)):
            r, c = divmod(int(out["best"][j]), num_spans)
            block_id = int(chunk.ids[j, r])
            rec = records[block_id]
            score = float(out["score"][j])
            common = dict(question=qs[chunk.start + j], score=score, block_id=block_id,
                          title=rec["title"], block_text=rec["text"],
                          retrieval_score=float(chunk.retrieval[j, r]), block_rank=r,
                          truncated=bool(chunk.enc.truncated[j]),
                          retrieved=tuple(retrieved[j]),
                          probability=float(np.exp(score - out["log_z"][j])))
            if score < _MASKED:  # no readable span in any block (empty bodies)
                answers.append(Answer(text="", start_char=-1, end_char=-1, **common))
                continue
            s, e = int(starts[c]), int(ends[c])
            span_ids = rin.input_ids[j, r, s: e + 1]
            text, start_char, end_char = self._span_text(rec["text"], span_ids,
                                                         s - int(qlens[j]), e - int(qlens[j]))
            answers.append(Answer(text=text, start_char=start_char, end_char=end_char,
                                  decoded=self.tokenizer.decode(span_ids.tolist()), **common))
        return answers

    def _span_text(self, text: str, span_ids: np.ndarray, first: int, last: int
                   ) -> tuple[str, int, int]:
        """Body wordpieces [first, last] → (text slice, start char, end char)."""
        ids, offsets = self.tokenizer.tokenize_with_offsets([text])[0]
        if ids[first: last + 1] != span_ids.tolist():
            # Only a tokenized cache from another tokenizer could get here: say so, keep going.
            log.warning("block wordpieces differ from the tokenizer's for this text; answering "
                        "with the decoded wordpieces (is %s stale?)", TOKENIZED_CACHE)
            return self.tokenizer.decode(span_ids.tolist()), -1, -1
        start, end = offsets[first][0], offsets[last][1]
        return text[start:end], start, end
