"""Does REALM pre-training teach the retriever? The paper's comparisons, on the generated KB.

Run (each stage is a `realm_jax.train` run in OUT/<start>/seed<s>/<stage>; a finished stage is
not run again, so an interrupted benchmark resumes):

    python benchmarks/realm_learning.py --starts minilm --seeds 0 1 2          # the demo's
    python benchmarks/realm_learning.py --starts scratch --seeds 0 1 2         # paper in mini
    python benchmarks/realm_learning.py --starts minilm --seeds 0 --arms none refresh
    python benchmarks/realm_learning.py --starts reading --seeds 0 1 2         # paper's recipe
    python benchmarks/realm_learning.py --starts reading --seeds 0 --realm-steps 60   # shorter
    python benchmarks/realm_learning.py --starts reading --seeds 0 --orqa-steps 80    # longer QA
    python benchmarks/realm_learning.py --starts small --seeds 0 1 2 --orqa-steps 80  # 2 layers

Starts (configs/demo_cpu.py):
  minilm   MiniLM as the retriever; the encoder MLM-warm-started from MiniLM (the demo);
  reading  the same with the paper's recipe: an encoder that reads (300 reading steps), ORQA's
           ICT (sentence removed), REALM by distillation with in-batch negatives;
  small    the reading recipe from MiniLM's first 2 layers: a small BERT that brings reading
           from pre-training, as the paper's BERT-base does, with a weaker ICT retriever;
  scratch  a 2-layer, 128-wide BERT: encoder MLM-trained on the corpus, retriever ICT-trained,
           from random init (the paper's setting in miniature).
Arms, each followed by the same ORQA fine-tuning:
  none       no REALM pre-training (ORQA from the warm starts: the paper's ORQA row);
  refresh    REALM pre-training with the index refreshed (`--refresh sync`: re-embedded
             in-process every `refresh.every_steps`, deterministic and not competing with the
             trainer for cores; `subprocess`: the demo's asynchronous refresher);
  norefresh  REALM pre-training with the index never refreshed (the staleness ablation).

ORQA's reader: MiniLM's own encoder for the minilm, reading and small starts (its first 2
layers for small; with the arm's retriever), REALM's encoder for the scratch start (`READERS`,
`stages.Pipeline.reader`).

Reported per start and arm, median and range over seeds: gold-block recall@5 and @1 (a person
has ~5 blocks: @5 saturates once the retriever finds the person, @1 asks for the block with the
fact) of held-out questions against a *fresh* index after pre-training (and before), held-out
retrieval utility (last and its rise), the same recall@1 of the held-out pre-training sentences
(REALM's own queries: what it teaches the retriever, beside what carries over to questions),
ORQA dev EM and answer recall; the ICT stage alone: fresh
recall@5 of the untrained vs the ICT-trained embedder. Writes OUT/realm_learning.json and
OUT/realm_learning.png (fresh recall@5, @1 and utility against step, every seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_utils  # noqa: E402
from bench_utils import cpu_model  # noqa: E402

from realm_jax import stages  # noqa: E402

# As stages.Pipeline.measure names them; then the ones _flatten derives.
MEASURED = ("recall_start", "recall_before", "recall_after", "recall_at_1_start",
            "recall_at_1_before", "recall_at_1_after", "gold_gain_before", "gold_gain_after",
            "teacher_gold_first_before", "teacher_gold_first_after",
            "fresh_gold_recall_at_1_before", "fresh_gold_recall_at_1_after")
METRICS = (*MEASURED, "utility_first", "utility_last", "em", "answer_recall")
# ORQA's reader per start (stages.Pipeline.reader): MiniLM's own encoder reads better than one
# warm-started on a CPU budget; the scratch start's own encoder is random, so REALM's.
READERS = {"minilm": "start", "reading": "start", "small": "start", "scratch": "realm"}
# The stage-length flags (--realm-steps, --orqa-steps) as `run` and its results name them,
# and the stage each sets.
LENGTHS = {"realm_steps": "REALM", "orqa_steps": "ORQA"}
# Sync refreshes every N REALM steps (None: the config's refresh.every_steps).
REFRESH_EVERY = {"minilm": 20, "reading": 10, "small": 10, "scratch": None}


def _summary(values: list[float]) -> dict[str, float]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v)),
            "n": len(v)}


def _flatten(arm_result: dict) -> dict[str, float]:
    utility = arm_result.get("utility_curve") or []
    recall = [v for k, v in arm_result.items() if k.startswith("answer_recall@")]
    return {
        **{m: arm_result.get(m, float("nan")) for m in MEASURED},
        "utility_first": utility[0][1] if utility else float("nan"),
        "utility_last": utility[-1][1] if utility else float("nan"),
        "em": arm_result["em"],
        "answer_recall": recall[0] if recall else float("nan"),
    }


def _steps(n: int) -> dict[str, int]:
    """A stage's length override (0: the config's; train.py checkpoints the last step)."""
    return {"train.steps": n} if n else {}


def run(out: str, starts: list[str], seeds: list[int], arms: list[str], refresh: str,
        overrides: dict, realm_steps: int = 0, orqa_steps: int = 0) -> dict:
    results: dict = {"cpu": cpu_model(), "arms": arms, "seeds": seeds, "refresh": refresh,
                     "overrides": overrides, "realm_steps": realm_steps or None,
                     "orqa_steps": orqa_steps or None, "runs": {}}
    # Both REALM arms' length and every arm's ORQA length (0: the config's); the warm starts
    # keep theirs.
    steps = _steps(realm_steps)
    for start in starts:
        for seed in seeds:
            t0 = time.time()
            realm_stage = dict(steps)
            if refresh == "sync":
                realm_stage["refresh.mode"] = "sync"
                if REFRESH_EVERY[start]:
                    realm_stage["refresh.every_steps"] = REFRESH_EVERY[start]
            pipeline = stages.Pipeline(
                "demo_cpu", os.path.join(out, start, f"seed{seed}"),
                start="" if start == "minilm" else start, seed=seed, overrides=overrides,
                stage_overrides={"": realm_stage, "norefresh": steps,
                                 "orqa": _steps(orqa_steps)}, train_retriever=True,
                progress=False, reader=READERS[start])
            per_arm = pipeline.run(tuple(arms))
            per_arm["ict"] = {}
            for k, suffix in ((5, ""), (1, "_at_1")):
                curve = stages.history(pipeline.dir("ict"), f"fresh_gold_recall_at_{k}")
                untrained, trained = stages.ends(curve)
                per_arm["ict"].update({f"recall{suffix}_untrained": untrained,
                                       f"recall{suffix}_trained": trained,
                                       f"curve{suffix}": curve})
            per_arm["timings"] = dict(pipeline.timings, wall_s=time.time() - t0)
            results["runs"].setdefault(start, {})[str(seed)] = per_arm
            _write(out, results)
    results["summary"] = summarize(results)
    _write(out, results)
    return results


def summarize(results: dict) -> dict:
    summary: dict = {}
    for start, by_seed in results["runs"].items():
        for arm in results["arms"]:
            rows = [_flatten(r[arm]) for r in by_seed.values() if arm in r]
            summary.setdefault(start, {})[arm] = {
                m: _summary([row[m] for row in rows]) for m in METRICS}
        icts = [r["ict"] for r in by_seed.values() if "ict" in r]
        if icts:
            summary[start]["ict"] = {
                k: _summary([x.get(k, float("nan")) for x in icts])
                for k in ("recall_untrained", "recall_trained", "recall_at_1_untrained",
                          "recall_at_1_trained")}
    return summary


def _write(out: str, results: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "realm_learning.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)


def table(results: dict) -> str:
    def cell(s: dict) -> str:
        if not s["n"]:
            return "–"
        return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"

    lengths = "".join(f"{stage} {results[key]} steps; " for key, stage in LENGTHS.items()
                      if results.get(key))
    lines = [f"CPU: {results['cpu']}; seeds {results['seeds']}; {lengths}median [min, max]", "",
             "| start | arm | fresh recall@5: start → after ICT → after REALM | "
             "fresh recall@1: the same | held-out utility first → last | gold block's gain "
             "(nats/token), teacher ranks it first: before → after REALM | held-out "
             "sentences' fresh recall@1: before → after REALM | ORQA dev EM | answer recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for start, arms in results["summary"].items():
        for arm in results["arms"]:
            s = arms[arm]
            lines.append(f"| {start} | {arm} | {cell(s['recall_start'])} → "
                         f"{cell(s['recall_before'])} → {cell(s['recall_after'])} | "
                         f"{cell(s['recall_at_1_start'])} → {cell(s['recall_at_1_before'])} → "
                         f"{cell(s['recall_at_1_after'])} | "
                         f"{cell(s['utility_first'])} → "
                         f"{cell(s['utility_last'])} | {cell(s['gold_gain_before'])} → "
                         f"{cell(s['gold_gain_after'])}; {cell(s['teacher_gold_first_before'])}"
                         f" → {cell(s['teacher_gold_first_after'])} | "
                         f"{cell(s['fresh_gold_recall_at_1_before'])} → "
                         f"{cell(s['fresh_gold_recall_at_1_after'])} | {cell(s['em'])} | "
                         f"{cell(s['answer_recall'])} |")
        if "ict" in arms:
            ict = arms["ict"]
            lines.append(f"| {start} | ICT alone: fresh recall untrained → trained | "
                         f"{cell(ict['recall_untrained'])} → {cell(ict['recall_trained'])} | "
                         f"{cell(ict['recall_at_1_untrained'])} → "
                         f"{cell(ict['recall_at_1_trained'])} | | | | | |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = list(results["runs"])
    fig, axes = plt.subplots(len(starts), 3, figsize=(16, 3.8 * len(starts)), squeeze=False)
    colours = {"refresh": "tab:blue", "norefresh": "tab:orange"}
    for row, start in enumerate(starts):
        left, middle, right = axes[row]
        for seed, per_arm in results["runs"][start].items():
            for arm, colour in colours.items():
                if arm not in per_arm:
                    continue
                label = f"{arm}" if seed == str(results["seeds"][0]) else None
                for key, ax in (("fresh_recall_curve", left),
                                ("fresh_recall_at_1_curve", middle), ("utility_curve", right)):
                    pts = per_arm[arm].get(key) or []
                    ax.plot([s for s, _ in pts], [v for _, v in pts], "-o", color=colour,
                            alpha=0.7, markersize=3, label=label)
        left.set(title=f"{start}: gold recall@5, held-out questions, fresh index",
                 xlabel="REALM pre-training step")
        middle.set(title=f"{start}: gold recall@1, the same", xlabel="REALM pre-training step")
        right.set(title=f"{start}: retrieval utility, held-out sentences (nats/token)",
                  xlabel="REALM pre-training step")
        for ax in (left, middle, right):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/realm_learning")
    parser.add_argument("--starts", nargs="+", default=["minilm", "scratch"],
                        choices=sorted(READERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(stages.ARMS), choices=stages.ARMS)
    parser.add_argument("--refresh", default="sync", choices=["sync", "subprocess"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every stage, e.g. train.batch_size=8")
    parser.add_argument("--realm-steps", type=int, default=0,
                        help="REALM pre-training steps of both arms (0: the config's)")
    parser.add_argument("--orqa-steps", type=int, default=0,
                        help="ORQA fine-tuning steps of every arm (0: the config's)")
    args = bench_utils.parse_args(parser)
    logging.basicConfig(level=logging.WARNING)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tf\"" else value
    for flag in LENGTHS:
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 0")
    results = run(args.out, args.starts, args.seeds, args.arms, args.refresh, overrides,
                  args.realm_steps, args.orqa_steps)
    print(table(results))
    plot(results, os.path.join(args.out, "realm_learning.png"))
    print(f"\nwrote {args.out}/realm_learning.json and realm_learning.png")


if __name__ == "__main__":
    main()
