"""BERT WordPiece tokenisation via Hugging Face `tokenizers`, from a plain `vocab.txt`.

Lower-casing follows the vocabulary: an uncased vocab (no upper-case wordpieces) lower-cases
and strips accents, as BERT-uncased and all-MiniLM-L6-v2 were trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from etils import epath
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A padded batch: each field [batch, max_length] int32."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray


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

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Wordpiece ids of each text, without special tokens."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def encode(
        self, texts: Sequence[str], max_length: int, pairs: Sequence[str] | None = None
    ) -> Encoded:
        """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` (segment 1 after the first [SEP]).

        Over-long inputs are truncated, the longer part first, so both sides keep content.
        """
        firsts = self.tokenize(texts)
        seconds = self.tokenize(pairs) if pairs is not None else [None] * len(firsts)
        ids = np.full((len(firsts), max_length), self.pad_id, np.int32)
        types = np.zeros_like(ids)
        for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
            a, b = _truncate_pair(a, b, max_length - (3 if b is not None else 2))
            row = [self.cls_id, *a, self.sep_id]
            if b is not None:
                types[i, len(row): len(row) + len(b) + 1] = 1
                row += [*b, self.sep_id]
            ids[i, : len(row)] = row
        mask = (np.arange(max_length)[None] < (ids != self.pad_id).sum(1)[:, None])
        return Encoded(ids, mask.astype(np.int32), types)


def _truncate_pair(a: list[int], b: list[int] | None, budget: int):
    if budget < 0:
        raise ValueError("max_length is too small for the special tokens")
    if b is None:
        return a[:budget], None
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
    return a, b
