"""Which query tokens REALM hides: salient span masking and the paper's ablations.

Salient span masking (the default) hides one salient span per query sentence — a named
entity or a date — every wordpiece of it, as [MASK] (no 80/10/10), at most `max_masks`
wordpieces. Predicting such a span needs world knowledge, which is what makes retrieval pay
off (REALM §3.4). The ablations: random token masking (BERT: 15% of wordpieces, 80% [MASK] /
10% random / 10% kept) and random span masking (one random run of whole words).

Spans come from a `Tagger` (text → character spans) or precomputed with the data. The default
`RegexTagger` needs no model: dates (years, months, full dates), numbers with units, and
runs of capitalised words (an entity-like run only counts at the sentence start when it is
longer than the one sentence-initial word). `LexiconTagger` marks known phrases, e.g. the
attribute values of the synthetic knowledge base.

Masking functions work on one tokenised query row `[CLS] q [SEP] [PAD]…` and never touch the
special tokens or the padding.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

Span = tuple[int, int]  # [start, end) character offsets


class Tagger(Protocol):
    """Finds salient spans in a sentence."""

    def __call__(self, text: str) -> list[Span]: ...


_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|"
           "December|Jan\\.|Feb\\.|Mar\\.|Apr\\.|Aug\\.|Sept?\\.|Oct\\.|Nov\\.|Dec\\.")
_YEAR = r"(?:1[0-9]{3}|20[0-9]{2})"
_DATE = re.compile(
    rf"\b(?:\d{{1,2}}(?:st|nd|rd|th)? (?:of )?(?:{_MONTHS}),? {_YEAR}"  # 3 March 1999
    rf"|(?:{_MONTHS}) \d{{1,2}}(?:st|nd|rd|th)?,? {_YEAR}"  # March 3, 1999
    rf"|(?:{_MONTHS}) {_YEAR}"  # March 1999
    rf"|\d{{1,2}}(?:st|nd|rd|th)? (?:of )?(?:{_MONTHS})"  # 3 March
    rf"|(?:{_MONTHS}) \d{{1,2}}(?:st|nd|rd|th)?\b"  # March 3
    rf"|{_YEAR}-\d{{2}}-\d{{2}}"  # 1999-03-03
    rf"|{_YEAR}s?)(?![\w-])"  # 1999, 1990s
)
_UNITS = ("%|percent|per cent|km|kilometres?|kilometers?|miles?|metres?|meters?|m|cm|mm|kg|"
          "kilograms?|grams?|g|tonnes?|tons?|feet|ft|foot|inches|hectares?|acres?|km2|sq mi|"
          "square (?:kilometres|kilometers|miles)|million|billion|trillion|thousand|hundred|"
          "people|inhabitants|residents|years?|months?|weeks?|days?|hours?|minutes?|seconds?|"
          "°C|°F|degrees|dollars?|euros?|pounds?|yen|votes|seats|goals|points|episodes|"
          "copies|employees|students|members")
_NUMBER = re.compile(
    rf"(?:[$£€¥]\s?\d[\d,]*(?:\.\d+)?(?:\s(?:million|billion|trillion))?"
    rf"|\b\d[\d,]*(?:\.\d+)?\s?(?:{_UNITS}))(?![\w])"
)
_CAP = r"[A-ZÀ-ÖØ-Þ][\w'’.-]*"
_CONNECT = r"(?:of|the|de|del|della|di|da|du|des|la|le|van|von|der|den|y|and|&)"
_ENTITY = re.compile(rf"{_CAP}(?:(?:\s+{_CONNECT})*\s+{_CAP})*")
# Capitalised only because they start the sentence (dropped from a run's front there).
_SENTENCE_STARTERS = frozenset(
    "The A An In On At By For From To Of As He She It They We I You His Her Its Their Our "
    "This That These Those There Here After Before During When While Although Though But And "
    "Or So Yet If Since Because Then However Also Later Today Some Many Most Each Every".split()
)
_NOT_ENTITIES = frozenset({"I", "The", "A", "An"})


@dataclasses.dataclass(frozen=True)
class RegexTagger:
    """Dates, numbers with units and capitalised runs, by regular expressions (no model)."""

    dates: bool = True
    numbers: bool = True
    entities: bool = True

    def __call__(self, text: str) -> list[Span]:
        spans: list[Span] = []
        if self.dates:
            spans += [m.span() for m in _DATE.finditer(text)]
        if self.numbers:
            spans += [m.span() for m in _NUMBER.finditer(text)]
        if self.entities:
            spans += self._entities(text)
        return resolve_overlaps(spans)

    @staticmethod
    def _entities(text: str) -> list[Span]:
        first_word = re.match(r"\s*[\"'“‘(]*", text).end()
        out = []
        for m in _ENTITY.finditer(text):
            start, end = m.span()
            word = m.group().split()[0].rstrip(".,")
            if start == first_word:
                if word in _SENTENCE_STARTERS:  # "The Beatles were" → "Beatles"
                    nxt = re.compile(rf"\s+(?:{_CONNECT}\s+)*").match(text, start + len(word))
                    if nxt is None or nxt.end() >= end:
                        continue
                    start = nxt.end()
                elif " " not in m.group():  # a lone capitalised first word: just grammar
                    continue
            span_text = text[start:end].rstrip(".")
            if span_text in _NOT_ENTITIES or not span_text:
                continue
            out.append((start, start + len(span_text)))
        return out


class LexiconTagger:
    """Marks every whole-word occurrence of known phrases (longest first)."""

    def __init__(self, phrases: Iterable[str]):
        phrases = sorted({p for p in phrases if p.strip()}, key=len, reverse=True)
        if not phrases:
            raise ValueError("LexiconTagger needs at least one phrase")
        self._re = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, phrases)) + r")(?!\w)")

    def __call__(self, text: str) -> list[Span]:
        return [m.span() for m in self._re.finditer(text)]


def resolve_overlaps(spans: Iterable[Span]) -> list[Span]:
    """Non-overlapping spans, longer ones winning, in text order."""
    chosen: list[Span] = []
    for s, e in sorted(set(spans), key=lambda x: (x[0] - x[1], x[0])):
        if s < e and all(e <= cs or s >= ce for cs, ce in chosen):
            chosen.append((s, e))
    return sorted(chosen)


# --------------------------------------------------------------------------- masking rows


@dataclasses.dataclass(frozen=True)
class Masked:
    """One masked query row: ids [L] with masks in place; positions/labels/weights [M]."""

    input_ids: np.ndarray
    positions: np.ndarray  # int32, 0-padded
    labels: np.ndarray  # int32, 0-padded
    weights: np.ndarray  # float32, 0 on padding
    span: Span | None = None  # the masked character span (salient / random span)


def span_token_positions(
    offsets: Sequence[tuple[int, int]], span: Span, shift: int = 1
) -> np.ndarray:
    """Positions (in `[CLS] q …`, hence `shift`) of wordpieces overlapping a char span."""
    s, e = span
    pos = [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
    return np.asarray(pos, np.int32) + shift


def _finish(ids, positions, labels, max_masks, span=None) -> Masked:
    m = len(positions)
    pos = np.zeros(max_masks, np.int32)
    lab = np.zeros(max_masks, np.int32)
    w = np.zeros(max_masks, np.float32)
    order = np.argsort(positions)
    pos[:m] = np.asarray(positions)[order]
    lab[:m] = np.asarray(labels)[order]
    w[:m] = 1.0
    return Masked(ids, pos, lab, w, span)


def salient_span_mask(
    ids: np.ndarray,
    length: int,
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[Span],
    mask_id: int,
    rng: np.random.Generator,
    max_masks: int = 10,
) -> Masked | None:
    """Mask every wordpiece of one salient span, chosen uniformly among those that fit.

    Args:
      ids: [L] `[CLS] q [SEP] [PAD]…`; `length` counts [CLS] … [SEP].
      offsets: char offsets of q's wordpieces (before truncation); `spans` char spans of q.
    Returns None when no span lies wholly inside the (truncated) query with ≤ max_masks
    wordpieces, so the caller can fall back (and count it).
    """
    last = length - 2  # q's wordpieces occupy positions 1 … length-2
    eligible = []
    for span in spans:
        pos = span_token_positions(offsets, span)
        if 0 < len(pos) <= max_masks and pos[-1] <= last:
            eligible.append((span, pos))
    if not eligible:
        return None
    span, pos = eligible[rng.integers(len(eligible))]
    out = ids.copy()
    labels = out[pos].copy()
    out[pos] = mask_id
    return _finish(out, pos, labels, max_masks, span)


def random_token_mask(
    ids: np.ndarray,
    length: int,
    mask_id: int,
    vocab_size: int,
    special_ids: np.ndarray,
    rng: np.random.Generator,
    max_masks: int = 10,
    rate: float = 0.15,
) -> Masked:
    """BERT's masking: `rate` of q's wordpieces (≥ 1, ≤ max_masks), 80% [MASK] / 10% random
    wordpiece / 10% unchanged; the label is always the original wordpiece."""
    candidates = np.arange(1, length - 1)
    n = int(min(max_masks, len(candidates), max(1, round(rate * len(candidates)))))
    pos = np.sort(rng.choice(candidates, size=n, replace=False)) if n else candidates[:0]
    out = ids.copy()
    labels = out[pos].copy()
    roll = rng.random(n)
    random_ids = rng.integers(vocab_size, size=n)
    while (bad := np.isin(random_ids, special_ids)).any():  # real wordpieces only
        random_ids[bad] = rng.integers(vocab_size, size=int(bad.sum()))
    out[pos] = np.where(roll < 0.8, mask_id, np.where(roll < 0.9, random_ids, out[pos]))
    return _finish(out, pos, labels, max_masks)


def random_span_mask(
    ids: np.ndarray,
    length: int,
    is_continuation: np.ndarray,
    mask_id: int,
    rng: np.random.Generator,
    max_masks: int = 10,
    max_words: int = 4,
) -> Masked:
    """One random run of 1…max_words whole words (≤ max_masks wordpieces), all [MASK]ed.

    `is_continuation` [vocab] marks "##" wordpieces, so a word is never half-masked.
    """
    body = np.arange(1, length - 1)
    if not len(body):
        return _finish(ids.copy(), [], [], max_masks)
    starts = body[~is_continuation[ids[body]]]
    if not len(starts):
        starts = body[:1]
    first = int(starts[rng.integers(len(starts))])
    want = int(rng.integers(1, max_words + 1))
    word_starts = starts[starts >= first]
    end = length - 1  # exclusive, never past q
    if len(word_starts) > want:
        end = int(word_starts[want])
    # Keep whole words within max_masks wordpieces.
    while end - first > max_masks:
        inner = word_starts[(word_starts > first) & (word_starts < end)]
        if not len(inner):
            end = first + max_masks
            break
        end = int(inner[-1])
    pos = np.arange(first, end)
    out = ids.copy()
    labels = out[pos].copy()
    out[pos] = mask_id
    return _finish(out, pos, labels, max_masks)
