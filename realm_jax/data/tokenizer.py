"""BERT WordPiece tokenisation via Hugging Face `tokenizers`, from a plain `vocab.txt`.

Lower-casing follows the vocabulary: an uncased vocab (no upper-case wordpieces) lower-cases
and strips accents, as BERT-uncased and all-MiniLM-L6-v2 were trained.

The four sequence layouts of REALM (DESIGN §1), each truncated to its configured length:

  query        [CLS] q [SEP]                      `encode_queries`            (96 in pre-training)
  block        [CLS] title [SEP] body [SEP]       `encode_blocks`             (288)
  MLM join     [CLS] masked q [SEP] body [SEP]    `joins.join_mlm`            (384)
  reader join  [CLS] q [SEP] block [SEP]          `joins.join_reader`         (320)

(The joins gather pre-tokenised blocks, `joins.TokenizedBlocks`, which build on this module.)

Segment (token type) ids are 1 from the first token after the first [SEP] through the last
[SEP], as BERT's sentence pairs. The special tokens are not registered with `tokenizers`, so a
literal "[SEP]" in a text stays text ("[", "sep", "]") and cannot forge a segment boundary.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
from etils import epath
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Lone UTF-16 surrogates (e.g. from a JSON "\ud800" escape) cannot be encoded as UTF-8.
_SURROGATES = re.compile("[\ud800-\udfff]")
# A block's title may take at most this many wordpieces (and at most a quarter of the block),
# so a long title never squeezes the body out of a short block.
MAX_TITLE_WORDPIECES = 32


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A padded batch: each field [batch, max_length] int32 (or [batch, k, max_length]).

    `truncated` [batch] bool says which rows lost content to the length limit (None when the
    producer does not track it).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    truncated: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        """Number of real (non-pad) tokens per row, [batch] int32."""
        return self.attention_mask.sum(-1).astype(np.int32)


def clean_text(text: str) -> str:
    """Replace lone UTF-16 surrogates (unencodable as UTF-8) by U+FFFD, one char for one."""
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


def title_budget(max_length: int) -> int:
    """Most wordpieces a title may keep inside a block of `max_length` tokens."""
    return max(0, min(MAX_TITLE_WORDPIECES, (max_length - 3) // 4))


def body_budget(title_len: int, max_length: int) -> int:
    """Wordpieces left for the body in `[CLS] title [SEP] body [SEP]` of `max_length` tokens."""
    budget = max_length - 3 - min(title_len, title_budget(max_length))
    if budget < 1:
        raise ValueError(f"block length {max_length} leaves no room for a body")
    return budget


def pack_rows(
    firsts: Sequence[Sequence[int]],
    seconds: Sequence[Sequence[int]] | None,
    max_length: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Already-truncated parts → (ids, mask, types) [n, max_length] int32, vectorised.

    Row i is `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`; the caller guarantees it fits.
    """
    n = len(firsts)
    la = np.fromiter((len(a) for a in firsts), np.int64, n)
    lb = (np.fromiter((len(b) for b in seconds), np.int64, n) if seconds is not None
          else np.full(n, -1, np.int64))  # -1: no second segment and no second [SEP]
    total = la + 2 + (lb + 1)
    if n and total.max() > max_length:
        raise ValueError(f"row of {total.max()} tokens does not fit max_length={max_length}")
    pos = np.broadcast_to(np.arange(max_length), (n, max_length))  # [n, L]
    ids = np.full((n, max_length), pad_id, np.int32)
    la_, lb_ = la[:, None], lb[:, None]
    ids[pos == 0] = cls_id
    ids[(pos == la_ + 1) | ((lb_ >= 0) & (pos == la_ + 2 + lb_))] = sep_id
    in_a = (pos >= 1) & (pos <= la_)
    if la.sum():
        ids[in_a] = np.concatenate([np.asarray(a, np.int32) for a in firsts if len(a)])
    in_b = (pos >= la_ + 2) & (pos < la_ + 2 + lb_)
    if seconds is not None and lb.sum() > 0:
        ids[in_b] = np.concatenate([np.asarray(b, np.int32) for b in seconds if len(b)])
    mask = (pos < total[:, None]).astype(np.int32)
    types = ((pos >= la_ + 2) & (pos < total[:, None])).astype(np.int32)
    return ids, mask, types


class WordPiece:
    """A BERT WordPiece tokenizer built from `vocab.txt`."""

    def __init__(self, vocab_file: epath.PathLike, lowercase: bool | None = None):
        path = epath.Path(vocab_file)
        tokens = [t for t in path.read_text(encoding="utf-8").split("\n") if t]
        self.vocab = {t: i for i, t in enumerate(tokens)}
        missing = [s for s in SPECIALS if s not in self.vocab]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks special token(s) {missing}")
        if lowercase is None:  # uncased vocab ⇔ no wordpiece has an upper-case letter
            lowercase = not any(t.lower() != t for t in tokens if not t.startswith("["))
        self.lowercase = lowercase
        self.vocab_file = str(path)
        tok = Tokenizer(
            models.WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=100)
        )
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        self._tok = tok
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = (
            self.vocab[s] for s in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
        )
        self.unk_id = self.vocab["[UNK]"]
        # Ids a random replacement (80/10/10 masking) may draw: real wordpieces only.
        self.special_ids = np.array(
            sorted(i for t, i in self.vocab.items() if t.startswith("[") and t.endswith("]")),
            np.int32,
        )
        self._inverse = tokens

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Wordpiece ids of each text, without special tokens."""
        return [e.ids for e in self._encode_batch(texts)]

    def _encode_batch(self, texts: Sequence[str]):
        try:
            return self._tok.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:  # a lone surrogate: replace it (1 char for 1, offsets unchanged)
            bad = [t for t in texts if not isinstance(t, str)]
            if bad:
                raise TypeError(f"tokenizer inputs must be str, got {type(bad[0]).__name__}"
                                ) from None
            return self._tok.encode_batch([clean_text(t) for t in texts],
                                          add_special_tokens=False)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Number of wordpieces of each text (cheaper than materialising the ids)."""
        return [len(e) for e in self._encode_batch(texts)]

    def tokenize_with_offsets(
        self, texts: Sequence[str]
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, char offsets into the original text) per text; offsets survive lower-casing."""
        return [(e.ids, e.offsets) for e in self._encode_batch(texts)]

    def id_to_token(self, i: int) -> str:
        return self._inverse[i]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    # ---------------------------------------------------------------- the four layouts

    def encode(
        self, texts: Sequence[str], max_length: int, pairs: Sequence[str] | None = None
    ) -> Encoded:
        """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` (segment 1 after the first [SEP]).

        Over-long inputs are truncated, the longer part first, so both sides keep content.
        """
        firsts = self.tokenize(texts)
        seconds = self.tokenize(pairs) if pairs is not None else None
        return self.encode_ids(firsts, max_length, seconds)

    def encode_ids(
        self,
        firsts: Sequence[Sequence[int]],
        max_length: int,
        seconds: Sequence[Sequence[int]] | None = None,
    ) -> Encoded:
        """`encode` for texts already turned into wordpiece ids."""
        budget = max_length - (3 if seconds is not None else 2)
        a_out, b_out, cut = [], [], np.zeros(len(firsts), bool)
        for i, a in enumerate(firsts):
            b = seconds[i] if seconds is not None else None
            ta, tb = _truncate_pair(a, b, budget)
            cut[i] = len(ta) < len(a) or (b is not None and len(tb) < len(b))
            a_out.append(ta)
            b_out.append(tb)
        ids, mask, types = pack_rows(a_out, b_out if seconds is not None else None, max_length,
                                     self.cls_id, self.sep_id, self.pad_id)
        return Encoded(ids, mask, types, cut)

    def encode_queries(self, texts: Sequence[str], max_length: int) -> Encoded:
        """`[CLS] q [SEP]` [n, max_length]; `.truncated` marks over-long questions."""
        return self.encode(texts, max_length)

    def encode_blocks(
        self, titles: Sequence[str], bodies: Sequence[str], max_length: int
    ) -> Encoded:
        """`[CLS] title [SEP] body [SEP]` [n, max_length], segment 1 from the body on.

        The title keeps at most `title_budget(max_length)` wordpieces and the body the rest;
        blocks built by `blocks.Chunker` with the same length are never truncated.
        """
        return self.encode_block_ids(self.tokenize(titles), self.tokenize(bodies), max_length)

    def encode_block_ids(
        self, titles: Sequence[Sequence[int]], bodies: Sequence[Sequence[int]], max_length: int
    ) -> Encoded:
        """`encode_blocks` for pre-tokenised titles and bodies."""
        t_out, b_out, cut = [], [], np.zeros(len(titles), bool)
        for i, (t, b) in enumerate(zip(titles, bodies, strict=True)):
            t2 = list(t[: title_budget(max_length)])
            b2 = list(b[: body_budget(len(t2), max_length)])
            cut[i] = len(t2) < len(t) or len(b2) < len(b)
            t_out.append(t2)
            b_out.append(b2)
        ids, mask, types = pack_rows(t_out, b_out, max_length, self.cls_id, self.sep_id,
                                     self.pad_id)
        return Encoded(ids, mask, types, cut)


def _truncate_pair(a: Sequence[int], b: Sequence[int] | None, budget: int):
    if budget < 0:
        raise ValueError("max_length is too small for the special tokens")
    if b is None:
        return list(a[:budget]), None
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
    return a, b
