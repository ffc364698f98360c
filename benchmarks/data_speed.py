"""Data speed: building the corpus from JSONL, and the pre-training loader vs a CPU train step.

Run:

    python benchmarks/data_speed.py                   # 100k blocks of ≤288 wordpieces
    python benchmarks/data_speed.py --blocks 10000    # quicker

On the generated knowledge base (`realm_jax.data.synthetic`) of about `--blocks` blocks:

1. Corpus build (blocks/s): documents.jsonl → TFDS `realm_blocks` (array_record) through
   `blocks.build_corpus`: JSONL parsing, sentence splitting, WordPiece, greedy packing, uids,
   writing. Also reported: generating the KB, tokenising the corpus once for the joins
   (`joins.tokenize_corpus`), and the `realm_sentences` build of the pre-training examples.
2. Pre-training loader (examples/s): `pipeline.pretrain_dataset` (shuffle, read, tokenise,
   salient span masking, batch) over in-memory `Sentences` and over TFDS array_record, with
   1 and 2 reader threads; `--warmup` batches untimed, then `--batches` timed.
3. Host work per training step: the loader's time for one batch of `--step-batch` examples,
   plus `joins.join_mlm` for those queries × `--k` candidates, against one CPU training step
   of a proxy model (forward + backward of the knowledge-augmented encoder on the joined
   [B, K, L] input and of the embedder on the B queries and B·K blocks, `--preset` size,
   jitted) — the real step also re-embeds candidates and retrieves, so the proxy is a lower
   bound on the step, and the ratio a lower bound on the headroom.

Goal: the loader is never the bottleneck of a CPU training step: step / (loader + join) ≫ 1.

Results: a table on stdout and JSON (`--out`, default benchmarks/results/data_speed.json) with
the raw numbers, the settings, versions and the CPU. Timings are wall-clock on a machine that
may be shared: each timed phase is repeated `--repeats` times for the loader and the step and
the median is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import bench_utils  # noqa: E402
import numpy as np
from bench_utils import cpu_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "data_speed.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=100_000, help="target corpus size")
    p.add_argument("--block-len", type=int, default=288, help="max_block_wordpieces")
    p.add_argument("--query-len", type=int, default=96)
    p.add_argument("--batch", type=int, default=512, help="loader batch (throughput)")
    p.add_argument("--batches", type=int, default=20, help="timed loader batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-batch", type=int, default=8, help="B of the CPU step comparison")
    p.add_argument("--k", type=int, default=8, help="candidates per query")
    p.add_argument("--step-query-len", type=int, default=32)
    p.add_argument("--step-block-len", type=int, default=128)
    p.add_argument("--preset", default="minilm_l6_h384", help="BERT preset of the step proxy")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--workdir", default=None, help="keep the generated files here")
    p.add_argument("--out", default=DEFAULT_OUT)
    return bench_utils.parse_args(p, argv)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def loader_rate(source, tok, args, threads: int, batch: int, batches: int) -> dict[str, float]:
    """Examples/s of `pretrain_dataset` (median over repeats) and seconds per batch."""
    from grain.sharding import ShardOptions

    from realm_jax.data import pipeline

    times = []
    for r in range(args.repeats):
        ds = pipeline.pretrain_dataset(source, tok, batch_size=batch, seed=r,
                                       query_len=args.query_len, shard=ShardOptions(0, 1),
                                       num_threads=threads, prefetch=2 * threads)
        it = iter(ds)
        for _ in range(args.warmup):
            next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        times.append((time.perf_counter() - t) / batches)
    per_batch = statistics.median(times)
    return {"examples_per_s": batch / per_batch, "s_per_batch": per_batch,
            "threads": threads, "batch": batch}


def step_proxy(args, vocab_size: int) -> dict[str, Any]:
    """Seconds of one jitted forward+backward of encoder + embedder at the demo sizes."""
    import jax
    import jax.numpy as jnp

    from realm_jax.models import Embedder, KnowledgeAugEncoder
    from realm_jax.models.config import BertConfig, RealmModelConfig
    from realm_jax.models.losses import marginal_mlm_loss

    bert = BertConfig.preset(args.preset, vocab_size=vocab_size, hidden_dropout=0.0,
                             attention_dropout=0.0)
    cfg = RealmModelConfig(bert=bert)
    b, k, lq, lb = args.step_batch, args.k, args.step_query_len, args.step_block_len
    lj = lq + lb
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.integers(1000, vocab_size, (b, lq)), jnp.int32)
    blocks = jnp.asarray(rng.integers(1000, vocab_size, (b * k, lb)), jnp.int32)
    joined = jnp.asarray(rng.integers(1000, vocab_size, (b, k, lj)), jnp.int32)
    pos = jnp.tile(jnp.arange(1, 11, dtype=jnp.int32), (b, 1))
    labels = jnp.asarray(rng.integers(1000, vocab_size, (b, 10)), jnp.int32)
    weights = jnp.ones((b, 10), jnp.float32)
    emb, enc = Embedder(cfg), KnowledgeAugEncoder(cfg)
    params = {"emb": emb.init(jax.random.key(0), q)["params"],
              "enc": enc.init(jax.random.key(1), joined, mlm_positions=pos)["params"]}

    def loss_fn(p):
        qe = emb.apply({"params": p["emb"]}, q)  # [B, D]
        be = emb.apply({"params": p["emb"]}, blocks).reshape(b, k, -1)  # [B, K, D]
        logits = jnp.einsum("bd,bkd->bk", qe, be)
        mlm = enc.apply({"params": p["enc"]}, joined, mlm_positions=pos)
        return marginal_mlm_loss(mlm, labels, weights, logits)[0]

    step = jax.jit(jax.value_and_grad(loss_fn))
    _, compile_s = _timed(lambda: jax.block_until_ready(step(params)))
    times = []
    for _ in range(args.repeats):
        _, t = _timed(lambda: jax.block_until_ready(step(params)))
        times.append(t)
    return {"s_per_step": statistics.median(times), "compile_s": compile_s,
            "shape": {"B": b, "K": k, "query_len": lq, "block_len": lb, "join_len": lj},
            "preset": args.preset}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from grain.sharding import ShardOptions

    from realm_jax import checkpoints
    from realm_jax.data import blocks, examples, joins, pipeline, synthetic
    from realm_jax.data.tokenizer import WordPiece

    vocab = checkpoints.minilm_path() / "vocab.txt"
    tok = WordPiece(vocab)
    work = args.workdir or tempfile.mkdtemp(prefix="data_speed_")
    res: dict[str, Any] = {"settings": vars(args), "phases": {}}
    ph = res["phases"]

    n_entities = synthetic.entities_for_blocks(args.blocks, args.block_len)
    kb, t = _timed(lambda: synthetic.generate(n_entities, seed=0))
    ph["generate_kb"] = {"s": t, "entities": n_entities, "entities_per_s": n_entities / t}
    docs_path, t = _timed(lambda: kb.write_documents(os.path.join(work, "documents.jsonl")))
    ph["write_documents_jsonl"] = {"s": t}

    (corpus, stats), t = _timed(lambda: blocks.build_corpus(
        os.path.join(work, "tfds"), source="jsonl", path=str(docs_path), vocab_file=vocab,
        max_block_wordpieces=args.block_len, name=f"kb{n_entities}_{args.block_len}"))
    ph["build_corpus_from_jsonl"] = {"s": t, "blocks": len(corpus),
                                     "blocks_per_s": len(corpus) / t, "stats": stats.to_dict()}
    data, t = _timed(lambda: kb.attach(corpus))
    ph["link_gold_blocks"] = {"s": t}
    tb, t = _timed(lambda: joins.tokenize_corpus(corpus, tok))
    ph["tokenize_corpus"] = {"s": t, "blocks_per_s": len(corpus) / t}
    paths, _ = _timed(lambda: kb.write_jsonl(work, fact_blocks=data.fact_blocks))
    tfds_sents, t = _timed(lambda: examples.build_sentences(
        os.path.join(work, "tfds"), source="jsonl", path=str(paths["pretrain"]),
        name=f"kb{n_entities}_{args.block_len}"))
    ph["build_sentences"] = {"s": t, "examples": len(tfds_sents),
                             "examples_per_s": len(tfds_sents) / t}
    mem_sents = data.sentences()

    loader = []
    for name, src in (("memory", mem_sents), ("tfds", tfds_sents)):
        for threads in (1, 2):
            r = loader_rate(src, tok, args, threads, args.batch, args.batches)
            r["source"] = name
            loader.append(r)
    res["loader"] = loader

    # Host work of one training step at the step's batch size.
    many = max(200, args.batches)
    small = loader_rate(mem_sents, tok, args, 1, args.step_batch, many)
    small_tfds = loader_rate(tfds_sents, tok, args, 1, args.step_batch, many)
    batch = next(iter(pipeline.pretrain_dataset(
        mem_sents, tok, batch_size=args.step_batch, seed=0, query_len=args.step_query_len,
        shard=ShardOptions(0, 1))))
    cand = np.random.default_rng(0).integers(-1, len(corpus), (args.step_batch, args.k))
    join_times = []
    for _ in range(max(5, args.repeats)):
        _, t = _timed(lambda: joins.join_mlm(batch["query_ids"], batch["query_len"], tb, cand,
                                             args.step_query_len + args.step_block_len))
        join_times.append(t)
    host = {"loader_s_per_batch": max(small["s_per_batch"], small_tfds["s_per_batch"]),
            "join_s_per_batch": statistics.median(join_times), "batch": args.step_batch}
    host["total_s"] = host["loader_s_per_batch"] + host["join_s_per_batch"]
    res["host_per_step"] = host
    if not args.skip_step:
        res["step"] = step_proxy(args, tok.vocab_size)
        res["headroom"] = res["step"]["s_per_step"] / host["total_s"]

    res["env"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu": cpu_model(), "cpus": len(os.sched_getaffinity(0)),
        "versions": _versions(),
    }
    _print(res)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, default=str)
    print(f"\nwrote {args.out}")
    return res


def _print(res: dict[str, Any]) -> None:
    ph = res["phases"]
    n = ph["build_corpus_from_jsonl"]["blocks"]
    print(f"\nData speed on the synthetic KB: {ph['generate_kb']['entities']} entities, {n} "
          f"blocks ≤ {res['settings']['block_len']} wordpieces, "
          f"{res['env']['cpus']} CPU(s) ({res['env']['cpu']})\n")
    print(f"{'phase':34s} {'seconds':>9s} {'rate':>22s}")
    rows = [("generate KB", ph["generate_kb"]["s"],
             f"{ph['generate_kb']['entities_per_s']:,.0f} entities/s"),
            ("corpus: JSONL → realm_blocks", ph["build_corpus_from_jsonl"]["s"],
             f"{ph['build_corpus_from_jsonl']['blocks_per_s']:,.0f} blocks/s"),
            ("link gold blocks", ph["link_gold_blocks"]["s"], ""),
            ("tokenize_corpus (joins)", ph["tokenize_corpus"]["s"],
             f"{ph['tokenize_corpus']['blocks_per_s']:,.0f} blocks/s"),
            ("pretrain JSONL → realm_sentences", ph["build_sentences"]["s"],
             f"{ph['build_sentences']['examples_per_s']:,.0f} examples/s")]
    for name, s, rate in rows:
        print(f"{name:34s} {s:9.2f} {rate:>22s}")
    print(f"\n{'pre-training loader':34s} {'threads':>7s} {'batch':>6s} {'ms/batch':>9s} "
          f"{'examples/s':>11s}")
    for r in res["loader"]:
        print(f"{'  ' + r['source']:34s} {r['threads']:7d} {r['batch']:6d} "
              f"{1e3 * r['s_per_batch']:9.1f} {r['examples_per_s']:11,.0f}")
    h = res["host_per_step"]
    print(f"\nhost work per step (B={h['batch']}): loader {1e3 * h['loader_s_per_batch']:.2f} ms"
          f" + join {1e3 * h['join_s_per_batch']:.2f} ms = {1e3 * h['total_s']:.2f} ms")
    if "step" in res:
        s = res["step"]
        print(f"CPU step proxy ({s['preset']}, {s['shape']}): {1e3 * s['s_per_step']:.0f} ms"
              f" (compile {s['compile_s']:.1f} s)")
        print(f"headroom: step / host work = {res['headroom']:.0f}x")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "grain", "tensorflow-datasets", "tokenizers", "array-record", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


if __name__ == "__main__":
    main()
