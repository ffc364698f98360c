"""The embedded default, end to end (`./launch/demo.sh`): REALM that learns, on a 2-core CPU.

    python -m realm_jax.demo [--workdir runs/demo] [--ablation]

On the generated knowledge base (fictional people: only retrieval can answer questions about
them), from MiniLM (configs/demo_cpu.py), the stages of `realm_jax.stages`:

  1. mlm: the knowledge-augmented encoder's warm start (MiniLM ships no MLM head): it learns
     to read a joined block; ict: the retriever's warm start (the Inverse Cloze Task);
  2. realm_refresh: REALM pre-training, the retriever frozen while the encoder learns to read,
     the refresher re-embedding the corpus as a subprocess while training goes on;
  3. orqa_refresh: ORQA fine-tuning from the pre-trained towers (frozen index of the
     pre-trained embedder), and orqa_start: the same fine-tuning from MiniLM itself, without
     any pre-training;
  4. answer one held-out question with its evidence, and print a table: gold-block recall@5
     of held-out questions against a fresh index before and after pre-training, dev EM with
     and without pre-training, index refreshes, wall time (also WORKDIR/demo_result.json).

The stages are configs/demo_cpu.py's `quick` ones (cut to 15 minutes on 2 cores without
AVX-512); `--full` runs its longer MiniLM stages, which benchmarks/realm_learning.py measures.
`--ablation` adds the paper's staleness ablation: the same pre-training with the index never
refreshed and its fine-tuning, ORQA from the warm starts alone (the paper's ORQA row), and a
plot of recall and retrieval utility against step (WORKDIR/refresh_ablation.png). A finished
stage is not run again (delete its directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from etils import epath

from realm_jax import compile_cache, stages
from realm_jax.data import loaders


def plot_curves(pipeline: stages.Pipeline, arms: list[str], out: epath.Path) -> None:
    """Fresh-index and live-index recall@5 and held-out retrieval utility against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        realm = pipeline.dir(f"realm_{arm}")
        for key, style in (("fresh_gold_recall_at_5", "-o"), ("gold_recall_at_5", ":x")):
            points = stages.history(realm, key)
            which = "fresh index" if key.startswith("fresh") else "live index"
            left.plot([s for s, _ in points], [v for _, v in points], style,
                      label=f"{arm}, {which}")
        points = stages.history(realm, "heldout_retrieval_utility")
        right.plot([s for s, _ in points], [v for _, v in points], "-o", label=arm)
    left.set(xlabel="pre-training step", ylabel="gold-block recall@5 (held-out questions)")
    right.set(xlabel="pre-training step", ylabel="retrieval utility, held-out (nats/token)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("REALM on the generated KB: refreshed vs never-refreshed index")
    fig.tight_layout()
    fig.savefig(str(out), dpi=110)
    plt.close(fig)


def run(workdir: epath.PathLike = "runs/demo", ablation: bool = False,
        question: str | None = None, full: bool = False, reading: bool = False
        ) -> dict[str, Any]:
    """`full`: the config's MiniLM stages (what benchmarks/realm_learning.py measures, ~14
    minutes on AVX-512 cores) instead of its `quick` ones (the 15-minute budget on AVX2).
    `reading`: the config's `reading` start, the paper's recipe with which REALM teaches the
    retriever (README "REALM that teaches the retriever"; ~35 minutes on AVX-512 cores
    estimated, ~28 measured before its REALM stage went from 60 to 120 steps)."""
    t0 = time.time()
    root = epath.Path(workdir)
    # ORQA's reader is MiniLM's encoder with the pre-trained retriever (README "REALM that
    # learns": an encoder warm-started on a CPU budget reads worse than MiniLM).
    start = "reading" if reading else "" if full else "quick"
    pipeline = stages.Pipeline("demo_cpu", root, start=start, train_retriever=True,
                               reader="start")
    pre = pipeline.cfg("")
    corpus = loaders.load_corpus(pre)
    print(f"[demo] corpus: {len(corpus)} blocks of ≤{pre.data.block_len} wordpieces "
          f"({pre.data.synthetic.num_entities} fictional people)", flush=True)
    realm_arms = ["refresh", "norefresh"] if ablation else ["refresh"]
    results = pipeline.run(("start", *realm_arms, *(("none",) if ablation else ())))

    from realm_jax.inference import Realm

    realm = Realm.load(pipeline.dir("orqa_refresh"))
    q = question or loaders.load_qa_split(pipeline.cfg("orqa"), "dev")[0]["question"]
    answer = realm.answer(q)
    main = results["refresh"]
    result: dict[str, Any] = {
        "blocks": len(corpus),
        "recall_at_5_before": main["recall_start"],
        "recall_at_5_after_ict": main["recall_before"],
        "recall_at_5_after": main["recall_after"],
        "recall_at_1_before": main["recall_at_1_start"],
        "recall_at_1_after_ict": main["recall_at_1_before"],
        "recall_at_1_after": main["recall_at_1_after"],
        "gold_gain_before": main["gold_gain_before"],
        "gold_gain_after": main["gold_gain_after"],
        "teacher_gold_first_before": main["teacher_gold_first_before"],
        "teacher_gold_first_after": main["teacher_gold_first_after"],
        "em_with_pretraining": main["em"],
        "em_without_pretraining": results["start"]["em"],
        "index_refreshes": main["index_refreshes"],
        "heldout_utility_curve": main["utility_curve"],
        **{k: v for k, v in pipeline.timings.items()},
    }
    if ablation:
        plot = root / "refresh_ablation.png"
        plot_curves(pipeline, realm_arms, plot)
        stale = results["norefresh"]
        result.update(recall_at_5_after_never_refreshed=stale["recall_after"],
                      recall_at_1_after_never_refreshed=stale["recall_at_1_after"],
                      em_never_refreshed=stale["em"], em_warm_starts_only=results["none"]["em"],
                      plot=str(plot))
    result["wall_s"] = time.time() - t0
    (root / "demo_result.json").write_text(json.dumps(result, indent=2))

    print(f"\nQ: {q}\nA: {answer.text}   (score {answer.score:.2f})")
    print(f"   evidence: [{answer.title}] {answer.block_text}")
    print("\n| measure (held-out people) | value |\n|---|---|")
    for when, key in (("before pre-training (MiniLM)", "before"),
                      ("after ICT (REALM's starting point)", "after_ict"),
                      ("after REALM pre-training", "after")):
        print(f"| gold-block recall@5 / @1, fresh index, {when} | "
              f"{result[f'recall_at_5_{key}']:.3f} / {result[f'recall_at_1_{key}']:.3f} |")
    print(f"| encoder reads: gold block's gain over none (nats/token); teacher ranks it first "
          f"(chance {1 / (pipeline.cfg('').retrieval.k - 1):.2f}), before → after REALM | "
          f"{result['gold_gain_before']:.3f} → {result['gold_gain_after']:.3f}; "
          f"{result['teacher_gold_first_before']:.2f} → "
          f"{result['teacher_gold_first_after']:.2f} |")
    print(f"| dev exact match, ORQA without pre-training | "
          f"{result['em_without_pretraining']:.3f} |")
    print(f"| dev exact match, ORQA after REALM pre-training (its retriever, MiniLM reader) | "
          f"{result['em_with_pretraining']:.3f} |")
    if ablation:
        print(f"| dev exact match, ORQA after ICT only (no REALM; MiniLM reader) | "
              f"{result['em_warm_starts_only']:.3f} |")
        print(f"| never-refreshed index: recall@5 / @1 after, dev EM | "
              f"{result['recall_at_5_after_never_refreshed']:.3f} / "
              f"{result['recall_at_1_after_never_refreshed']:.3f}, "
              f"{result['em_never_refreshed']:.3f} |")
    print(f"| index refreshes during pre-training | {result['index_refreshes']} |")
    print(f"| wall time | {result['wall_s'] / 60:.1f} min |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--ablation", action="store_true",
                        help="also pre-train with a never-refreshed index, and plot both")
    parser.add_argument("--question", default=None, help="the question to answer at the end")
    parser.add_argument("--full", action="store_true",
                        help="the longer MiniLM stages benchmarks/realm_learning.py measures "
                             "(about twice the default's time)")
    parser.add_argument("--reading", action="store_true",
                        help="the paper's recipe: an encoder that reads, ORQA's ICT, REALM by "
                             "distillation with in-batch negatives (about 4x the default's time)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    compile_cache.enable()
    run(args.workdir, args.ablation, args.question, args.full, args.reading)


if __name__ == "__main__":
    main()
