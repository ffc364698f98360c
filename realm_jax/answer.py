r"""Answer questions from the command line, with the evidence each answer comes from.

    python -m realm_jax.answer --workdir DIR "who wrote the origin of species?"
    python -m realm_jax.answer --workdir DIR < questions.txt         # one question per line
    python -m realm_jax.answer --workdir DIR --json "q1" "q2"        # JSON lines

DIR is a training workdir or a converted Hugging Face REALM open-QA directory (`Realm.load`).
Bad input never stops the others: an empty question is reported on stderr and the exit status
is 1; a line that is not valid UTF-8 is reported and answered with its undecodable bytes
replaced (U+FFFD); an over-long question is truncated and noted. Questions are answered in
batches of --batch_size, and printed in input order as each batch completes.

Output is printable text only: a control character in a question or a block (an escape
sequence that would retitle or clear the terminal, a binary file's bytes) is shown escaped,
`\x1b` / `\x07` / `\x9b`, and tabs and line breaks become spaces. JSON lines escape them as
`\u001b` (strict JSON; never `NaN`: a rejected question's score is `null`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from absl import flags
from absl import logging as absl_logging

from realm_jax import cli
from realm_jax.data.sources import ReadStats, decode_utf8
from realm_jax.inference import Answer, Realm

SNIPPET_CHARS = 100  # context shown on each side of the answer span


# (question, where it came from, warning): the unit the command answers.
Item = tuple[str, str, str]

# C0 controls, DEL and C1 controls (U+0080-U+009F: a terminal may read U+009B as CSI).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_C1_AND_DEL = re.compile(r"[\x7f-\x9f]")  # json.dumps(ensure_ascii=False) leaves these raw


def printable(text: str) -> str:
    r"""`text` safe to print on a terminal: whitespace controls become a space, every other
    control character its escape (ESC -> `\x1b`), so no escape sequence reaches the screen."""
    return _CONTROL.sub(lambda m: " " if m.group() in "\t\n\r" else
                        repr(m.group())[1:-1], text)


def json_line(record: dict[str, Any]) -> str:
    """One line of strict JSON with no raw control character (C0 are escaped by json)."""
    line = json.dumps(record, ensure_ascii=False, allow_nan=False)
    return _C1_AND_DEL.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def read_lines(stream: IO[bytes]) -> Iterator[Item]:
    """One item per input line; invalid UTF-8 is replaced and warned about."""
    for lineno, raw in enumerate(stream, 1):
        stats = ReadStats()
        text = decode_utf8(raw.rstrip(b"\r\n"), stats)
        warning = ("not valid UTF-8: undecodable bytes replaced by U+FFFD"
                   if stats["invalid_utf8_lines"] else "")
        yield text, f"input line {lineno}", warning


def from_arguments(questions: Sequence[str]) -> list[Item]:
    return [(q, f"argument {i}", "") for i, q in enumerate(questions, 1)]


def snippet(a: Answer, chars: int = SNIPPET_CHARS) -> str:
    """The answer inside its block's text, marked «like this», with some context."""
    if a.start_char < 0:
        return a.block_text[: 2 * chars]
    lo, hi = max(0, a.start_char - chars), min(len(a.block_text), a.end_char + chars)
    return ("…" if lo else "") + (
        f"{a.block_text[lo:a.start_char]}«{a.text}»{a.block_text[a.end_char:hi]}"
    ) + ("…" if hi < len(a.block_text) else "")


def format_answer(a: Answer, warning: str = "", show_retrieved: bool = False) -> str:
    p = printable
    lines = [f"Q: {p(a.question)}"]
    if warning:
        lines.append(f"   note: {p(warning)}")
    if a.truncated:
        lines.append("   note: the question was truncated to data.query_len wordpieces")
    lines.append(f"A: {p(a.text)}    (score {a.score:.3f}, p={a.probability:.3f})")
    title = f' "{p(a.title)}"' if a.title else ""
    lines.append(f"   evidence: block {a.block_id}{title} (retrieval rank {a.block_rank + 1}, "
                 f"chars {a.start_char}-{a.end_char}):")
    lines.append(f"   {p(snippet(a))}")
    if show_retrieved:
        for rank, r in enumerate(a.retrieved, 1):
            head = f"{r.title}: " if r.title else ""
            lines.append(f"   [{rank}] block {r.block_id} ({r.score:.3f}) "
                         f"{p(head + r.text[:80])}")
    return "\n".join(lines) + "\n"


def answer_all(
    realm: Realm,
    questions: Iterable[Item],
    out: IO[str],
    err: IO[str],
    *,
    as_json: bool = False,
    k: int | None = None,
    batch_size: int = 64,
) -> int:
    """Answer the items in batches and print them; returns the exit status (1: some question
    was invalid)."""
    status = 0
    batch: list[Item] = []

    def flush() -> None:
        nonlocal status
        answers = realm.answer([q for q, _, _ in batch], k=k, errors="return")
        for (_, where, warning), a in zip(batch, answers, strict=True):
            if warning:
                print(f"warning: {where}: {printable(warning)}", file=err)
            if a.error:
                print(f"error: {where}: {printable(a.error)}", file=err)
                status = 1
                if not as_json:
                    continue
            if as_json:
                record: dict[str, Any] = a.to_json()
                record["warning"] = warning
                if k is None:
                    record.pop("retrieved")
                out.write(json_line(record) + "\n")
            else:
                out.write(format_answer(a, warning, show_retrieved=k is not None) + "\n")
        out.flush()
        batch.clear()

    for item in questions:
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return status


def _define_flags() -> None:
    """Defined only when run as a command, so importing this module defines no flags."""
    flags.DEFINE_string("workdir", None, "Training workdir or converted open-QA dir.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_bool("json", False, "Write one JSON object per question.")
    flags.DEFINE_integer("k", None, "Also list the top-k retrieved blocks.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 64, "Questions per batch.", lower_bound=1)
    flags.DEFINE_enum("engine", None, ["exact", "scann"], "Override retrieval.engine.")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    if not f["verbosity"].present:  # keep the answers readable: library logs only on errors
        absl_logging.set_verbosity(absl_logging.ERROR)
    overrides = {"retrieval.engine": f.engine} if f.engine else None
    realm = Realm.load(f.workdir, f.step, overrides=overrides, batch_size=f.batch_size)
    questions = from_arguments(argv[1:]) if len(argv) > 1 else read_lines(sys.stdin.buffer)
    sys.exit(answer_all(realm, questions, sys.stdout, sys.stderr, as_json=f.json, k=f.k,
                        batch_size=f.batch_size))


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
