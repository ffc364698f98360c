"""Answer latency and throughput on CPU: realm_jax `Realm.answer` vs Hugging Face
`RealmForOpenQA` (transformers 4.46.3, torch), same weights, same blocks, same questions.

    python benchmarks/answer_latency.py                          # demo + bert_base
    python benchmarks/answer_latency.py --sizes demo             # quicker
    python benchmarks/answer_latency.py --sizes tiny --latency-runs 5 --batch-repeats 1  # smoke

Per model size, both sides answer the same generated questions over the same generated blocks
(random words of the BERT uncased vocabulary, block lengths as the config's) with the same
random weights (HF's state dict mapped by `checkpoints.params_from_hf`) and the same random
block embeddings (HF's `block_emb` = our exact index):

  latency      one question per call, end to end (tokenise, embed, search, join, read, answer
               text): `realm.answer(q)` vs `model(**tokenizer([q]))` + `tokenizer.decode`;
               p50 / p95 over --latency-runs calls each, interleaved, after a warm-up pass
               (ours compiles each question/join length bucket it meets once);
  throughput   64 questions: one `realm.answer(questions)` call vs 64 `RealmForOpenQA` calls
               (it accepts batch size 1 only); questions/s from the median of
               --batch-repeats, after one warm-up batch (JAX compiles there). On CPU `Realm`
               reads the 64 in calls of about `inference.CPU_READER_TOKENS` joined wordpieces
               (its default `batch_size`, in the JSON; `--batch-size` to override).

Sizes: "demo" is the demo's ORQA model (runs/demo/orqa, `--demo-workdir`) when that workdir
exists — then ours is the trained model and HF a random model of the same size over the same
blocks (HF cannot express the demo's mean pooling) — else a MiniLM-sized random REALM (preset
minilm_l6_h384: 6 layers, 384 wide) with the demo's lengths (10k blocks of ≤32 wordpieces,
reader 64, beam 4); "bert_base" is BERT-base over 100k blocks of ~288 wordpieces with the
released ORQA settings (reader 320, beam 5, span width 10); "tiny" is a smoke test.

Ours runs on one CPU device (no emulated devices), float32, the corpus in memory; both sides may
use every core (torch `set_num_threads`, XLA's pool). glibc malloc keeps freed memory mapped
for both (`encoder_speed.set_malloc`, `--malloc default` to measure the stock allocator). The
CPU load of other processes is measured before each timed section and written to the JSON
(`--wait-idle S` waits up to S seconds for quiet first): torch's OpenMP threads spin-wait, so a
busy core slows HF down by up to 100× and would flatter our side.

Goal (issue #6): ours ≥ 2× Hugging Face's throughput. Results: a table on stdout and
benchmarks/results/answer_latency.json (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any

import bench_utils  # noqa: E402
import numpy as np
from bench_utils import cpu_busy_elsewhere, cpu_model, wait_for_idle, write_json
from encoder_speed import MALLOC_MODES, pin_threads, set_malloc, thp_mode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "answer_latency.json")
BATCH = 64
# Per size: RealmConfig overrides (its defaults are BERT-base and the released ORQA reader),
# number of blocks, words per block (min, max), question wordpiece budget.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hf=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, retriever_proj_size=32, span_hidden_size=32,
                         max_span_width=5, reader_beam_size=3, reader_seq_len=64),
                 blocks=2_000, words=(8, 30), query_len=32),
    "demo": dict(hf=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, hidden_act="gelu", span_hidden_size=128,
                         max_span_width=8, reader_beam_size=4, reader_seq_len=64),
                 blocks=10_000, words=(12, 24), query_len=32),
    "bert_base": dict(hf=dict(reader_beam_size=5, max_span_width=10, reader_seq_len=320),
                      blocks=100_000, words=(170, 230), query_len=64),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="demo,bert_base", help="comma-separated: " +
                   ", ".join(SIZES))
    p.add_argument("--latency-runs", type=int, default=20, help="single-question calls per side")
    p.add_argument("--batch-repeats", type=int, default=2, help="timed batches of 64 per side")
    p.add_argument("--check", type=int, default=8, help="questions whose answers are compared")
    p.add_argument("--batch-size", type=int, default=None,
                   help="Realm's padded batch (default: its CPU default)")
    p.add_argument("--demo-workdir", default=os.path.join(REPO_ROOT, "runs", "demo", "orqa"))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--malloc", choices=sorted(MALLOC_MODES), default="retain")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each timed section, wait up to this many seconds for other "
                        "processes to leave the CPU (torch's OpenMP threads slow down by "
                        "orders of magnitude when they share cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = bench_utils.parse_args(p, argv)
    unknown = set(args.sizes.split(",")) - set(SIZES)
    if unknown:
        p.error(f"unknown size(s) {sorted(unknown)}; accepted: {sorted(SIZES)}")
    return args


# --------------------------------------------------------------------------- data


def vocabulary_words(vocab_file: str, rng: np.random.Generator, n: int = 5000) -> list[str]:
    words = [t for t in open(vocab_file).read().split("\n")
             if t.isalpha() and t.isascii() and len(t) >= 3]
    return list(rng.choice(words, size=min(n, len(words)), replace=False))


def texts(rng: np.random.Generator, words: list[str], n: int, lo: int, hi: int,
          end: str = ".") -> list[str]:
    """n texts of lo..hi random words, a sentence break about every 12 words."""
    vocab = np.asarray(words)
    out = []
    for length in rng.integers(lo, hi + 1, size=n):
        w = vocab[rng.integers(0, len(vocab), size=length)].tolist()
        for i in range(11, length - 1, 12):
            w[i] += "."
        out.append(" ".join(w).capitalize() + end)
    return out


# --------------------------------------------------------------------------- the two sides


def build_hf(hf_kw: dict, num_blocks: int, block_texts: list[str], block_emb: np.ndarray,
             vocab_file: str, seed: int):
    """A random `RealmForOpenQA` with its retriever over `block_texts` (torch)."""
    import torch
    import transformers

    from realm_jax.testing import hf_reference as ref

    config = transformers.RealmConfig(**hf_kw, num_block_records=num_blocks)
    model = ref.build("RealmForOpenQA", config, seed=seed, noise=0.02)
    tokenizer = transformers.RealmTokenizerFast(vocab_file=vocab_file)
    records = np.array([t.encode() for t in block_texts], dtype=object)
    model.retriever = transformers.RealmRetriever(records, tokenizer)
    with torch.no_grad():
        model.block_emb.copy_(torch.from_numpy(block_emb))
    return model, tokenizer


def build_ours(model, query_len: int, block_texts: list[str], block_emb: np.ndarray,
               vocab_file: str):
    """`Realm` with HF's weights, blocks and block embeddings, on one CPU device."""
    import jax
    from etils import epath

    from realm_jax import checkpoints, sharding
    from realm_jax.convert import openqa_config
    from realm_jax.data.blocks import BlockCorpus
    from realm_jax.data.joins import tokenize_corpus
    from realm_jax.data.tokenizer import WordPiece
    from realm_jax.inference import Realm
    from realm_jax.models import RealmModelConfig
    from realm_jax.retrieval.searcher import open_searcher
    from realm_jax.retrieval.store import IndexVersion

    hf = model.config.to_dict()
    cfg = RealmModelConfig.from_hf(hf)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = checkpoints.params_from_hf(tensors, cfg, "hf_realm", where="benchmark")
    config = openqa_config(cfg, hf)
    config.data.query_len = query_len
    mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    corpus = BlockCorpus.from_blocks([{"title": "", "text": t} for t in block_texts])
    tokenizer = WordPiece(vocab_file)
    t0 = time.perf_counter()
    blocks = tokenize_corpus(corpus, tokenizer)
    tokenize_s = time.perf_counter() - t0
    version = IndexVersion(0, block_emb, {}, epath.Path("(in memory)"))
    searcher = open_searcher(version, config, mesh)
    realm = Realm(config, params, searcher, corpus=corpus, blocks=blocks, tokenizer=tokenizer,
                  mesh=mesh)
    return realm, tokenize_s


def demo_pair(workdir: str, hf_kw: dict, vocab_file: str, seed: int):
    """The trained demo model and an HF model of its size over its blocks and index."""
    from realm_jax.inference import Realm

    realm = Realm.load(workdir)
    b = realm.cfg.bert
    kw = dict(hf_kw, vocab_size=b.vocab_size, hidden_size=b.hidden_size,
              num_hidden_layers=b.num_layers, num_attention_heads=b.num_heads,
              intermediate_size=b.intermediate_size, hidden_act=b.hidden_act,
              retriever_proj_size=realm.searcher.version.dim,
              span_hidden_size=realm.cfg.span_hidden_size,
              max_span_width=realm.cfg.max_span_width, reader_beam_size=realm.reader_beam,
              reader_seq_len=realm.reader_len)
    block_texts = [r["text"] for r in realm.corpus.get_many(range(len(realm.corpus)))]
    emb = np.asarray(realm.searcher.version.embeddings, np.float32)
    model, tokenizer = build_hf(kw, len(block_texts), block_texts, emb, vocab_file, seed)
    return realm, model, tokenizer


# --------------------------------------------------------------------------- timing


def percentiles(times: list[float]) -> dict[str, float]:
    return {"p50_s": float(np.percentile(times, 50)), "p95_s": float(np.percentile(times, 95)),
            "mean_s": float(np.mean(times)), "times_s": times}


def bench_size(name: str, args: argparse.Namespace, vocab_file: str) -> dict[str, Any]:
    import torch

    spec = SIZES[name]
    rng = np.random.default_rng(args.seed)
    words = vocabulary_words(vocab_file, rng)
    questions = texts(rng, words, max(BATCH, args.latency_runs), 4, 11, end="?")
    t0 = time.perf_counter()
    if name == "demo" and os.path.isdir(args.demo_workdir):
        realm, model, tokenizer = demo_pair(args.demo_workdir, spec["hf"], vocab_file, args.seed)
        source = f"trained demo model {args.demo_workdir} (HF: random weights, same size)"
        tokenize_s = None
    else:
        n = spec["blocks"]
        block_texts = texts(rng, words, n, *spec["words"])
        emb = rng.normal(size=(n, spec["hf"].get("retriever_proj_size", 128))).astype(np.float32)
        model, tokenizer = build_hf(spec["hf"], n, block_texts, emb, vocab_file, args.seed)
        realm, tokenize_s = build_ours(model, spec["query_len"], block_texts, emb, vocab_file)
        source = "random weights, same on both sides" + (
            f" (no demo workdir at {args.demo_workdir}: MiniLM-sized stand-in)"
            if name == "demo" else "")
    if args.batch_size:
        realm.batch_size = args.batch_size
    setup_s = time.perf_counter() - t0
    print(f"[{name}] {len(realm.corpus)} blocks, {source}; set-up {setup_s:.0f}s; ours reads "
          f"{realm.batch_size} question(s) per call", flush=True)

    def hf_answer(q: str) -> str:
        with torch.no_grad():
            out = model(**tokenizer([q], return_tensors="pt"), return_dict=True)
        return tokenizer.decode(out.predicted_answer_ids)

    # Warm-up (our compilations happen here), then the answers of both sides compared.
    t0 = time.perf_counter()
    realm.answer(questions[0])
    compile_one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_batch = realm.answer(questions[:BATCH])
    compile_batch_s = time.perf_counter() - t0
    hf_answer(questions[0])
    same = [hf_answer(q) == a.decoded for q, a in zip(questions[: args.check], ours_batch,
                                                        strict=False)]
    print(f"[{name}] answers equal to HF's: {sum(same)}/{len(same)}; first calls (compile + "
          f"run) {compile_one_s:.1f}s single, {compile_batch_s:.1f}s batch", flush=True)

    for q in questions[: args.latency_runs]:  # compile every length bucket the runs will use
        realm.answer(q)
    busy = {"latency": quiet(args)}
    ours_lat, hf_lat = [], []
    for i in range(args.latency_runs):  # interleaved, so drifting load hits both sides
        q = questions[i % len(questions)]
        t0 = time.perf_counter()
        realm.answer(q)
        ours_lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf_answer(q)
        hf_lat.append(time.perf_counter() - t0)
    print(f"[{name}] latency p50 ours {np.median(ours_lat) * 1e3:.1f} ms, HF "
          f"{np.median(hf_lat) * 1e3:.1f} ms", flush=True)

    busy["throughput"] = quiet(args)
    ours_batch_t, hf_batch_t = [], []
    for _ in range(args.batch_repeats):
        t0 = time.perf_counter()
        realm.answer(questions[:BATCH])
        ours_batch_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for q in questions[:BATCH]:
            hf_answer(q)
        hf_batch_t.append(time.perf_counter() - t0)
    ours_qps = BATCH / statistics.median(ours_batch_t)
    hf_qps = BATCH / statistics.median(hf_batch_t)
    print(f"[{name}] throughput ours {ours_qps:.2f} q/s, HF {hf_qps:.2f} q/s", flush=True)
    return {
        "source": source, "num_blocks": len(realm.corpus), "hf_config": model.config.to_dict(),
        "query_len": realm.query_len, "reader_len": realm.reader_len,
        "reader_beam": realm.reader_beam, "realm_batch_size": realm.batch_size,
        "setup_s": setup_s, "tokenize_corpus_s": tokenize_s,
        "first_call_single_s": compile_one_s, "first_call_batch_s": compile_batch_s,
        "answers_equal_hf": f"{sum(same)}/{len(same)}" if tokenize_s is not None else
                            "n/a (other weights)",
        "latency": {"ours": percentiles(ours_lat), "hf": percentiles(hf_lat)},
        "latency_ratio_p50": statistics.median(hf_lat) / statistics.median(ours_lat),
        "throughput": {"ours_qps": ours_qps, "hf_qps": hf_qps, "ours_batch_s": ours_batch_t,
                       "hf_batch_s": hf_batch_t},
        "throughput_ratio": ours_qps / hf_qps,
        "cpu_busy_elsewhere": busy,
    }


def quiet(args: argparse.Namespace) -> float:
    """Other processes' share of the CPUs now (waiting for quiet first with --wait-idle)."""
    busy = wait_for_idle(args.wait_idle) if args.wait_idle else cpu_busy_elsewhere(0.5)
    if busy > 0.1:
        print(f"WARNING: {busy:.0%} of the CPUs busy elsewhere: timings are not reliable")
    return busy


def table(results: dict[str, Any]) -> str:
    head = ["size", "blocks", "ours p50/p95 ms", "HF p50/p95 ms", "latency ×",
            f"ours q/s ({BATCH})", f"HF q/s ({BATCH})", "throughput ×", "same answers"]
    rows = [head]
    for name, r in results["sizes"].items():
        o, h = r["latency"]["ours"], r["latency"]["hf"]
        rows.append([name, f"{r['num_blocks']:,}",
                     f"{o['p50_s'] * 1e3:.0f} / {o['p95_s'] * 1e3:.0f}",
                     f"{h['p50_s'] * 1e3:.0f} / {h['p95_s'] * 1e3:.0f}",
                     f"{r['latency_ratio_p50']:.2f}", f"{r['throughput']['ours_qps']:.2f}",
                     f"{r['throughput']['hf_qps']:.2f}", f"{r['throughput_ratio']:.2f}",
                     r["answers_equal_hf"]])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    fmt = lambda row: " | ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True))  # noqa: E731
    lines = [fmt(rows[0]), "-+-".join("-" * w for w in widths), *map(fmt, rows[1:])]
    lines.append("× = HF time / ours (latency p50) and ours / HF (throughput): > 1 is ours faster")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if argv is None:
        set_malloc(args.malloc)
    cpus = pin_threads(args.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import jax
    import torch
    import transformers

    from realm_jax import checkpoints

    torch.set_num_threads(args.threads)
    vocab_file = str(checkpoints.minilm_path() / "vocab.txt")
    env = {
        "threads": args.threads, "torch_threads": torch.get_num_threads(), "cpus_pinned": cpus,
        "cpu_model": cpu_model(), "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "jax_devices": [str(d) for d in jax.devices()],
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "transparent_hugepage": thp_mode(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_busy_elsewhere_before": cpu_busy_elsewhere(),
    }
    print(f"threads={args.threads} cpu={env['cpu_model']!r}; other load "
          f"{env['cpu_busy_elsewhere_before']:.0%}", flush=True)
    if env["cpu_busy_elsewhere_before"] > 0.1:
        print("WARNING: other processes use the CPUs; timings will be noisy")
    results: dict[str, Any] = {"env": env, "args": vars(args), "sizes": {}, "goal_ratio": 2.0}
    for name in args.sizes.split(","):
        results["sizes"][name] = bench_size(name, args, vocab_file)
    env["cpu_busy_elsewhere_after"] = cpu_busy_elsewhere()
    print()
    print(table(results))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
