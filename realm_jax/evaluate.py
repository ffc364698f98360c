"""Open-QA evaluation: exact match of the predicted answers and recall@k of the retrieval.

    python -m realm_jax.evaluate --config configs/X.py --workdir DIR [--split test]
    python -m realm_jax.evaluate --workdir DIR          # the QA data of DIR/config.json

Metrics: `realm_jax.evaluation` (exact_match, recall@k, gold_recall@k, num_examples).

The model, its corpus and its index come from the workdir (`Realm.load`); `--config` names only
the QA data (data.qa, data.qa_format, or the synthetic KB) and the defaults of --batch_size,
--k and --max_examples (config.eval). Writes predictions.jsonl (one line per question: the
answer, its evidence, the top-k block ids, whether each metric hit) and metrics.json into
--out_dir (default WORKDIR/eval/<split>-step<step>/) and prints the metrics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from absl import flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

from realm_jax import cli
from realm_jax.errors import UserError
from realm_jax.evaluation import check_counts, evaluate, write_results
from realm_jax.inference import Realm


def run(
    workdir: str,
    *,
    config=None,
    split: str = "test",
    step: int | None = None,
    k: int | None = None,
    batch_size: int | None = None,
    max_examples: int | None = None,
    out_dir: str | None = None,
    engine: str | None = None,
) -> tuple[dict[str, Any], epath.Path]:
    """What the command does: load, evaluate, write; returns (metrics, output directory)."""
    from realm_jax.data.loaders import load_qa_split

    check_counts(k=k, batch_size=batch_size, max_examples=max_examples)  # before loading
    overrides = {"retrieval.engine": engine} if engine else None
    realm = Realm.load(workdir, step, overrides=overrides, batch_size=batch_size)
    config = config if config is not None else realm.config
    qa_set = load_qa_split(config, split)
    k = int(config.eval.recall_k) if k is None else k
    metrics, predictions = evaluate(
        realm, qa_set, batch_size or int(config.eval.batch_size), k,
        max_examples=int(config.eval.max_examples) if max_examples is None else max_examples)
    metrics.update(split=split, step=realm.step, qa=qa_set.name, engine=realm.searcher.engine)
    out = write_results(out_dir or epath.Path(workdir) / "eval" / f"{split}-step{realm.step}",
                        metrics, predictions)
    return metrics, out


def _define_flags() -> None:
    """Flags are defined only when run as a command, so importing `evaluate` (the trainer does)
    never clashes with the importer's own --workdir."""
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config naming the QA data (default: the workdir's).")
    flags.DEFINE_string("workdir", None, "Training workdir or converted open-QA dir.")
    flags.DEFINE_string("split", "test", "QA split.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("k", None, "k of recall@k (default: config.eval.recall_k).",
                         lower_bound=1)
    flags.DEFINE_integer("batch_size", None, "Questions per batch (default: config.eval).",
                         lower_bound=1)
    flags.DEFINE_integer("max_examples", None, "Evaluate only the first N (0: all).",
                         lower_bound=0)
    flags.DEFINE_string("out_dir", None, "Output directory (WORKDIR/eval/<split>-step<N>).")
    flags.DEFINE_enum("engine", None, ["exact", "scann"], "Override retrieval.engine.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (evaluate takes only flags)")
    f = flags.FLAGS
    if not f["verbosity"].present:  # orbax logs every restore at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    metrics, out = run(f.workdir, config=f.config, split=f.split, step=f.step, k=f.k,
                       batch_size=f.batch_size, max_examples=f.max_examples,
                       out_dir=f.out_dir, engine=f.engine)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
