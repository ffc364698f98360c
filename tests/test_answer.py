"""The `answer` command's output, on a stand-in model (no weights: `answer_all` only calls
`realm.answer`), so these run in milliseconds. The command on a real model: test_inference."""

import io
import json
import re

from realm_jax.answer import answer_all, from_arguments, read_lines
from realm_jax.inference import Answer, Retrieved


class FakeRealm:
    """Answers every question with the same span; an empty question gets an error Answer, as
    `Realm.answer(errors="return")` does."""

    def __init__(self, title="Origin", text="Darwin wrote it in 1859."):
        self.title, self.text = title, text

    def answer(self, questions, *, k=None, errors="raise"):
        assert errors == "return"
        out = []
        for q in questions:
            if not q.strip():
                out.append(Answer(question=q, text="", score=float("nan"), probability=0.0,
                                  block_id=-1, title="", block_text="", start_char=-1,
                                  end_char=-1, error="question is empty or whitespace-only"))
                continue
            text = self.text
            out.append(Answer(question=q, text="Darwin", score=3.5, probability=0.9, block_id=7,
                              title=self.title, block_text=text, start_char=0, end_char=6,
                              retrieval_score=1.25, block_rank=0,
                              retrieved=(Retrieved(7, self.title, text, 1.25),)))
        return out


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_json_output_is_strict_json_for_a_rejected_question():
    out, err = io.StringIO(), io.StringIO()
    status = answer_all(FakeRealm(), from_arguments(["who wrote it?", "   "]), out, err,
                        as_json=True, k=1)
    assert status == 1 and "error: argument 2" in err.getvalue()
    lines = out.getvalue().splitlines()
    records = [json.loads(line, parse_constant=_refuse) for line in lines]
    assert records[1]["error"] and records[1]["score"] is None
    assert records[0]["score"] == 3.5 and records[0]["retrieved"][0]["score"] == 1.25


def test_to_json_writes_null_for_every_non_finite_score():
    a = Answer(question="q", text="", score=float("inf"), probability=float("nan"), block_id=1,
               title="", block_text="", start_char=-1, end_char=-1,
               retrieval_score=float("-inf"), retrieved=(Retrieved(1, "", "", float("nan")),))
    d = a.to_json()
    assert d["score"] is d["probability"] is d["retrieval_score"] is None
    assert d["retrieved"][0]["score"] is None
    json.dumps(d, allow_nan=False)



# C0 controls but the line feeds that separate the output's lines, DEL, C1 controls.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")
HOSTILE = "\033]0;x\007\033[2J"  # retitle the terminal, then clear the screen


def test_text_output_is_printable_only():
    realm = FakeRealm(title="T\x9b1m", text="Darwin\x1b[31m wrote\r\nit\x00.")
    out, err = io.StringIO(), io.StringIO()
    items = from_arguments([f"who {HOSTILE}wrote it?", f"{HOSTILE} "])
    assert answer_all(realm, items, out, err, k=1) == 0
    text = out.getvalue() + err.getvalue()
    assert not RAW_CONTROL.search(text), repr(text)
    assert "Q: who \\x1b]0;x\\x07\\x1b[2Jwrote it?" in text  # shown escaped, not run
    assert '"T\\x9b1m"' in text and "Darwin\\x1b[31m wrote  it\\x00." in text

    stdin = io.BytesIO(b"\x00\x01\x1b[2J\xff\xfe binary?\n")  # a binary file's bytes
    out, err = io.StringIO(), io.StringIO()
    answer_all(realm, read_lines(stdin), out, err)
    assert not RAW_CONTROL.search(out.getvalue() + err.getvalue())


def test_json_output_escapes_every_control_character():
    question = f"who {HOSTILE}\x9b\x7fwrote it?"
    out, err = io.StringIO(), io.StringIO()
    answer_all(FakeRealm(title="T\x85"), from_arguments([question]), out, err, as_json=True)
    line = out.getvalue().rstrip("\n")
    assert "\n" not in line and not RAW_CONTROL.search(line), repr(line)
    record = json.loads(line, parse_constant=_refuse)
    assert record["question"] == question and record["title"] == "T\x85"
