"""The retrieval corpus: documents → blocks of ≤ `max_block_wordpieces` wordpieces.

A block is what the retriever embeds, `[CLS] title [SEP] body [SEP]`, and it fits in
`max_block_wordpieces` (288 in REALM) *including* the title and the three special tokens, so
encoding a block at that length never cuts its body. Bodies pack whole sentences greedily; a
sentence longer than a block is split at word boundaries. The blocks of a document are slices
of its text, in order, separated only by whitespace: together they cover it exactly once.

Each block has `uid = sha1(title + UID_SEP + body)` (hex): the id by which a query's own block
is refused as a trivial retrieval. `BlockCorpus` gives random access to blocks from a TFDS
`realm_blocks` dataset (array_record, via `tfds.data_source`) or from memory; block i of the
corpus is row i of the embedding index, and `fingerprint` ties an index to its corpus.

Build from the command line (the converter):
  python -m realm_jax.data.blocks --source jsonl --path docs.jsonl --out DATA_DIR \
      --vocab VOCAB.txt [--max_block_wordpieces 288] [--name NAME] [--skip_bad]
  python -m realm_jax.data.blocks --source hf_block_records --path block_records.npy \
      --out DATA_DIR --vocab VOCAB.txt --allow_pickle
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from realm_jax import cli
from realm_jax.data import sources
from realm_jax.data.tokenizer import WordPiece, body_budget, clean_text, title_budget
from realm_jax.errors import UserError

UID_SEP = "\x1f"  # ASCII unit separator: cannot be confused with text in a title or body
UIDS_FILE = "uids.npy"  # sidecar [N, 20] uint8 written next to the TFDS files
STATS_FILE = "build_stats.json"


def block_uid(title: str, body: str) -> str:
    """sha1(title + UID_SEP + body) in hex: stable across sources, runs and machines."""
    return hashlib.sha1((title + UID_SEP + body).encode("utf-8")).hexdigest()


def fingerprint_of(digests: np.ndarray) -> str:
    """Stable hex fingerprint of a corpus: sha1 over its uids' 20-byte digests, in order."""
    return hashlib.sha1(np.ascontiguousarray(digests, np.uint8).tobytes()).hexdigest()


# --------------------------------------------------------------------------- sentences

# Words after which a period does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc ltd co corp mt no fig gen col lt sgt rev gov sen "
    "rep jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e u.s u.k a.m p.m approx ca"
    .split()
)
_END = re.compile(r"[.!?][\"'”’)\]]*(\s+)")
_NEXT_STARTS = re.compile(r"[\"'“‘(\[]?[A-Z0-9À-ÖØ-Þ]")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans (start, end) of `text`, without surrounding whitespace, in order.

    A sentence ends at . ! or ? followed by whitespace and an upper-case letter or digit
    (unless the word before is a known abbreviation or an initial), and at every line break.
    Only whitespace lies between consecutive spans.
    """
    cuts = [0]
    for m in _END.finditer(text):
        nxt = m.end()
        if "\n" in m.group(1):
            cuts.append(nxt)
            continue
        if nxt >= len(text) or not _NEXT_STARTS.match(text, nxt):
            continue
        start = m.start()
        while start > 0 and not text[start - 1].isspace():  # the word before the stop
            start -= 1
        w = text[start: m.start()].lower().rstrip(".")
        if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
            continue
        cuts.append(nxt)
    for m in re.finditer(r"\n", text):
        cuts.append(m.end())
    cuts = sorted(set(cuts)) + [len(text)]
    spans = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        stripped = piece.strip()
        if stripped:
            spans.append((a + lead, a + lead + len(stripped)))
    return spans


# --------------------------------------------------------------------------- chunking


@dataclasses.dataclass(frozen=True)
class Block:
    """One block: its title, body and uid, and where the body lies in its document."""

    title: str
    text: str
    uid: str
    doc: int  # index of the document in the input stream (empty documents included)
    start: int  # body == document_text[start:end]
    end: int


class Chunker:
    """Greedy sentence packing into blocks that fit `max_block_wordpieces` as encoded."""

    def __init__(self, tokenizer: WordPiece, max_block_wordpieces: int = 288,
                 batch_docs: int = 256):
        body_budget(title_budget(max_block_wordpieces), max_block_wordpieces)  # raises if tiny
        self.tok = tokenizer
        self.max_block_wordpieces = max_block_wordpieces
        self.batch_docs = batch_docs
        self._continuation = np.array(
            [t.startswith("##") for t in tokenizer._inverse], bool)

    def chunk(self, title: str, text: str) -> list[Block]:
        return list(self.chunk_documents([(title, text)]))

    def chunk_documents(
        self, docs: Iterable[tuple[str, str]], stats: sources.ReadStats | None = None
    ) -> Iterator[Block]:
        """Blocks of every non-empty document, in order; empty ones are counted and skipped.

        Lone surrogates are replaced by U+FFFD first (same length, so offsets hold).
        """
        stats = stats if stats is not None else sources.ReadStats()
        batch: list[tuple[int, str, str]] = []
        for i, (title, text) in enumerate(docs):
            stats.add("documents")
            if not text.strip():
                stats.add("empty_documents")
                continue
            batch.append((i, clean_text(title), clean_text(text)))
            if len(batch) >= self.batch_docs:
                yield from self._chunk_batch(batch, stats)
                batch = []
        if batch:
            yield from self._chunk_batch(batch, stats)

    def _chunk_batch(self, batch, stats) -> Iterator[Block]:
        spans = [split_sentences(text) for _, _, text in batch]
        sentences = [text[a:b] for (_, _, text), sp in zip(batch, spans, strict=True)
                     for a, b in sp]
        counts = iter(self.tok.count(sentences))
        title_lens = self.tok.count([title for _, title, _ in batch])
        for (doc, title, text), sp, t_len in zip(batch, spans, title_lens, strict=True):
            budget = body_budget(t_len, self.max_block_wordpieces)
            pieces: list[tuple[int, int, int]] = []  # (start, end, wordpieces)
            for a, b in sp:
                n = next(counts)
                if n <= budget:
                    pieces.append((a, b, n))
                else:
                    stats.add("split_sentences")
                    ids, offsets = self.tok.tokenize_with_offsets([text[a:b]])[0]
                    pieces += self._split_long(text, a, b, ids, offsets, budget)
            for start, end in _pack(pieces, budget):
                body = text[start:end]
                stats.add("blocks")
                yield Block(title, body, block_uid(title, body), doc, start, end)

    def _split_long(self, text, a, b, ids, offsets, budget) -> list[tuple[int, int, int]]:
        """Cut an over-long sentence at word starts (a word longer than a block at a piece)."""
        cont = self._continuation[np.asarray(ids)]
        cuts, first = [], 0
        while len(ids) - first > budget:
            cut = first + budget
            while cut > first + 1 and cont[cut]:
                cut -= 1
            if cont[cut]:  # a single word longer than the block: cut inside it
                cut = first + budget
            cuts.append(cut)
            first = cut
        bounds = [0, *cuts, len(ids)]
        out = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            start = a if lo == 0 else a + offsets[lo][0]
            end = b if hi == len(ids) else a + offsets[hi][0]
            end = start + len(text[start:end].rstrip())
            out.append((start, end, hi - lo))
        return out


def _pack(pieces: Sequence[tuple[int, int, int]], budget: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    cur_start, cur_end, used = None, None, 0
    for start, end, n in pieces:
        if cur_start is not None and used + n > budget:
            out.append((cur_start, cur_end))
            cur_start, used = None, 0
        if cur_start is None:
            cur_start = start
        cur_end, used = end, used + n
    if cur_start is not None:
        out.append((cur_start, cur_end))
    return out


# --------------------------------------------------------------------------- the corpus


class Uids(Sequence[str]):
    """The uid hex strings of a corpus, held as [N, 20] uint8 digests (13M uids ≈ 260 MB)."""

    def __init__(self, digests: np.ndarray):
        self.digests = digests

    def __len__(self) -> int:
        return len(self.digests)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [bytes(d).hex() for d in self.digests[i]]
        return bytes(self.digests[i]).hex()

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def hashes(self) -> np.ndarray:
        """[N] int64 from each uid's first 8 bytes: compare uids on device, vectorised."""
        return np.ascontiguousarray(self.digests[:, :8]).view(">i8")[:, 0].astype(np.int64)


def _digests(uids: Iterable[str]) -> np.ndarray:
    rows = [bytes.fromhex(u) for u in uids]
    return np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), 20).copy()


class BlockCorpus:
    """Random access to blocks, whatever their source: `corpus[i] -> {title, text, uid}`.

    Records built by `Chunker` / `realm_blocks` also carry `doc`, `start`, `end` (the body is
    `documents[doc].text[start:end]`), which ties facts in documents to blocks.
    """

    def __init__(self, source: Any, digests: np.ndarray, description: str = ""):
        if len(source) != len(digests):
            raise ValueError(f"{description}: {len(source)} blocks but {len(digests)} uids")
        self._source = source
        self._digests = digests
        self.description = description
        self.fingerprint = fingerprint_of(digests)

    @classmethod
    def from_blocks(cls, blocks: Sequence[Mapping[str, Any] | Block]) -> BlockCorpus:
        """An in-memory corpus; a missing uid is computed from title and text."""
        rows = []
        for b in blocks:
            b = dataclasses.asdict(b) if isinstance(b, Block) else b
            title, text = b.get("title", ""), b["text"]
            row = {"title": title, "text": text, "uid": b.get("uid") or block_uid(title, text)}
            row.update({k: int(b[k]) for k in _PLACE if k in b})
            rows.append(row)
        return cls(rows, _digests(r["uid"] for r in rows), f"{len(rows)} blocks in memory")

    @classmethod
    def load(cls, spec: str | epath.PathLike, data_dir: str | None = None) -> BlockCorpus:
        """A prepared `realm_blocks` dataset: its version directory (with dataset_info.json),
        a data_dir holding exactly one `realm_blocks/<config>/<version>`, or
        `tfds:realm_blocks/<config>` (with `data_dir`)."""
        s = str(spec)
        if s.startswith("tfds:"):
            root = epath.Path(data_dir or tfds.core.constants.DATA_DIR) / s[5:]
            versions = sorted(root.glob("*/dataset_info.json"))
            if not versions:
                raise FileNotFoundError(f"{spec}: nothing prepared under {root}")
            path = versions[-1].parent
        else:
            path = _find_prepared(epath.Path(s))
        source = tfds.builder_from_directory(str(path)).as_data_source(split="train")
        uid_file = path / UIDS_FILE
        if uid_file.exists():
            with uid_file.open("rb") as f:
                digests = np.load(f, allow_pickle=False)
        else:  # prepared by `tfds build`: scan once and keep the sidecar
            logging.info("%s: no %s, reading all uids once", path, UIDS_FILE)
            digests = _digests(_text(source[i]["uid"]) for i in range(len(source)))
            _save_npy(uid_file, digests)
        return cls(sources.DecodedSource(source, _record), digests, str(path))

    def __len__(self) -> int:
        return len(self._digests)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        return self._source[int(i) % len(self)]

    def get_many(self, indices: Iterable[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        if hasattr(self._source, "get_many"):
            return self._source.get_many(indices)
        return [self._source[i] for i in indices]

    @property
    def uids(self) -> Uids:
        return Uids(self._digests)

    def __repr__(self) -> str:
        return f"BlockCorpus({len(self)} blocks, {self.description}, {self.fingerprint[:12]})"


def _record(r: Mapping[str, Any]) -> dict[str, Any]:
    out = {"title": _text(r["title"]), "text": _text(r["text"]), "uid": _text(r["uid"])}
    out.update({k: int(r[k]) for k in _PLACE if k in r})
    return out


# Where a block came from (kept when known): its document's index and the body's char span.
_PLACE = ("doc", "start", "end")


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _find_prepared(path: epath.Path) -> epath.Path:
    if (path / "dataset_info.json").exists():
        return path
    found = sorted(p.parent for p in path.glob("realm_blocks/*/*/dataset_info.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{path} holds no prepared realm_blocks dataset "
                                "(no dataset_info.json); build one with build_corpus")
    raise ValueError(f"{path} holds several realm_blocks datasets, name one: "
                     f"{[str(p) for p in found]}")


def _save_npy(path: epath.Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array, allow_pickle=False)


# --------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass
class RealmBlocksConfig(tfds.core.BuilderConfig):
    """Where the documents come from and how they are cut.

    source: "jsonl" (a file or folder of `{"title","text"}` lines), "text" (a folder of .txt
    files), "tfds" (`path` names a prepared TFDS text dataset such as wikipedia/20230601.en),
    "hf_block_records" (HF REALM's block_records.npy, kept block for block so row i matches the
    released embeddings; needs allow_pickle), or "documents" (an in-process iterable, see
    `build_corpus`).
    """

    source: str = "jsonl"
    path: str = ""
    vocab_file: str = ""
    max_block_wordpieces: int = 288
    skip_bad: bool = False
    allow_pickle: bool = False
    tfds_data_dir: str = ""


class RealmBlocks(sources.LocalBuilder):
    """TFDS builder `realm_blocks`: one split, "train", the blocks in corpus order."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [RealmBlocksConfig(name="default")]

    def __init__(self, *args, documents: Iterable[tuple[str, str]] | None = None, **kwargs):
        self._documents = documents
        self.stats = sources.ReadStats()
        self.uids: list[str] = []  # as generated, for the sidecar (saves a re-read)
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="REALM retrieval blocks: [CLS] title [SEP] body [SEP] ≤ "
                        "max_block_wordpieces wordpieces, uid = sha1(title + \\x1f + body).",
            features=tfds.features.FeaturesDict({
                "title": tfds.features.Text(), "text": tfds.features.Text(),
                "uid": tfds.features.Text(), "doc": np.int64,
                "start": np.int64, "end": np.int64,
            }),
            disable_shuffling=True,  # block i of the files is block i of the corpus
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c: RealmBlocksConfig = self.builder_config
        for i, block in enumerate(self._blocks(c)):
            self.uids.append(block["uid"])
            yield i, block
        if not self.uids:  # else TFDS's "No examples were yielded", naming no file
            skipped = f" ({self.stats})" if self.stats.counts else ""
            raise UserError(f"{c.path}: no blocks: the {c.source} source holds no document "
                            f"with text{skipped}")

    def _blocks(self, c: RealmBlocksConfig) -> Iterator[dict[str, Any]]:
        if c.source == "hf_block_records":
            for i, text in enumerate(sources.hf_block_records(c.path, c.allow_pickle)):
                self.stats.add("blocks")
                yield {"title": "", "text": text, "uid": block_uid("", text), "doc": i,
                       "start": 0, "end": len(text)}
            return
        chunker = Chunker(WordPiece(c.vocab_file), c.max_block_wordpieces)
        for b in chunker.chunk_documents(self._iter_documents(c), self.stats):
            yield {"title": b.title, "text": b.text, "uid": b.uid, "doc": b.doc,
                   "start": b.start, "end": b.end}

    def _iter_documents(self, c: RealmBlocksConfig) -> Iterator[tuple[str, str]]:
        if c.source == "jsonl":
            return sources.jsonl_documents(c.path, c.skip_bad, self.stats)
        if c.source == "text":
            return sources.text_folder_documents(c.path, self.stats)
        if c.source == "tfds":
            return sources.tfds_documents(c.path, c.tfds_data_dir or None)
        if c.source == "documents" and self._documents is not None:
            return iter(self._documents)
        raise ValueError(f"unknown realm_blocks source {c.source!r}; accepted: jsonl, text, "
                         "tfds, hf_block_records, documents (with documents=…)")


def build_corpus(
    out_dir: epath.PathLike,
    *,
    source: str,
    path: str = "",
    vocab_file: epath.PathLike = "",
    max_block_wordpieces: int = 288,
    name: str | None = None,
    skip_bad: bool = False,
    allow_pickle: bool = False,
    documents: Iterable[tuple[str, str]] | None = None,
    tfds_data_dir: str = "",
) -> tuple[BlockCorpus, sources.ReadStats]:
    """Prepare a `realm_blocks` dataset under `out_dir` (array_record) and load it.

    Returns the corpus and what was skipped or repaired. Re-running with the same name reuses
    the prepared files.
    """
    name = name or f"{source}_{max_block_wordpieces}"
    config = RealmBlocksConfig(
        name=name, source=source, path=str(path), vocab_file=str(vocab_file),
        max_block_wordpieces=max_block_wordpieces, skip_bad=skip_bad,
        allow_pickle=allow_pickle, tfds_data_dir=tfds_data_dir)
    builder = RealmBlocks(config=config, data_dir=str(out_dir), file_format="array_record",
                          documents=documents)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    target = epath.Path(builder.data_dir)
    if not (target / UIDS_FILE).exists():
        src = builder.as_data_source(split="train")
        uids = builder.uids if len(builder.uids) == len(src) else (
            _text(src[i]["uid"]) for i in range(len(src)))
        _save_npy(target / UIDS_FILE, _digests(uids))
        (target / STATS_FILE).write_text(json.dumps(builder.stats.to_dict(), indent=2))
        logging.info("realm_blocks/%s: %s", name, builder.stats)
    stats = sources.ReadStats()
    if (target / STATS_FILE).exists():
        stats.counts.update(json.loads((target / STATS_FILE).read_text()))
    return BlockCorpus.load(target), stats


@cli.one_line_errors
def main(argv: Sequence[str] | None = None) -> None:
    """The command. Flags use underscores like every realm_jax command (`--allow_pickle`);
    the hyphenated spellings of earlier versions (`--allow-pickle`) are accepted as well."""
    p = argparse.ArgumentParser(description="Build a realm_blocks TFDS dataset (array_record).")

    def flag(name: str, **kwargs: Any) -> None:
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*names, **kwargs)

    flag("source", required=True, choices=["jsonl", "text", "tfds", "hf_block_records"])
    flag("path", required=True, help="file / folder / TFDS name of the documents")
    flag("out", required=True, help="TFDS data_dir to write into")
    flag("vocab", default="", help="BERT vocab.txt (not needed for HF records)")
    flag("max_block_wordpieces", type=int, default=288)
    flag("name", default=None)
    flag("skip_bad", action="store_true", help="skip and count malformed lines")
    flag("allow_pickle", action="store_true",
         help="let block_records.npy (a pickle) be read: only for trusted files")
    flag("tfds_data_dir", default="")
    a = p.parse_args(argv)
    if a.source != "hf_block_records" and not a.vocab:
        p.error("--vocab is required to cut documents into wordpiece blocks")
    corpus, stats = build_corpus(
        a.out, source=a.source, path=a.path, vocab_file=a.vocab,
        max_block_wordpieces=a.max_block_wordpieces, name=a.name, skip_bad=a.skip_bad,
        allow_pickle=a.allow_pickle, tfds_data_dir=a.tfds_data_dir)
    print(f"{corpus}\n{stats}")


if __name__ == "__main__":
    main()
