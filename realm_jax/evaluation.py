"""Open-QA evaluation of a model: answer every question of a QA set, score the answers and the
retrieval. The `evaluate` command and ORQA's evaluation during training both call it.

Metrics (DESIGN §1 "Evaluation"):
  exact_match    the official SQuAD / NQ-open EM of the predicted answer text (lower-case, no
                 punctuation, no articles); CuratedTrec's answers are regular expressions
                 (`data.qa.answer_match`);
  recall@k       share of questions with an answer-bearing block among the top k retrieved —
                 a block bears an answer when the normalised answer occurs in its normalised
                 text as whole words (a regex answer: `re.search` in the raw text), the "has
                 answer" test of ORQA / DPR retrieval accuracy;
  gold_recall@k  share whose gold block is among the top k (only sets that know it: synthetic);
  num_examples.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from etils import epath

from realm_jax.data.qa import QaSet, answer_match, has_answer
from realm_jax.inference import Realm

log = logging.getLogger(__name__)


def evaluate(
    realm: Realm,
    qa_set: QaSet,
    batch_size: int = 64,
    k: int = 5,
    *,
    max_examples: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer every question of `qa_set` and score the answers and the retrieval.

    Args:
      realm: the model (`Realm.load`, or the trainer's live one).
      qa_set: the questions and their gold answers (`is_regex` for CuratedTrec).
      batch_size: questions per call to `realm.answer`.
      k: the k of recall@k (the reader still reads `orqa.reader_beam_size` blocks).
      max_examples: evaluate only the first this many questions (0: all).

    Returns:
      (metrics, predictions): metrics as in the module docstring, all floats except
      num_examples; one prediction dict per question, in order. An invalid question (empty)
      counts as a miss and its prediction carries the error.
    """
    check_counts(k=k, batch_size=batch_size, max_examples=max_examples)
    n = len(qa_set) if max_examples == 0 else min(max_examples, len(qa_set))
    predictions: list[dict[str, Any]] = []
    t0 = time.time()
    for start in range(0, n, batch_size):
        rows = [qa_set[i] for i in range(start, min(n, start + batch_size))]
        answers = realm.answer([r["question"] for r in rows], k=k, errors="return")
        for i, (row, a) in enumerate(zip(rows, answers, strict=True)):
            top = [r.block_id for r in a.retrieved[:k]]
            bearing = [has_answer(r.text, row["answers"], qa_set.is_regex)
                       for r in a.retrieved[:k]]
            gold = row["gold_block"]
            predictions.append({
                "index": start + i, "question": row["question"], "answers": row["answers"],
                "prediction": a.text, "score": a.score, "probability": a.probability,
                "block_id": a.block_id, "title": a.title, "start_char": a.start_char,
                "end_char": a.end_char, "truncated": a.truncated, "error": a.error,
                "exact_match": bool(not a.error
                                    and answer_match(a.text, row["answers"], qa_set.is_regex)),
                "retrieved": top, "answer_bearing": bearing, "recall": any(bearing),
                "gold_block": gold, "gold_retrieved": bool(gold >= 0 and gold in top),
            })
    metrics = _metrics(predictions, k)
    metrics["seconds"] = round(time.time() - t0, 3)
    log.info("evaluated %d questions of %s: %s", n, qa_set.name, metrics)
    return metrics, predictions


def check_counts(*, k: int | None = None, batch_size: int | None = None,
                 max_examples: int | None = None) -> None:
    """A ValueError naming the first count out of range (None: not given, the config's)."""
    for name, value, least in (("k", k, 1), ("batch_size", batch_size, 1),
                               ("max_examples", max_examples, 0)):
        if value is not None and value < least:
            meaning = " (0: all)" if name == "max_examples" else ""
            raise ValueError(f"{name}={value}: must be at least {least}{meaning}")


def _metrics(predictions: list[dict[str, Any]], k: int) -> dict[str, Any]:
    n = len(predictions)
    mean = lambda key: sum(p[key] for p in predictions) / n if n else 0.0  # noqa: E731
    metrics: dict[str, Any] = {"exact_match": mean("exact_match"), f"recall@{k}": mean("recall"),
                               "num_examples": n}
    with_gold = [p for p in predictions if p["gold_block"] >= 0]
    if with_gold:
        metrics[f"gold_recall@{k}"] = sum(p["gold_retrieved"] for p in with_gold) / len(with_gold)
    errors = sum(bool(p["error"]) for p in predictions)
    if errors:
        metrics["invalid_questions"] = errors
    return metrics


def write_results(out_dir: epath.PathLike, metrics: dict[str, Any],
                  predictions: list[dict[str, Any]]) -> epath.Path:
    """predictions.jsonl + metrics.json under `out_dir` (created)."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out
