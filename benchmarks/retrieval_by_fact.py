"""Where a REALM or ICT workdir's retriever sends the generated KB's held-out queries, by fact.

    python benchmarks/retrieval_by_fact.py WORKDIR [--step N] [--out FILE.json]

Why: recall of the dev questions alone cannot tell whether REALM failed to teach the retriever
or taught it something the questions do not share. This measures, against a fresh exact index
of the workdir's block tower, gold-block recall@1 and @5 of
  * the eval split's questions, and
  * the same people's pre-training sentences, masked as REALM queries them (every fact,
    whatever `data.synthetic.pretrain_attributes` trained on),
each overall and per fact, and how often top-1 is the person's first block (title, birth
year, occupation) beside how often the first block is gold: README "a small BERT that reads"
found a 2-layer retriever sending 92 % of the questions there after REALM.
Prints a table; writes JSON (default WORKDIR/retrieval_by_fact-step<N>.json).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_utils  # noqa: E402

from realm_jax import defaults, restore, sharding  # noqa: E402
from realm_jax.data import loaders, synthetic  # noqa: E402
from realm_jax.data.joins import tokenize_corpus  # noqa: E402
from realm_jax.data.pipeline import PretrainBatcher  # noqa: E402
from realm_jax.data.tokenizer import Encoded  # noqa: E402
from realm_jax.tasks import make_task  # noqa: E402
from realm_jax.tasks.common import fresh_searcher  # noqa: E402

KS = (1, 5)


def by_fact(ids: np.ndarray, gold: np.ndarray, facts: Sequence[str], first_block: np.ndarray
            ) -> dict:
    """ids [N, ≥5] search results, gold [N] block ids, facts [N] names, first_block [num_blocks]
    the first block of each block's page → recall@k overall and per fact, first-block shares."""
    rank = np.where(ids == gold[:, None], np.arange(ids.shape[1]), ids.shape[1]).min(-1)  # [N]
    out: dict = {"all": {f"recall@{k}": float((rank < k).mean()) for k in KS}, "n": len(gold)}
    groups = collections.defaultdict(list)
    for i, fact in enumerate(facts):
        groups[fact].append(i)
    for fact, rows in sorted(groups.items()):
        out[fact] = {f"recall@{k}": float((rank[rows] < k).mean()) for k in KS}
    out["top1_first_block"] = float((ids[:, 0] == first_block[ids[:, 0]]).mean())
    out["gold_first_block"] = float((gold == first_block[gold]).mean())
    return out


def measure(workdir: str, step: int | None = None) -> dict:
    config = defaults.load_config(os.path.join(workdir, "config.json"), None)
    if not loaders.is_synthetic(config):
        raise SystemExit(f"{workdir}: not a generated-KB run (data.corpus="
                         f"{config.data.corpus!r}); the facts are the generated KB's")
    tok = loaders.load_tokenizer(config)
    corpus = loaders.load_corpus(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    blocks = tokenize_corpus(corpus, tok)
    task = make_task(config, mesh, corpus, blocks, tok)
    with restore.reading(workdir) as manager:
        step, towers = restore.read_towers(manager, step, lambda names: dict.fromkeys(names))
    searcher = fresh_searcher(config, mesh, towers["embedder"], blocks)
    query_params = towers.get("query_embedder", towers["embedder"])
    titles = [r["title"] for r in corpus.get_many(range(len(corpus)))]
    first_of_title: dict[str, int] = {}
    for i, title in enumerate(titles):
        first_of_title.setdefault(title, i)
    first_block = np.array([first_of_title[t] for t in titles])  # [num_blocks]

    data = loaders.load_synthetic(config)
    split = config.eval.split
    questions = data.kb.questions_for(split)
    qa = data.qa(split)
    enc = tok.encode_queries([qa[i]["question"] for i in range(len(qa))],
                             int(config.data.query_len))
    ids, _ = searcher.search(task.queries.embed(query_params, enc), max(KS))
    result = {"workdir": workdir, "step": step, "split": split,
              "questions": by_fact(ids, np.array([qa[i]["gold_block"] for i in range(len(qa))]),
                                   [q.attribute for q in questions], first_block)}

    sentences = data.sentences((split,), synthetic.PRETRAIN_ATTRIBUTES)
    kept = [p for p in data.kb.pretraining if p["split"] == split]  # the same order
    batch = PretrainBatcher(sentences, tok, int(config.data.query_len),
                            int(config.data.max_masks), config.data.masking)(
        np.arange(len(sentences)), np.random.default_rng(0))
    enc = Encoded(batch["query_ids"], batch["query_mask"], batch["query_types"])
    ids, _ = searcher.search(task.queries.embed(query_params, enc), max(KS))
    result["sentences"] = by_fact(ids, np.asarray(batch["gold_blocks"]),
                                  [p["attribute"] for p in kept], first_block)
    return result


def table(result: dict) -> str:
    lines = [f"{result['workdir']} step {result['step']} ({result['split']} split, fresh index)",
             "", "| queries | fact | recall@1 | recall@5 |", "|---|---|---|---|"]
    for kind in ("questions", "sentences"):
        r = result[kind]
        for fact, v in r.items():
            if isinstance(v, dict):
                lines.append(f"| {kind} | {fact} | {v['recall@1']:.3f} | {v['recall@5']:.3f} |")
        lines.append(f"| {kind} | top-1 is the first block / gold is | "
                     f"{r['top1_first_block']:.3f} | {r['gold_first_block']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    parser.add_argument("--out", default="", help="JSON path")
    args = bench_utils.parse_args(parser)
    result = measure(args.workdir, args.step)
    print(table(result))
    out = args.out or os.path.join(args.workdir, f"retrieval_by_fact-step{result['step']}.json")
    bench_utils.write_json(out, result)


if __name__ == "__main__":
    main()
