"""Encoder speed on CPU: our jitted JAX towers vs Hugging Face REALM (torch), same weights.

Run:

    python benchmarks/encoder_speed.py --size bert_base

Two benchmarks, each timed for both implementations in the same process, on the same CPU, with
the same thread count and the same (random) weights in float32:

1. Embedder throughput (documents/s): HF `RealmEmbedder` (eval, `torch.no_grad`) vs our
   `Embedder` under `jax.jit`, on a batch of 32 blocks of 288 tokens.
2. One training step of the knowledge-augmented encoder (queries/s and sequences/s): forward
   + backward, gradients w.r.t. every parameter, on 1 query x 8 candidates of 384 tokens with
   10 masked positions. Reference: `RealmKnowledgeAugEncoder(..., relevance_score, labels,
   mlm_mask).loss.backward()`. Ours: `jax.jit(jax.value_and_grad(loss))` with
   loss = `marginal_mlm_loss(KnowledgeAugEncoder.apply(...))`, in two variants:
   - "gathered": `mlm_positions` picks the masked positions before the vocabulary projection
     (what our training does);
   - "full logits": logits at all positions, the same computation as HF (the honest baseline).

Dropout is off on both sides (HF `eval()`, ours `deterministic=True`) so the two compute the
same function; the outputs (embeddings; loss and all gradients) are compared once before
timing and the max abs difference is printed next to each timing.

The HF model is built with random weights (`realm_jax.testing.hf_reference.build`), saved into
a temporary directory and read back with `realm_jax.checkpoints.load_pretrained`, so both sides
hold identical weights. Threads: torch gets `torch.set_num_threads(N)`; XLA has no thread-count
flag, it sizes its pool from the CPUs the process may run on, so for N below the available CPU
count the process is pinned to N CPUs (`os.sched_setaffinity`), which binds both libraries.

Memory: by default (`--malloc retain`) the script re-execs itself with glibc malloc tunables
that keep freed memory mapped (see `set_malloc`), for both libraries alike; otherwise both
pay one page fault per 4 KiB of every large activation on every step, which on a small VM is
a large and noisy share of the time. `--malloc default` measures the stock allocator. Page
faults per step are recorded in the JSON.

Timing: JAX programs are compiled ahead (`jit(...).lower(...).compile()`, reported separately
as compile seconds), then `--warmup` untimed and `--repeats` timed iterations per side,
interleaved (ours, reference, ours, ...); JAX results are `block_until_ready`. Median and min
seconds per step are reported, throughput from the median. Run on an otherwise idle machine:
the script measures the CPU used by other processes before and after (JSON
`cpu_busy_elsewhere_*`) and warns; torch's OpenMP barriers slow down far more than XLA's thread
pool when cores are shared, so a busy machine flatters our side.

Goal: ours/reference throughput >= 1.3x on both benchmarks (the "gathered" training variant).

Results go to a plain-text table on stdout and a JSON file (`--out`, default
benchmarks/results/encoder_speed.json) with the raw times, config, versions, thread count
and CPU model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import bench_utils  # noqa: E402
import numpy as np
from bench_utils import cpu_busy_elsewhere, cpu_model, write_json

# Model sizes: keyword arguments for `transformers.RealmConfig` (its defaults are BERT-base).
SIZES: dict[str, dict[str, Any]] = {
    "bert_base": {},
    "minilm": dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        hidden_act="gelu",
    ),
    "tiny": dict(
        vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, retriever_proj_size=32,
    ),
}
# glibc malloc settings (GLIBC_TUNABLES) for the whole process, so for both libraries alike.
# "retain": never mmap, never give memory back, one arena: after the warmup every activation
# buffer reuses memory that is already mapped, so steps measure compute, not page faults.
# "default": glibc as configured by the caller (large blocks are mmapped fresh on every
# allocation: one page fault per 4 KiB first touched).
MALLOC_MODES = {
    "retain": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:"
              "glibc.malloc.arena_max=1",
    "default": "",
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "encoder_speed.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="bert_base")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPU threads for both torch and XLA (default: all available CPUs)")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per side")
    p.add_argument("--embed-batch", type=int, default=32, help="blocks per embedder call")
    p.add_argument("--block-len", type=int, default=288, help="tokens per block")
    p.add_argument("--queries", type=int, default=1, help="queries per training step")
    p.add_argument("--candidates", type=int, default=8, help="candidates (k) per query")
    p.add_argument("--seq-len", type=int, default=384, help="tokens per joined sequence")
    p.add_argument("--masked", type=int, default=10, help="masked positions per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-full-logits", action="store_true",
                   help="skip our full-logits training variant")
    p.add_argument("--malloc", choices=sorted(MALLOC_MODES), default="retain",
                   help="glibc malloc settings for the process (both libraries); 'retain' "
                        "re-execs with GLIBC_TUNABLES=" + MALLOC_MODES["retain"])
    p.add_argument("--only", choices=("embedder", "train_step"), default=None,
                   help="run one benchmark only")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results path")
    args = bench_utils.parse_args(p, argv)
    if args.masked > args.seq_len // 2 - 1:
        p.error("--masked must fit in the first half of --seq-len")
    return args


def pin_threads(n: int) -> list[int]:
    """Restrict this process to `n` CPUs (before jax/torch start their thread pools)."""
    cpus = sorted(os.sched_getaffinity(0))
    if n < 1 or n > len(cpus):
        raise SystemExit(f"--threads={n}; this process may use {len(cpus)} CPU(s)")
    if n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return sorted(os.sched_getaffinity(0))


def set_malloc(mode: str) -> None:
    """Re-exec this script with the glibc malloc tunables of `mode` (see MALLOC_MODES).

    XLA and torch both allocate every large activation with malloc. By default glibc mmaps
    blocks above its mmap threshold (at most 32 MiB) fresh each time and unmaps them on free,
    so each step pays one page fault per 4 KiB it touches (a [32, 12, 288, 288] float32
    attention tensor: 31k faults); on a small VM that kernel time can be half of a step and
    varies a lot. glibc reads its tunables at start-up only, hence the re-exec.
    """
    want = MALLOC_MODES[mode]
    have = os.environ.get("GLIBC_TUNABLES", "")
    if want and not set(want.split(":")) <= set(have.split(":")):
        env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [have, want])))
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timed:
    name: str
    fn: Callable[[], Any]  # one step, returns only after the work is done
    times: list[float] = dataclasses.field(default_factory=list)
    page_faults: list[int] = dataclasses.field(default_factory=list)  # minor faults per step
    compile_s: float | None = None

    def summary(self, items_per_step: dict[str, int]) -> dict[str, Any]:
        med = statistics.median(self.times)
        out: dict[str, Any] = {
            "times_s": self.times,
            "median_s": med,
            "min_s": min(self.times),
            "compile_s": self.compile_s,
            "page_faults_per_step": statistics.median(self.page_faults),
        }
        for unit, n in items_per_step.items():
            out[f"{unit}_per_s"] = n / med
        return out


def run_interleaved(runs: list[Timed], warmup: int, repeats: int) -> None:
    for r in runs:
        for _ in range(warmup):
            r.fn()
    for _ in range(repeats):
        for r in runs:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            r.fn()
            r.times.append(time.perf_counter() - t0)
            r.page_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def compile_jax(fn: Callable, *args: Any) -> tuple[Callable, float]:
    """AOT-compile a jitted function; returns (executable, seconds spent lowering+compiling)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


# --------------------------------------------------------------------------- benchmarks


def bench_embedder(args: argparse.Namespace, hf_config: Any, tmp: str) -> dict[str, Any]:
    import jax
    import torch

    from realm_jax import checkpoints
    from realm_jax.models import Embedder
    from realm_jax.testing import hf_reference as ref

    model = ref.build("RealmEmbedder", hf_config, seed=args.seed)
    d = os.path.join(tmp, "embedder")
    ref.save(model, d)
    cfg, params = checkpoints.load_pretrained(d)
    params = jax.device_put(params["embedder"])

    rng = np.random.default_rng(args.seed)
    ids, mask, types = ref.random_inputs(rng, args.embed_batch, args.block_len,
                                         hf_config.vocab_size)
    t_ids, t_mask, t_types = (ref.torch_tensor(x) for x in (ids, mask, types))
    j_ids, j_mask, j_types = (jax.device_put(x.astype(np.int32)) for x in (ids, mask, types))

    embed = jax.jit(lambda p, i, m, t: Embedder(cfg).apply({"params": p}, i, m, t))
    compiled, compile_s = compile_jax(embed, params, j_ids, j_mask, j_types)

    def ours() -> Any:
        return compiled(params, j_ids, j_mask, j_types).block_until_ready()

    def theirs() -> Any:
        with torch.no_grad():
            return model(t_ids, attention_mask=t_mask, token_type_ids=t_types).projected_score

    diff = float(np.max(np.abs(np.asarray(ours()) - ref.to_numpy(theirs()))))
    runs = [Timed("ours", ours, compile_s=compile_s), Timed("reference", theirs)]
    run_interleaved(runs, args.warmup, args.repeats)
    unit = {"documents": args.embed_batch}
    o, r = runs[0].summary(unit), runs[1].summary(unit)
    return {
        "shape": {"batch": args.embed_batch, "length": args.block_len},
        "ours": o,
        "reference": r,
        "ratio": o["documents_per_s"] / r["documents_per_s"],
        "max_abs_diff": diff,
        "our_config": cfg.to_dict(),
    }


def _grad_diff(hf_model: Any, grads: Any, cfg: Any) -> float:
    """Max abs difference between HF's `.grad` tensors and our gradient tree (all mapped)."""
    from realm_jax import checkpoints
    from realm_jax.testing import hf_reference as ref

    hf_grads = {n: p.grad for n, p in hf_model.named_parameters()}
    worst = 0.0
    for hf_name, path, transform in checkpoints._tower_tables(cfg, "encoder", ""):
        g = hf_grads[hf_name]
        want = np.asarray(transform(ref.to_numpy(g)))
        node = grads
        for k in path:
            node = node[k]
        worst = max(worst, float(np.max(np.abs(np.asarray(node) - want))))
    return worst


def bench_train_step(args: argparse.Namespace, hf_config: Any, tmp: str) -> dict[str, Any]:
    import jax

    from realm_jax import checkpoints
    from realm_jax.models import KnowledgeAugEncoder
    from realm_jax.models.losses import marginal_mlm_loss
    from realm_jax.testing import hf_reference as ref

    b, k, length, m = args.queries, args.candidates, args.seq_len, args.masked
    v = hf_config.vocab_size
    model = ref.build("RealmKnowledgeAugEncoder", hf_config, seed=args.seed + 1)
    d = os.path.join(tmp, "encoder")
    ref.save(model, d)
    logging.disable(logging.WARNING)  # HF's encoder carries an unused pooler; that is expected
    try:
        cfg, params = checkpoints.load_pretrained(d)
    finally:
        logging.disable(logging.NOTSET)
    params = jax.device_put(params["encoder"])

    rng = np.random.default_rng(args.seed + 1)
    ids, mask, types = ref.random_inputs(rng, b * k, length, v)
    relevance = rng.normal(size=(b, k)).astype(np.float32)
    # Masked positions inside the first half (every sequence is at least that long).
    positions = np.sort(np.stack(
        [rng.choice(np.arange(1, length // 2), size=m, replace=False) for _ in range(b)]
    ), axis=1)
    pos_labels = rng.integers(3, v, size=(b, m)).astype(np.int64)
    labels = np.full((b, length), -100, np.int64)
    np.put_along_axis(labels, positions, pos_labels, axis=1)
    mlm_mask = (labels != -100).astype(np.int64)

    t = ref.torch_tensor
    t_args = dict(attention_mask=t(mask), token_type_ids=t(types), relevance_score=t(relevance),
                  labels=t(labels), mlm_mask=t(mlm_mask))
    t_ids = t(ids)

    def theirs() -> Any:
        model.zero_grad(set_to_none=True)
        out = model(t_ids, **t_args)
        out.loss.backward()
        return out.loss.detach()

    shaped = lambda x: jax.device_put(x.reshape(b, k, length).astype(np.int32))  # noqa: E731
    j_ids, j_mask, j_types = shaped(ids), shaped(mask), shaped(types)
    j_rel = jax.device_put(relevance)
    enc = KnowledgeAugEncoder(cfg)

    def loss_fn(p, ids_, mask_, types_, positions_, labels_, weights_, rel_):
        logits = enc.apply({"params": p}, ids_, mask_, types_, mlm_positions=positions_)
        return marginal_mlm_loss(logits, labels_, weights_, rel_)[0]

    step = jax.jit(jax.value_and_grad(loss_fn))
    variants = {
        "gathered": (jax.device_put(positions.astype(np.int32)),
                     jax.device_put(pos_labels.astype(np.int32)),
                     jax.device_put(np.ones((b, m), np.float32))),
    }
    if not args.skip_full_logits:
        variants["full_logits"] = (None, jax.device_put(np.maximum(labels, 0).astype(np.int32)),
                                   jax.device_put(mlm_mask.astype(np.float32)))

    # Reference loss and gradients, once.
    want_loss = float(theirs())
    runs: list[Timed] = []
    checks: dict[str, dict[str, float]] = {}
    for name, (pos_, lab_, w_) in variants.items():
        call_args = (params, j_ids, j_mask, j_types, pos_, lab_, w_, j_rel)
        compiled, compile_s = compile_jax(step, *call_args)

        def ours(compiled=compiled, call_args=call_args) -> Any:
            return jax.block_until_ready(compiled(*call_args))

        loss, grads = ours()
        checks[name] = {"loss_abs_diff": abs(float(loss) - want_loss),
                        "grad_max_abs_diff": _grad_diff(model, grads, cfg)}
        runs.append(Timed(f"ours_{name}", ours, compile_s=compile_s))
    runs.append(Timed("reference", theirs))
    run_interleaved(runs, args.warmup, args.repeats)

    units = {"queries": b, "sequences": b * k}
    ref_summary = runs[-1].summary(units)
    out: dict[str, Any] = {
        "shape": {"queries": b, "candidates": k, "length": length, "masked": m},
        "reference": ref_summary,
        "reference_loss": want_loss,
        "our_config": cfg.to_dict(),
    }
    for r, name in zip(runs[:-1], variants, strict=True):
        s = r.summary(units)
        out[f"ours_{name}"] = s
        out[f"ratio_{name}"] = s["queries_per_s"] / ref_summary["queries_per_s"]
        out[f"check_{name}"] = checks[name]
        out[f"max_abs_diff_{name}"] = max(checks[name].values())
    return out


# --------------------------------------------------------------------------- report


def _cell(s: dict[str, Any], unit: str, short: str) -> str:
    return f"{s[f'{unit}_per_s']:.3g} {short} (med {s['median_s']:.3g} s, min {s['min_s']:.3g} s)"


def _train_cell(s: dict[str, Any]) -> str:
    return (f"{s['queries_per_s']:.3g} q/s = {s['sequences_per_s']:.3g} seq/s "
            f"(med {s['median_s']:.3g} s, min {s['min_s']:.3g} s)")


def table(results: dict[str, Any]) -> str:
    rows = [("benchmark", "ours", "reference", "ratio ours/ref", "max abs diff")]
    compiles = []
    if "embedder" in results:
        e = results["embedder"]
        rows.append((
            f"embedder fwd, {e['shape']['batch']}x{e['shape']['length']} tok",
            _cell(e["ours"], "documents", "docs/s"), _cell(e["reference"], "documents", "docs/s"),
            f"{e['ratio']:.2f}x", f"{e['max_abs_diff']:.1e}",
        ))
        compiles.append(f"embedder {e['ours']['compile_s']:.1f} s")
    t = results.get("train_step", {})
    sh = t.get("shape", {})
    for name, label in (("gathered", "mlm_positions"), ("full_logits", "full logits")):
        if f"ours_{name}" not in t:
            continue
        compiles.append(f"train/{name} {t[f'ours_{name}']['compile_s']:.1f} s")
        rows.append((
            f"train step {sh['queries']}x{sh['candidates']}x{sh['length']}, {label}",
            _train_cell(t[f"ours_{name}"]), _train_cell(t["reference"]),
            f"{t[f'ratio_{name}']:.2f}x", f"{t[f'max_abs_diff_{name}']:.1e}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    lines = [fmt(rows[0]), "-+-".join("-" * w for w in widths), *map(fmt, rows[1:])]
    lines.append("JAX compile (excluded from timings): " + ", ".join(compiles))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if argv is None:  # re-exec only when run as a script (argv comes from sys.argv)
        set_malloc(args.malloc)
    cpus = pin_threads(args.threads)
    if REPO_ROOT not in sys.path:  # `python benchmarks/encoder_speed.py` from a checkout
        sys.path.insert(0, REPO_ROOT)

    import jax
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    hf_kw = {**SIZES[args.size], "num_candidates": args.candidates}
    hf_config = transformers.RealmConfig(**hf_kw)
    env = {
        "size": args.size,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "cpus_pinned": cpus,
        "cpu_model": cpu_model(),
        "jax": jax.__version__,
        "jaxlib": __import__("jaxlib").__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "jax_devices": [str(dv) for dv in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "transparent_hugepage": thp_mode(),
        "dtype": "float32",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_busy_elsewhere_before": cpu_busy_elsewhere(),
    }
    print(f"size={args.size} threads={args.threads} (torch {torch.get_num_threads()}, XLA "
          f"pinned to CPUs {cpus}) cpu={env['cpu_model']!r}")
    print(f"GLIBC_TUNABLES={env['glibc_tunables']!r}, transparent_hugepage: "
          f"{env['transparent_hugepage']}")
    print(f"jax {env['jax']}, torch {env['torch']}, transformers {env['transformers']}; "
          f"repeats={args.repeats} warmup={args.warmup}", flush=True)
    if env["cpu_busy_elsewhere_before"] > 0.1:
        print(f"WARNING: {env['cpu_busy_elsewhere_before']:.0%} of the CPUs are busy with other "
              "processes; timings will be noisy (torch's OpenMP suffers most from sharing cores)")

    results: dict[str, Any] = {"env": env, "args": vars(args), "hf_config": hf_config.to_dict()}
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="realm_bench_") as tmp:
        if args.only in (None, "embedder"):
            print("embedder ...", flush=True)
            results["embedder"] = bench_embedder(args, hf_config, tmp)
            ratios["embedder"] = results["embedder"]["ratio"]
        if args.only in (None, "train_step"):
            print("training step ...", flush=True)
            train = results["train_step"] = bench_train_step(args, hf_config, tmp)
            ratios.update({f"train_step_{n}": train[f"ratio_{n}"]
                           for n in ("gathered", "full_logits") if f"ratio_{n}" in train})
    results["env"]["cpu_busy_elsewhere_after"] = cpu_busy_elsewhere()
    results["ratios"] = ratios
    results["goal_ratio"] = 1.3
    print()
    print(table(results))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
