"""Pre-tokenised blocks and the vectorised joins of a query with its retrieved candidates.

Tokenising a block once (`tokenize_corpus`) and gathering its ids per step is what keeps the
trainer's host work small: a join of B queries × K candidates is a handful of numpy gathers,
no Python loop over rows. Block index −1 is the null document (empty title and body).

Shapes: B = batch, K = candidates, Lq = query length, L = joined length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from realm_jax.data.tokenizer import Encoded, body_budget, pack_rows, title_budget

NULL_BLOCK = -1


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Rows of different lengths: row i is `flat[offsets[i]:offsets[i + 1]]`."""

    flat: np.ndarray  # [T] token ids (uint16 when the vocabulary fits, else int32)
    offsets: np.ndarray  # [N + 1] int64

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], dtype: Any = np.int32) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = (np.concatenate([np.asarray(r, dtype) for r in rows if len(r)])
                if offsets[-1] else np.zeros(0, dtype))
        return cls(flat.astype(dtype), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]: self.offsets[i + 1]]

    def gather(self, ids: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows `ids` [...] (−1 = empty) → (tokens [..., max_len] int32 zero-padded, lengths)."""
        ids = np.asarray(ids, np.int64)
        safe = np.where(ids < 0, 0, ids)
        starts = self.offsets[safe]
        lens = np.where(ids < 0, 0, np.minimum(self.offsets[safe + 1] - starts, max_len))
        grid = np.arange(max_len)
        valid = grid < lens[..., None]
        index = np.where(valid, starts[..., None] + grid, 0)
        tokens = np.where(valid, self.flat[index] if len(self.flat) else 0, 0).astype(np.int32)
        return tokens, lens.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TokenizedBlocks:
    """Every block's title and body as wordpiece ids, in corpus order (row i = block i)."""

    titles: Ragged
    bodies: Ragged
    cls_id: int
    sep_id: int
    pad_id: int
    fingerprint: str = ""  # the corpus fingerprint these were made from

    @classmethod
    def from_lists(cls, titles, bodies, tokenizer, fingerprint: str = "") -> TokenizedBlocks:
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
        return cls(Ragged.from_lists(titles, dtype), Ragged.from_lists(bodies, dtype),
                   tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, fingerprint)

    def __len__(self) -> int:
        return len(self.bodies)

    def encode(self, block_ids: np.ndarray, max_length: int) -> Encoded:
        """`[CLS] title [SEP] body [SEP]` of blocks `block_ids` [n] → Encoded [n, max_length].

        The same layout and truncation as `WordPiece.encode_blocks`, without re-tokenising;
        id −1 gives the null document `[CLS] [SEP] [SEP]`.
        """
        block_ids = np.asarray(block_ids, np.int64)
        t_tok, t_len = self.titles.gather(block_ids, title_budget(max_length))
        raw_b = np.where(block_ids < 0, 0, self.bodies.lengths[np.maximum(block_ids, 0)])
        b_budget = max_length - 3 - t_len
        b_tok, b_len = self.bodies.gather(block_ids, max(1, body_budget(0, max_length)))
        b_len = np.minimum(b_len, b_budget)
        firsts = [t_tok[i, : t_len[i]] for i in range(len(block_ids))]
        seconds = [b_tok[i, : b_len[i]] for i in range(len(block_ids))]
        ids, mask, types = pack_rows(firsts, seconds, max_length, self.cls_id, self.sep_id,
                                     self.pad_id)
        raw_t = np.where(block_ids < 0, 0, self.titles.lengths[np.maximum(block_ids, 0)])
        return Encoded(ids, mask, types, (raw_t > t_len) | (raw_b > b_len))

    # ---------------------------------------------------------------- persistence
    def save(self, directory: epath.PathLike) -> None:
        """Plain .npy files (no pickle), memory-mappable by `load`."""
        d = epath.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, r in (("titles", self.titles), ("bodies", self.bodies)):
            for part in ("flat", "offsets"):
                with (d / f"{name}_{part}.npy").open("wb") as f:
                    np.save(f, getattr(r, part), allow_pickle=False)
        meta = dict(cls_id=self.cls_id, sep_id=self.sep_id, pad_id=self.pad_id,
                    fingerprint=self.fingerprint, num_blocks=len(self))
        (d / "tokenized.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: epath.PathLike, mmap: bool = True) -> TokenizedBlocks:
        d = epath.Path(directory)
        meta = json.loads((d / "tokenized.json").read_text())
        mode = "r" if mmap else None
        parts = {f"{n}_{p}": np.load(str(d / f"{n}_{p}.npy"), mmap_mode=mode, allow_pickle=False)
                 for n in ("titles", "bodies") for p in ("flat", "offsets")}
        return cls(Ragged(parts["titles_flat"], np.asarray(parts["titles_offsets"])),
                   Ragged(parts["bodies_flat"], np.asarray(parts["bodies_offsets"])),
                   meta["cls_id"], meta["sep_id"], meta["pad_id"], meta["fingerprint"])


def tokenize_corpus(
    corpus, tokenizer, batch_size: int = 8192, cache_dir: epath.PathLike | None = None
) -> TokenizedBlocks:
    """All blocks of a `BlockCorpus` → TokenizedBlocks (titles and bodies as ragged ids).

    With `cache_dir`, the result is saved under `cache_dir/<fingerprint>-<vocab hash>/` and
    loaded from there next time (memory-mapped, so a 13M-block corpus need not fit in RAM).
    """
    vocab_hash = hashlib.sha1("\n".join(tokenizer._inverse).encode()).hexdigest()[:12]
    cache = None
    if cache_dir is not None:
        cache = epath.Path(cache_dir) / f"{corpus.fingerprint[:16]}-{vocab_hash}"
        if (cache / "tokenized.json").exists():
            cached = TokenizedBlocks.load(cache)
            if cached.fingerprint == corpus.fingerprint:
                return cached
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    parts: dict[str, list[Ragged]] = {"title": [], "text": []}
    for start in range(0, len(corpus), batch_size):  # numpy per batch: no 13M Python lists
        rows = corpus.get_many(range(start, min(start + batch_size, len(corpus))))
        for key, acc in parts.items():
            acc.append(Ragged.from_lists(tokenizer.tokenize([r[key] for r in rows]), dtype))
    titles, bodies = (_concat(parts[k], dtype) for k in ("title", "text"))
    out = TokenizedBlocks(titles, bodies, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id,
                          corpus.fingerprint)
    if cache is not None:
        out.save(cache)
    return out


def _concat(parts: Sequence[Ragged], dtype: Any) -> Ragged:
    if not parts:
        return Ragged(np.zeros(0, dtype), np.zeros(1, np.int64))
    lengths = np.concatenate([p.lengths for p in parts])
    return Ragged(np.concatenate([p.flat for p in parts]).astype(dtype),
                  np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def join_mlm(
    query_ids: np.ndarray,
    query_lens: np.ndarray,
    blocks: TokenizedBlocks,
    block_ids: np.ndarray,
    max_length: int,
) -> Encoded:
    """`[CLS] masked q [SEP] body [SEP]` for every (query, candidate) → Encoded [B, K, L].

    Args:
      query_ids: [B, Lq] rows `[CLS] q [SEP] [PAD]…` (the batch's `query_ids`).
      query_lens: [B] tokens of each query including [CLS] and [SEP] (`query_len`).
      blocks: the corpus's TokenizedBlocks (title unused: the encoder reads the body only).
      block_ids: [B, K] candidate block indices; −1 is the null document.
      max_length: L ≥ Lq + 2. The query is copied unchanged into positions [0, query_len),
        identical for all K candidates, so the batch's `mlm_positions` [B, M] index every join.
    Returns:
      Encoded with input_ids / attention_mask / token_type_ids [B, K, L] int32 (segment 1 on
      the body and its [SEP]) and `truncated` [B, K] (the body was cut to fit).
    """
    return _join(query_ids, query_lens, blocks, block_ids, max_length)[0]


@dataclasses.dataclass(frozen=True)
class ReaderInputs:
    """The reader's joins: every field [B, K, L] int32; `block_mask` 1 on block wordpieces."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    block_mask: np.ndarray
    truncated: np.ndarray  # [B, K] bool


def join_reader(
    question_ids: np.ndarray,
    question_lens: np.ndarray,
    blocks: TokenizedBlocks,
    block_ids: np.ndarray,
    max_length: int,
) -> ReaderInputs:
    """`[CLS] q [SEP] block [SEP]` for every (question, candidate) → ReaderInputs [B, K, L].

    As ORQA's reader, the block part is the block's body; `block_mask` marks the positions a
    predicted span may cover (the body wordpieces, not the question nor the [SEP]s).
    Args as `join_mlm` (question_ids [B, Lq] from the QA batch's `question_ids`).
    """
    enc, body_start, body_len = _join(question_ids, question_lens, blocks, block_ids,
                                      max_length)
    pos = np.arange(max_length)
    block_mask = (pos >= body_start[..., None]) & (pos < (body_start + body_len)[..., None])
    return ReaderInputs(enc.input_ids, enc.attention_mask, enc.token_type_ids,
                        block_mask.astype(np.int32), enc.truncated)


def _join(query_ids, query_lens, blocks, block_ids, max_length):
    query_ids = np.asarray(query_ids)
    qlen = np.asarray(query_lens, np.int64)  # [B]
    block_ids = np.asarray(block_ids, np.int64)  # [B, K]
    b, k = block_ids.shape
    if qlen.max(initial=0) + 1 > max_length:
        raise ValueError(f"queries of {qlen.max()} tokens leave no room in max_length="
                         f"{max_length}")
    room = max_length - 1 - qlen  # [B] body wordpieces that fit after the query
    body, blen = blocks.bodies.gather(block_ids, int(room.max()))  # [B, K, R], [B, K]
    raw = np.where(block_ids < 0, 0, blocks.bodies.lengths[np.maximum(block_ids, 0)])
    blen = np.minimum(blen, room[:, None])
    pos = np.arange(max_length)  # [L]
    q_end = qlen[:, None, None]  # [B, 1, 1]
    b_end = q_end + blen[..., None]  # [B, K, 1]
    in_q = pos < q_end
    in_b = (pos >= q_end) & (pos < b_end)
    q_part = np.take_along_axis(
        query_ids[:, None, :].astype(np.int32),
        np.broadcast_to(np.minimum(pos, query_ids.shape[1] - 1), (b, 1, max_length)), -1)
    b_index = np.clip(pos - q_end, 0, max(body.shape[-1] - 1, 0))
    b_part = (np.take_along_axis(body, np.broadcast_to(b_index, (b, k, max_length)), -1)
              if body.shape[-1] else np.zeros((b, k, max_length), np.int32))
    ids = np.where(in_q, q_part, np.where(in_b, b_part, blocks.pad_id)).astype(np.int32)
    ids = np.where(pos == b_end, blocks.sep_id, ids).astype(np.int32)
    mask = (pos <= b_end).astype(np.int32)
    types = ((pos >= q_end) & (pos <= b_end)).astype(np.int32)
    enc = Encoded(ids, mask, types, raw > blen)
    return enc, np.broadcast_to(qlen[:, None], (b, k)), blen


def answer_spans(
    input_ids: np.ndarray,
    block_mask: np.ndarray,
    answer_ids: Sequence[Sequence[Sequence[int]]],
    max_spans: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a gold answer's wordpieces occur inside each candidate block.

    Args:
      input_ids, block_mask: [B, K, L] from `join_reader`.
      answer_ids: per question, its answers' wordpiece ids (`tokenizer.tokenize(answers)`).
      max_spans: S, the most occurrences kept per (question, candidate).
    Returns:
      starts, ends [B, K, S] int32 (inclusive ends, −1 = padding) and has_answer [B, K] bool,
      the inputs of the reader's span and block marginal likelihoods.
    """
    b, k, length = input_ids.shape
    starts = np.full((b, k, max_spans), -1, np.int32)
    ends = np.full((b, k, max_spans), -1, np.int32)
    for i in range(b):
        for ans in answer_ids[i]:
            n = len(ans)
            if n == 0 or n > length:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(input_ids[i], n, axis=-1)
            inside = np.lib.stride_tricks.sliding_window_view(block_mask[i], n, axis=-1)
            hit = (windows == np.asarray(ans)).all(-1) & inside.all(-1)  # [K, L - n + 1]
            for j, s in zip(*np.nonzero(hit), strict=True):
                free = np.nonzero(starts[i, j] < 0)[0]
                if len(free) and not ((starts[i, j] == s) & (ends[i, j] == s + n - 1)).any():
                    starts[i, j, free[0]], ends[i, j, free[0]] = s, s + n - 1
    return starts, ends, (starts >= 0).any(-1)


def blocks_with_answer(
    blocks: TokenizedBlocks,
    block_ids: np.ndarray,
    answer_ids: Sequence[Sequence[Sequence[int]]],
) -> np.ndarray:
    """Whether each block's body contains one of its question's answers (ORQA's has_answer,
    on wordpieces: BERT tokenises a word the same way wherever it stands).

    Args:
      blocks: the corpus's TokenizedBlocks.
      block_ids: [B, S] retrieved block indices (−1: none).
      answer_ids: per question, its answers' wordpiece ids.
    Returns:
      [B, S] bool; the targets of ORQA's retriever loss and of answer recall@k.
    """
    block_ids = np.asarray(block_ids, np.int64)
    out = np.zeros(block_ids.shape, bool)
    for i, answers in enumerate(answer_ids):
        answers = [a for a in answers if len(a)]
        if not answers:
            continue
        ids = block_ids[i]
        longest = int(np.where(ids < 0, 0, blocks.bodies.lengths[np.maximum(ids, 0)]).max())
        tokens, lens = blocks.bodies.gather(ids, max(longest, 1))  # [S, T], [S]
        for ans in answers:
            n = len(ans)
            if n > tokens.shape[1]:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(tokens, n, axis=-1)
            fits = np.arange(windows.shape[1]) + n <= lens[:, None]  # [S, T - n + 1]
            out[i] |= ((windows == np.asarray(ans)).all(-1) & fits).any(-1)
    return out
