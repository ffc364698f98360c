"""A generated knowledge base: fictional people, their encyclopedia pages, questions about them.

Why: REALM's claim is that retrieval brings knowledge the model does not hold. With fictional
entities (syllable-generated names) no pretrained model or web page knows the answers, so a
question is answerable only by retrieving its entity's page. That makes the demo and learning
tests honest and small.

Each entity has shared attributes (birth year, occupation: true to life, many people share
them) and unique ones (birthplace town, employer, spouse, founded organisation, best-known
work): every unique value belongs to exactly one entity and appears exactly once in the corpus,
in that entity's page. Questions ask only about unique attributes, so each answer identifies one
block (`gold_block`) once the pages are cut into blocks. Pages mix the facts, in varied
templates and order, with distractor sentences (mentions of other entities, dates, filler).

Pre-training sentences restate facts in other words (so they are not copies of a block):
the value is the precomputed salient span and the fact's block is the gold block.

Everything is deterministic from (num_entities, seed). Sizes: `entities_for_blocks`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from realm_jax.data.blocks import Block, BlockCorpus, Chunker
from realm_jax.data.examples import Sentences
from realm_jax.data.qa import QaSet, normalize_answer
from realm_jax.data.tokenizer import WordPiece

SPLITS = ("train", "dev", "test")
UNIQUE = ("birthplace", "employer", "spouse", "founded", "work")
# Blocks per page by block length, measured with the BERT uncased vocab (a page is ~143
# wordpieces); see `entities_for_blocks`.
BLOCKS_PER_PAGE = {32: 8.87, 64: 3.38, 96: 2.13, 128: 1.93, 160: 1.33, 192: 1.02, 288: 1.0}

_ONSETS = ("b br c ch d dr f fl g gr h j k kr l m n p pr q r s sh sk st t th tr v vr w z "
           "zh").split()
_VOWELS = "a e i o u ae ia ou ei y".split()
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "x", "m", "nd", "rk"]

OCCUPATIONS = ("botanist cartographer composer engineer physician novelist astronomer "
               "architect sculptor chemist historian linguist geologist painter poet "
               "mathematician surveyor economist diplomat inventor").split()
_TOWN_SUFFIX = ("ford mere holm wick stead ton by haven dale burg".split())
_COMPANY_SUFFIX = ("Industries", "Works", "Holdings", "Laboratories", "Foundry", "Trading Company",
                   "Mills", "Shipping", "Instruments", "Press")
_ORG_KIND = ("Society", "Institute", "Guild", "Academy", "Foundation", "Observatory", "League",
             "Conservatory", "Archive", "Circle")
_WORK_KIND = ("engine", "treatise", "symphony", "atlas", "bridge", "telescope", "cipher",
              "theorem", "novel", "loom")

_FACT_TEMPLATES = {
    "birthplace": ("{first} was born in the town of {v}.",
                   "{S} grew up in {v}, where {p} was born.",
                   "The birthplace of {first} {last} was {v}.",
                   "Born in {v}, {first} left home young."),
    "employer": ("{S} worked for {v} for many years.", "In {y}, {first} {last} joined {v}.",
                 "For most of {pos} career, {S} was employed by {v}.",
                 "{S} spent two decades at {v}."),
    "spouse": ("{S} married {v} in {y}.", "{first} {last} was the spouse of {v}.",
               "In {y}, {first} wed {v}.", "{S} and {v} were married for many years."),
    "founded": ("{S} founded {v} in {y}.", "In {y}, {first} {last} established {v}.",
                "{v} was founded by {first} {last}.", "{S} was the founder of {v}."),
    "work": ("{S} is best known for {v}.", "The most famous creation of {first} {last} is {v}.",
             "{S} became known for {v}.", "Many remember {first} {last} for {v}."),
}
_QUESTIONS = {
    "birthplace": ("where was {n} born?", "in which town was {n} born?",
                   "what is the birthplace of {n}?"),
    "employer": ("which company did {n} work for?", "who employed {n}?",
                 "what company was {n} employed by?"),
    "spouse": ("who did {n} marry?", "who was the spouse of {n}?", "who was {n} married to?"),
    "founded": ("what did {n} found?", "which organisation was founded by {n}?",
                "what organisation did {n} establish?"),
    "work": ("what is {n} best known for?", "what is the most famous creation of {n}?",
             "what is {n} remembered for?"),
}
_PARAPHRASES = {
    "birthplace": ("{n} came into the world in {v}.", "{v} is the hometown of {n}."),
    "employer": ("{n} held a position at {v}.", "{v} employed {n}."),
    "spouse": ("{n} was married to {v}.", "{v} was the partner of {n}."),
    "founded": ("{n} started {v}.", "{v} owes its existence to {n}."),
    "work": ("{n} created {v}.", "{v} is the achievement of {n}."),
    "birth_year": ("{n} was born in {v}.", "{n}'s year of birth was {v}."),
    "occupation": ("{n} worked as {a}.", "By profession, {n} was {a}."),
}
# The facts pre-training sentences state (`SyntheticData.sentences`).
PRETRAIN_ATTRIBUTES = tuple(_PARAPHRASES)
_FILLER = (
    "{S} travelled widely in {pos} youth.", "{S} kept detailed notebooks throughout {pos} life.",
    "Little is known about {pos} early schooling.", "{S} corresponded often with {other}.",
    "In {y}, {S} spent a winter abroad.",
    "Contemporaries described {first} as patient and precise.",
    "{S} later met {other} at a conference.", "{P} enjoyed long walks along the coast.",
    "Several of {pos} letters survive in private collections.",
    "{S} was a rival of {other} for some years.", "{P} lectured occasionally after {y}.",
    "The family moved twice during {pos} childhood.", "{P} rarely gave interviews.",
)


@dataclasses.dataclass(frozen=True)
class Fact:
    entity: int
    attribute: str
    value: str
    start: int  # char span of the value in the entity's page
    end: int


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    entity: int
    attribute: str
    split: str
    fact: int  # index into KnowledgeBase.facts


@dataclasses.dataclass
class KnowledgeBase:
    seed: int
    names: list[str]  # entity i's name (= its page title)
    splits: list[str]  # entity i's split
    attributes: list[dict[str, str]]
    documents: list[tuple[str, str]]  # page i = entity i: (title, text)
    facts: list[Fact]
    questions: list[Question]
    pretraining: list[dict[str, Any]]  # {text, spans [[s, e]], entity, fact, split}

    def questions_for(self, split: str) -> list[Question]:
        return [q for q in self.questions if q.split == split]

    def chunk(self, tokenizer: WordPiece, max_block_wordpieces: int) -> list[Block]:
        return list(Chunker(tokenizer, max_block_wordpieces).chunk_documents(self.documents))

    def link(self, blocks: Sequence[Block] | BlockCorpus) -> np.ndarray:
        """Block index of every fact [F] int32: the block of its page that holds its value.

        `blocks` are Chunker blocks or a corpus whose records carry doc/start/end (any corpus
        built from `documents` by `realm_blocks` or `build`).
        """
        if isinstance(blocks, BlockCorpus):
            places = []
            for start in range(0, len(blocks), 8192):
                rows = blocks.get_many(range(start, min(start + 8192, len(blocks))))
                places += [(r["doc"], r["start"], r["end"]) for r in rows]
        else:
            places = [(b.doc, b.start, b.end) for b in blocks]
        by_doc: dict[int, list[tuple[int, int, int]]] = {}
        for i, (doc, s, e) in enumerate(places):
            by_doc.setdefault(doc, []).append((s, e, i))
        out = np.full(len(self.facts), -1, np.int32)
        for f_i, f in enumerate(self.facts):
            for s, e, i in by_doc.get(f.entity, []):
                if s <= f.start < e:
                    out[f_i] = i
                    break
        return out

    def build(self, tokenizer: WordPiece, max_block_wordpieces: int) -> SyntheticData:
        """Cut the pages into blocks (in memory) and link every question to its gold block."""
        blocks = self.chunk(tokenizer, max_block_wordpieces)
        return SyntheticData(self, BlockCorpus.from_blocks(blocks), self.link(blocks))

    def attach(self, corpus: BlockCorpus) -> SyntheticData:
        """Link to a corpus built elsewhere from `documents` (e.g. TFDS realm_blocks)."""
        return SyntheticData(self, corpus, self.link(corpus))

    def write_documents(self, path: epath.PathLike) -> epath.Path:
        """documents.jsonl: `{"title", "text"}` per page, the input of `realm_blocks`."""
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, ({"title": t, "text": x} for t, x in self.documents))
        return path

    def write_jsonl(self, out_dir: epath.PathLike, tokenizer: WordPiece | None = None,
                    max_block_wordpieces: int = 288,
                    fact_blocks: np.ndarray | None = None) -> dict[str, epath.Path]:
        """documents.jsonl (for realm_blocks), qa_{split}.jsonl (for realm_qa, NQ-open format
        + gold_block) and pretrain.jsonl (for realm_sentences). Gold blocks are numbered as
        in a corpus built from these documents with the same tokenizer and
        max_block_wordpieces (or given as `fact_blocks`, from `link`)."""
        out = epath.Path(out_dir)
        if fact_blocks is None:
            if tokenizer is None:
                raise ValueError("pass a tokenizer (to cut blocks) or fact_blocks")
            fact_blocks = self.link(self.chunk(tokenizer, max_block_wordpieces))
        gold = fact_blocks
        paths = {"documents": self.write_documents(out / "documents.jsonl"),
                 "pretrain": out / "pretrain.jsonl"}
        for split in SPLITS:
            paths[f"qa_{split}"] = out / f"qa_{split}.jsonl"
            _write(paths[f"qa_{split}"], (
                {"question": q.question, "answer": list(q.answers),
                 "gold_block": int(gold[q.fact]), "entity": self.names[q.entity]}
                for q in self.questions_for(split)))
        _write(paths["pretrain"], (
            {"text": p["text"], "spans": p["spans"], "block": -1,
             "gold_block": int(gold[p["fact"]])} for p in self.pretraining))
        return paths


@dataclasses.dataclass
class SyntheticData:
    """A knowledge base cut into a corpus, with every fact's gold block."""

    kb: KnowledgeBase
    corpus: BlockCorpus
    fact_blocks: np.ndarray  # [F] int32

    def qa(self, split: str) -> QaSet:
        rows = [{"question": q.question, "answers": list(q.answers),
                 "gold_block": int(self.fact_blocks[q.fact])} for q in self.kb.questions_for(split)]
        return QaSet(rows, False, f"synthetic[{split}]")

    def sentences(self, splits: Sequence[str] = SPLITS,
                  attributes: Sequence[str] | None = None) -> Sentences:
        """Pre-training examples (paraphrased facts) of entities in `splits`, of the facts in
        `attributes` (None: all of `PRETRAIN_ATTRIBUTES`).

        Why a choice of facts: the birth year and the occupation are stated in a page's first
        block, so their sentences all send the retriever there; measured, a 2-layer retriever
        then sends 92 % of the questions to their person's first block (README "a small BERT
        that reads"), and leaving them out is the ablation that shows it."""
        if attributes is None:
            attributes = PRETRAIN_ATTRIBUTES
        unknown = sorted(set(attributes) - set(PRETRAIN_ATTRIBUTES))
        if unknown or not attributes:
            raise ValueError(f"pre-training attributes {list(attributes)}: unknown {unknown} or "
                             f"none; accepted: {list(PRETRAIN_ATTRIBUTES)}")
        return Sentences.from_records(
            {"text": p["text"], "spans": p["spans"], "block": -1,
             "gold_block": int(self.fact_blocks[p["fact"]])}
            for p in self.kb.pretraining
            if p["split"] in splits and p["attribute"] in attributes)


def _write(path: epath.Path, rows) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def entities_for_blocks(
    num_blocks: int, max_block_wordpieces: int = 288, tokenizer: WordPiece | None = None
) -> int:
    """How many entities give about `num_blocks` blocks (1k … 1M) at this block length.

    With a tokenizer, blocks per page are measured on a 300-entity sample; without one, they
    are interpolated from measurements with the BERT uncased vocab (`BLOCKS_PER_PAGE`).
    """
    if tokenizer is not None:
        sample = generate(300, seed=12345)
        per_page = len(sample.chunk(tokenizer, max_block_wordpieces)) / 300
    else:
        lengths, ratios = zip(*sorted(BLOCKS_PER_PAGE.items()), strict=True)
        per_page = float(np.interp(max_block_wordpieces, lengths, ratios))
    return max(1, int(round(num_blocks / per_page)))


# --------------------------------------------------------------------------- generation


class _Names:
    """Fictional words, never repeated across any kind (so values never collide)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            n = self.rng.integers(syllables[0], syllables[1] + 1)
            parts = [_ONSETS[self.rng.integers(len(_ONSETS))] + _VOWELS[self.rng.integers(
                len(_VOWELS))] for _ in range(n)]
            w = ("".join(parts) + _CODAS[self.rng.integers(len(_CODAS))]).capitalize()
            if w.lower() not in self.used and len(w) > 3:
                self.used.add(w.lower())
                return w

    def town(self) -> str:
        while True:
            t = self.word((2, 2)) + _TOWN_SUFFIX[self.rng.integers(len(_TOWN_SUFFIX))]
            if t.lower() not in self.used:
                self.used.add(t.lower())
                return t

    def person(self) -> str:
        return f"{self.word()} {self.word()}"


def generate(num_entities: int, seed: int = 0) -> KnowledgeBase:
    """N fictional people with pages, questions (split by entity) and pre-training sentences."""
    if num_entities < 1:
        raise ValueError("num_entities must be ≥ 1")
    rng = np.random.default_rng(seed)
    names = _Names(rng)
    people = [names.person() for _ in range(num_entities)]
    order = rng.permutation(num_entities)
    n_dev = max(1, num_entities // 10) if num_entities >= 3 else 0
    split_of = np.empty(num_entities, object)
    split_of[order] = "train"
    split_of[order[:n_dev]] = "dev"
    split_of[order[n_dev: 2 * n_dev]] = "test"

    attrs, docs, facts, questions, pretraining = [], [], [], [], []
    for e, person in enumerate(people):
        first, last = person.split()
        a = {
            "birth_year": str(int(rng.integers(1700, 1990))),
            "occupation": OCCUPATIONS[rng.integers(len(OCCUPATIONS))],
            "birthplace": names.town(),
            "employer": f"{names.word()} {_COMPANY_SUFFIX[rng.integers(len(_COMPANY_SUFFIX))]}",
            "spouse": names.person(),
            "founded": f"the {names.word()} {_ORG_KIND[rng.integers(len(_ORG_KIND))]}",
            "work": f"the {names.word()} {_WORK_KIND[rng.integers(len(_WORK_KIND))]}",
        }
        attrs.append(a)
        she = bool(rng.integers(2))
        ctx = dict(first=first, last=last, S=last, p="she" if she else "he",
                   P="She" if she else "He", pos="her" if she else "his")

        sentences: list[tuple[str, str | None]] = [(
            f"{person} (born {a['birth_year']}) was {_article(a['occupation'])}.", None)]
        body = [(k, _FACT_TEMPLATES[k][rng.integers(len(_FACT_TEMPLATES[k]))]) for k in UNIQUE]
        body += [(None, _FILLER[i]) for i in rng.choice(len(_FILLER), rng.integers(3, 7),
                                                        replace=False)]
        for i in rng.permutation(len(body)):
            key, template = body[i]
            y = str(int(a["birth_year"]) + int(rng.integers(18, 60)))
            other = people[rng.integers(num_entities)]
            text = template.format(v=a.get(key, ""), y=y, other=other, **ctx)
            sentences.append((text[0].upper() + text[1:], key))
        text, spans = "", {}
        for s, key in sentences:
            if text:
                text += " "
            if key is not None:
                at = s.lower().find(a[key].lower())  # "{v} was …" capitalises "the"
                spans[key] = (len(text) + at, len(text) + at + len(a[key]))
            text += s
        docs.append((person, text))
        fact_index = {}
        for key in UNIQUE:
            fact_index[key] = len(facts)
            facts.append(Fact(e, key, a[key], *spans[key]))
        year_at = text.find(a["birth_year"])
        fact_index["birth_year"] = fact_index["occupation"] = len(facts)
        facts.append(Fact(e, "birth_year", a["birth_year"], year_at, year_at + 4))
        split = str(split_of[e])
        for key in UNIQUE:
            templates = _QUESTIONS[key]
            q = templates[rng.integers(len(templates))].format(n=person)
            answers = [a[key]]
            if a[key].startswith("the "):
                answers.append(a[key][4:])
            questions.append(Question(q, tuple(answers), e, key, split, fact_index[key]))
        for key, templates in _PARAPHRASES.items():
            t = templates[rng.integers(len(templates))].format(
                n=person, v=a[key], a=_article(a[key]))
            t = t[0].upper() + t[1:]
            value = a[key]
            at = t.find(value) if t.find(value) >= 0 else t.lower().find(value.lower())
            pretraining.append({"text": t, "spans": [[at, at + len(value)]], "entity": e,
                                "fact": fact_index[key], "attribute": key, "split": split})
    kb = KnowledgeBase(seed, people, [str(s) for s in split_of], attrs, docs, facts,
                       questions, pretraining)
    _check_unique_answers(kb)
    return kb


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _check_unique_answers(kb: KnowledgeBase) -> None:
    """Generation invariant: no normalised answer belongs to two entities."""
    owner: dict[str, int] = {}
    for q in kb.questions:
        for ans in q.answers:
            key = normalize_answer(ans)
            if owner.setdefault(key, q.entity) != q.entity:
                raise AssertionError(f"answer {ans!r} shared by entities {owner[key]} and "
                                     f"{q.entity}")
