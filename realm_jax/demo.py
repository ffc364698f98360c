"""The embedded default, end to end (`./launch/demo.sh`): REALM learns to retrieve on a 2-core CPU.

    python -m realm_jax.demo [--workdir runs/demo] [--ablation]

On the generated knowledge base (fictional people: only retrieval can answer questions about
them) with MiniLM as the initial embedder and encoder (configs/demo_cpu.py):

  1. pre-train (realm_mlm) with the refresher running as a subprocess, re-embedding the
     corpus from each new checkpoint while training goes on;
  2. fine-tune (orqa) on the train entities' questions, from the pre-trained towers, against a
     frozen index built by the pre-trained embedder;
  3. evaluate on held-out entities (dev split) and answer one question with its evidence;
  4. print a table: gold-block recall@5 before and after pre-training, dev EM after
     fine-tuning, index refreshes, wall time.

`--ablation` also runs the paper's staleness ablation: the same pre-training with the index
never refreshed, and plots gold recall@5 against step for both runs into
WORKDIR/refresh_ablation.png. A finished phase is not run again (delete its directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from realm_jax import checkpoints, defaults, sharding
from realm_jax.data import loaders
from realm_jax.retrieval import store
from realm_jax.retrieval.searcher import open_searcher
from realm_jax.tasks.common import QueryEncoder, gold_recall
from realm_jax.train import train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "demo_cpu.py")


def _config(arg: str, **overrides: Any) -> ml_collections.ConfigDict:
    return defaults.load_config(f"{CONFIG}:{arg}" if arg else CONFIG, overrides)


def _finished(workdir: epath.Path, steps: int) -> bool:
    """A phase is done when its metrics log reached its last step (resume otherwise)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return False
    return any(json.loads(x).get("step") == steps for x in path.read_text().splitlines())


def _phase(name: str, config: ml_collections.ConfigDict, workdir: epath.Path) -> float:
    if _finished(workdir, config.train.steps):
        print(f"[demo] {name}: already done in {workdir}")
        return 0.0
    print(f"[demo] {name}: {config.task}, {config.train.steps} steps → {workdir}", flush=True)
    t0 = time.time()
    train(config, workdir)
    return time.time() - t0


def recall_at(config: ml_collections.ConfigDict, embedder_params: Any, index_dir: epath.Path,
              index_step: int, split: str = "dev", k: int = 5) -> float:
    """Gold-block recall@k of `split` questions: the questions embedded with
    `embedder_params`, searched in version `index_step` of `index_dir`'s index."""
    mesh = sharding.make_mesh(dict(config.mesh))
    qa = loaders.load_qa_split(config, split)
    rows = [qa[i] for i in range(len(qa))]
    searcher = open_searcher(store.load_version(index_dir, index_step), config, mesh)
    return gold_recall(QueryEncoder(config, mesh), embedder_params, searcher,
                       loaders.load_tokenizer(config), [r["question"] for r in rows],
                       np.array([r["gold_block"] for r in rows]), k, config.data.query_len)


def _evals(workdir: epath.Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if r.get("kind") == "eval" and key in r]


def plot_ablation(runs: dict[str, epath.Path], out: epath.Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, workdir in runs.items():
        points = _evals(workdir, key)
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("gold-block recall@5 (dev questions, current index)")
    ax.set_title("REALM on the generated KB: refreshed vs stale index")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(out), dpi=120)
    plt.close(fig)


def run(workdir: epath.PathLike = "runs/demo", ablation: bool = False,
        question: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    root = epath.Path(workdir)
    pre_dir, ft_dir = root / "pretrain", root / "orqa"
    pre = _config("")
    ft = _config("orqa", **{"init.path": str(pre_dir.resolve())})
    corpus = loaders.load_corpus(pre)
    print(f"[demo] corpus: {len(corpus)} blocks of ≤{pre.data.block_len} wordpieces "
          f"({pre.data.synthetic.num_entities} fictional people)", flush=True)

    timings = {"pretrain_s": _phase("pre-training", pre, pre_dir)}
    if ablation:
        timings["pretrain_norefresh_s"] = _phase("ablation (index never refreshed)",
                                                 _config("norefresh"), root / "norefresh")
    timings["finetune_s"] = _phase("fine-tuning", ft, ft_dir)

    # Recall before: MiniLM on the initial index (the trainer's step-0 evaluation, eval.at_start:
    # the refresher may have pruned index v0 since). After: the pre-trained embedder on the
    # index it built for fine-tuning (a full fresh re-embedding, not the last stale version).
    start = _evals(pre_dir, "gold_recall_at_5")
    if not start or start[0][0] != 0:
        raise RuntimeError(f"{pre_dir / 'metrics.jsonl'} has no step-0 evaluation: delete "
                           f"{pre_dir} and run the demo again")
    before = start[0][1]
    _, towers = checkpoints.load_pretrained(pre_dir)
    after = recall_at(pre, jax.device_put(towers["embedder"]), ft_dir, 0)
    swaps = [json.loads(x).get("index_swaps", 0)
             for x in (pre_dir / "metrics.jsonl").read_text().splitlines()]
    dev_em = _evals(ft_dir, "exact_match")[-1][1]  # the trainer's final evaluation

    from realm_jax.inference import Realm

    realm = Realm.load(ft_dir)
    q = question or loaders.load_qa_split(ft, "dev")[0]["question"]
    answer = realm.answer(q)
    result = {
        "blocks": len(corpus),
        "gold_recall_at_5_before": before,
        "gold_recall_at_5_after": after,
        "dev_exact_match": float(dev_em),
        "index_refreshes": int(max(swaps, default=0)),
        "wall_s": time.time() - t0,
        **timings,
    }
    if ablation:
        plot = root / "refresh_ablation.png"
        plot_ablation({"refreshed (subprocess refresher)": pre_dir,
                       "never refreshed": root / "norefresh"}, plot, "gold_recall_at_5")
        stale = _evals(root / "norefresh", "gold_recall_at_5")
        fresh = _evals(pre_dir, "gold_recall_at_5")
        result.update(final_recall_refreshed=fresh[-1][1],
                      final_recall_never_refreshed=stale[-1][1], plot=str(plot))
    (root / "demo_result.json").write_text(json.dumps(result, indent=2))

    print(f"\nQ: {q}\nA: {answer.text}   (score {answer.score:.2f})")
    print(f"   evidence: [{answer.title}] {answer.block_text}")
    print("\n| measure | value |\n|---|---|")
    print(f"| gold-block recall@5, dev questions, MiniLM init | {before:.3f} |")
    print(f"| gold-block recall@5, dev questions, after pre-training | {after:.3f} |")
    print(f"| dev exact match after fine-tuning (held-out people) | "
          f"{result['dev_exact_match']:.3f} |")
    print(f"| index refreshes during pre-training | {result['index_refreshes']} |")
    if ablation:
        print(f"| final recall@5 against the live index: refreshed / never refreshed | "
              f"{result['final_recall_refreshed']:.3f} / "
              f"{result['final_recall_never_refreshed']:.3f} |")
    print(f"| wall time | {result['wall_s'] / 60:.1f} min |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--ablation", action="store_true",
                        help="also pre-train with a never-refreshed index and plot both")
    parser.add_argument("--question", default=None, help="the question to answer at the end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run(args.workdir, args.ablation, args.question)


if __name__ == "__main__":
    main()
