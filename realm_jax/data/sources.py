"""Raw inputs → (title, text) documents and JSON records, with bad input answered clearly.

Every reader reports what it skipped or repaired in a `ReadStats` instead of failing late or
silently: a malformed JSONL line raises with `file:line` and the reason (or, with
`skip_bad=True`, is skipped and counted); invalid UTF-8 is replaced (U+FFFD) and counted; empty
documents are skipped and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from realm_jax.data.tokenizer import clean_text


@dataclasses.dataclass
class ReadStats:
    """Counters of what a reader skipped or repaired; `str()` is a one-line summary."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def __getitem__(self, key: str) -> int:
        return self.counts[key]

    def to_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items()) or "nothing to report"


class BadInputError(ValueError):
    """A malformed input record; the message starts with `file:line:`."""


def decode_utf8(raw: bytes, stats: ReadStats | None = None) -> str:
    """UTF-8 bytes → str; invalid sequences become U+FFFD and are counted, never raised."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if stats is not None:
            stats.add("invalid_utf8_lines")
        return raw.decode("utf-8", errors="replace")


def read_jsonl(
    path: epath.PathLike,
    validate: Callable[[Any], dict[str, Any]] | None = None,
    skip_bad: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file, each passed through `validate` (which raises ValueError).

    Raises BadInputError("file:line: reason") on the first bad line unless `skip_bad`, which
    skips and counts it (`stats["bad_lines"]`). Blank lines are ignored.
    """
    path = epath.Path(path)
    stats = stats if stats is not None else ReadStats()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = decode_utf8(raw, stats)
            try:
                record = json.loads(line)
                if "\\ud" in line.lower():  # an escaped lone surrogate: unencodable later
                    record = _clean_strings(record)
                    stats.add("lone_surrogates_replaced")
                if validate is not None:
                    record = validate(record)
            except (ValueError, TypeError, KeyError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                if not skip_bad:
                    raise BadInputError(f"{path}:{lineno}: {reason}") from e
                stats.add("bad_lines")
                logging.debug("%s:%d skipped: %s", path, lineno, reason)
                continue
            yield record


def _clean_strings(x: Any) -> Any:
    if isinstance(x, str):
        return clean_text(x)
    if isinstance(x, list):
        return [_clean_strings(v) for v in x]
    if isinstance(x, dict):
        return {k: _clean_strings(v) for k, v in x.items()}
    return x


def _document(record: Any) -> dict[str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with 'title' and 'text', got {type(record).__name__}")
    text = record.get("text", record.get("body"))
    if not isinstance(text, str):
        raise ValueError("field 'text' is missing or not a string")
    title = record.get("title", "")
    if not isinstance(title, str):
        raise ValueError("field 'title' is not a string")
    return {"title": title, "text": text}


def jsonl_documents(
    path: epath.PathLike, skip_bad: bool = False, stats: ReadStats | None = None
) -> Iterator[tuple[str, str]]:
    """(title, text) of each `{"title", "text"}` line of a JSONL file or a folder of them."""
    path = epath.Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    for f in files:
        for rec in read_jsonl(f, _document, skip_bad, stats):
            yield rec["title"], rec["text"]


def text_folder_documents(
    path: epath.PathLike, stats: ReadStats | None = None
) -> Iterator[tuple[str, str]]:
    """One document per `*.txt` file under `path` (sorted), titled by its name (`_` → space)."""
    for f in sorted(_walk_txt(epath.Path(path))):
        yield f.stem.replace("_", " "), decode_utf8(f.read_bytes(), stats)


def _walk_txt(root: epath.Path) -> Iterator[epath.Path]:
    """`*.txt` under root, recursively (epath's glob refuses `**`, costly on GCS)."""
    for p in root.iterdir():
        if p.is_dir():
            yield from _walk_txt(p)
        elif p.name.endswith(".txt"):
            yield p


def tfds_documents(name: str, data_dir: str | None = None, split: str = "train"
                   ) -> Iterator[tuple[str, str]]:
    """(title, text) of a locally prepared TFDS text dataset such as `wikipedia/20230601.en`.

    Reads through `tfds.data_source` (array_record, no TensorFlow); the dataset must have been
    prepared with `file_format=array_record` (nothing is downloaded here).
    """
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not prepared"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared under {data_dir or 'the default data_dir'} "
            "as array_record; prepare it first (tfds build … --file_format=array_record)"
        ) from e
    for i in range(len(source)):
        rec = source[i]
        yield _as_str(rec.get("title", b"")), _as_str(rec["text"])


def hf_block_records(path: epath.PathLike, allow_pickle: bool = False) -> Iterator[str]:
    """Blocks of Hugging Face REALM's `block_records.npy` (an object array of byte strings).

    That file is a pickle, so it is read only when the caller passes `allow_pickle=True`
    (the converters' explicit `--allow_pickle` flag); the runtime never unpickles.
    """
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickled object array; reading it executes code from the file. Pass "
            "--allow_pickle (allow_pickle=True) only for a file you trust"
        )
    records = np.load(str(path), allow_pickle=True)
    for r in records:
        yield _as_str(r)


def _as_str(x: Any) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes | np.bytes_) else str(x)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our TFDS builders: generated from local files, nothing downloaded.

    `code_path` is given directly: TFDS's default lookup for a builder inside a package
    imports `importlib_resources`, which is not among our dependencies.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


class DecodedSource:
    """A TFDS data source (array_record) whose raw records come back decoded by `decode`.

    `get_many` makes one batched array_record read, several times faster than item by item.
    """

    def __init__(self, source: Any, decode: Callable[[Any], dict[str, Any]]):
        self._source = source
        self._decode = decode

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._decode(self._source[int(i)])

    def get_many(self, indices: Iterable[int]) -> list[dict[str, Any]]:
        return [self._decode(r) for r in self._source.__getitems__([int(i) for i in indices])]
