"""Training speed: steps/s and examples/s of REALM pre-training and ORQA fine-tuning.

Run:

    python benchmarks/train_speed.py                 # demo + BERT-base, both tasks (~6 min)
    python benchmarks/train_speed.py --sizes demo --devices-compare 0         # ~2 min
    python benchmarks/train_speed.py --breakdown --wait-idle 600   # + forward/backward split

Each case is one task (`realm_mlm` pre-training, `orqa` fine-tuning) at one model size, built
from the same pieces `realm_jax.train.train` uses (mesh, corpus, `tasks.make_task`,
`optim.make_optimizer`, `train.init_state`, `train.make_train_step`, an index published by
the refresher, `task.dataset`, `task.prepare`, `task.device_inputs`) and stepped as the
training loop steps it: host work and the jitted device step run one after the other.

Sizes:
  demo       `configs/demo_cpu.py` (arg "" and "orqa") unchanged, MiniLM-L6 weights
             (`init.path=minilm`; the demo's ORQA run starts from its pre-training workdir,
             which has the same shapes), batch 16, k = 5, 32 + 32-wordpiece joins, ORQA
             searcher beam 40, reader beam 4 of 64 wordpieces;
  bert_base  the same configs with `model.bert.preset=bert_base`, random init
             (`init.path=""`) and `train.batch_size=--bert-base-batch` (4): BERT-base costs
             8x MiniLM per token, and a few steps must finish in minutes on 2 cores.

The corpus is the demo's generated knowledge base (`--entities` 1130 → ~10k blocks of 32
wordpieces) for every case, so search costs the same everywhere. Index: `--index auto` embeds
the corpus with the initial embedder through `Refresher.cold_start` for the demo (MiniLM: real
retrieval, ~40 s) and publishes a random Gaussian [N, d] table for BERT-base (its random-init
embedder retrieves noise anyway, and embedding 10k blocks with BERT-base takes ~5 min); step
shapes do not depend on which blocks come back. The index is built once per size, outside the
timings (its cost is the refresher's: benchmarks/mips.py).

Per step the timed phases are (median over `--steps` timed steps; the first step, which
follows the ahead-of-time compile and pays first-run costs, and `--warmup` more are untimed):
  data      `next(dataset)`: the time the loop blocks on the grain loader (which prefetches in
            background threads, so most of its CPU cost overlaps the other phases);
  q-embed   (`--host-retrieval` only) `task.prepare`'s query embedding with the current
            query tower, brought to the host (a jitted forward
            of B queries, dispatched from the host);
  search    top-k search of the index: with the exact engine one device call that embeds
            the queries and searches (`EmbedRunner.retrieve_host_rows`, only ids come back);
            with `--host-retrieval` or ScaNN, `Searcher.search` of host embeddings;
  joins     the rest of `task.prepare`: candidate selection, block tokens, query+block joins,
            ORQA's answer matching and span location, frozen block embeddings;
  transfer  `Task.device_inputs` (host numpy → device arrays);
  device    the jitted train step (forward, backward, AdamW), until its outputs are ready.
Steps/s = 1 / median(sum of the phases). Parts of the device step, each its own jit, run
right after every step (so they see the same machine load; `step_parts`): the AdamW update
alone (always), and with `--breakdown` the loss forward, forward + backward, and forward +
backward with dropout off (the difference is the cost of drawing dropout masks).

FLOPs are counted analytically for the padded shapes the step computes (`flops`): per BERT
tower 2 · (non-embedding body parameters) · tokens for the dense layers, plus attention
(4 · L · H per token and layer: QK^T and PV), plus the heads (MLM transform and vocabulary
projection at the masked positions, ORQA's span projections, pooler/projection); training is
3x forward for every trained tower (XLA's `cost_analysis()` of the compiled step, printed next
to it, agrees within 1-3 %: it also counts elementwise ops and AdamW). The host-dispatched
query embedding (forward only) is counted separately (JSON). Achieved FLOP/s = step FLOPs /
device time; MFU = achieved / peak, where the "peak" is the best jitted float32 `jnp.matmul`
rate (n x n, n = 1024…4096, fastest of 5 runs, probed before and after the cases, the better
kept) unless `--peak-flops` gives a datasheet figure (on a GPU, give it: the probe's
precision is XLA's default).

Comparison: the demo cases are also run on 8 emulated CPU devices
(`--xla_force_host_platform_device_count=8`, in a subprocess: the flag must precede jax's
import), batch split over a `data` mesh axis of 8 (the demo mesh is data=-1). The devices
share the same 2 cores, so this measures the cost of the sharded code path, not a speed-up.

The machine may be shared: the load average (`os.getloadavg`) and the fraction of CPU used by
other processes are recorded before each case; `--wait-idle S` waits up to S seconds for
other processes to go quiet first. Medians resist a burst of load, not a steadily busy machine.

Results: tables on stdout (throughput and FLOPs; where the time goes; with `--breakdown`, the
device step's parts) and JSON (`--out`, default benchmarks/results/train_speed.json) with every
per-step time, the configs and overrides, FLOP counts, load, versions and the CPU model.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import bench_utils  # noqa: E402
import numpy as np
from bench_utils import cpu_busy_elsewhere, cpu_model, wait_for_idle, write_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "train_speed.json")
CONFIG = os.path.join(REPO_ROOT, "configs", "demo_cpu.py")
TASK_ARGS = {"realm_mlm": "", "orqa": "orqa"}
PHASES = ("data", "q_embed", "search", "joins", "transfer", "device")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="demo,bert_base", help="comma list: demo, bert_base")
    p.add_argument("--tasks", default="realm_mlm,orqa", help="comma list: realm_mlm, orqa")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed steps after the first one (compile + first run, never timed)")
    p.add_argument("--host-retrieval", action="store_true",
                   help="embed the queries, bring them to the host, then search (the path "
                        "before retrieval moved on the devices): the before of before/after")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the step's forward, forward+backward and forward+backward "
                        "without dropout, each its own jit (~1 min more per case)")
    p.add_argument("--bert-base-batch", type=int, default=4, help="train.batch_size, BERT-base")
    p.add_argument("--entities", type=int, default=1130,
                   help="data.synthetic.num_entities (1130 = the demo's ~10k blocks)")
    p.add_argument("--index", choices=("auto", "embed", "random"), default="auto",
                   help="auto: embed with the initial embedder for demo, random for bert_base")
    p.add_argument("--devices-compare", type=int, default=8,
                   help="also run the demo cases on this many emulated CPU devices (0: skip)")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="peak FLOP/s for MFU (default: the measured float32 matmul rate)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="wait up to S seconds for other processes to go quiet before each case")
    p.add_argument("--malloc", choices=("default", "retain"), default="default",
                   help="glibc malloc tunables (encoder_speed.py); default: as training runs")
    p.add_argument("--workdir", default=None, help="index workdirs (default: a temp dir)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results path")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return bench_utils.parse_args(p, argv)



def load_now(args: argparse.Namespace) -> dict[str, Any]:
    busy = wait_for_idle(args.wait_idle) if args.wait_idle else cpu_busy_elsewhere(0.5)
    return {"loadavg": list(os.getloadavg()), "cpu_busy_elsewhere": busy}


# --------------------------------------------------------------------------- configs


def case_config(size: str, task: str, args: argparse.Namespace):
    from realm_jax import defaults

    overrides: dict[str, Any] = {"data.synthetic.num_entities": args.entities}
    if size == "demo":
        overrides["init.path"] = "minilm"
    elif size == "bert_base":
        overrides.update({"model.bert.preset": "bert_base", "init.path": "",
                          "train.batch_size": args.bert_base_batch})
    else:
        raise SystemExit(f"unknown size {size!r}; accepted: demo, bert_base")
    return defaults.load_config(f"{CONFIG}:{TASK_ARGS[task]}", overrides), overrides


# --------------------------------------------------------------------------- flops


def flops(config) -> dict[str, float]:
    """Analytic model FLOPs of one training step (see module docstring), padded shapes."""
    from realm_jax import defaults

    cfg = defaults.model_config(config)
    b = cfg.bert
    h, v = b.hidden_size, b.vocab_size
    d = cfg.embedding_dim

    def body(seqs: int, length: int) -> float:
        per_token = b.num_layers * (2 * (4 * h * h + 2 * h * b.intermediate_size)
                                    + 4 * length * h)
        return float(seqs * length * per_token)

    def embed_head(seqs: int) -> float:  # pooler and projection, per sequence
        pooler = 2 * h * h if cfg.pooling == "cls_pooler" else 0
        return float(seqs * (pooler + (2 * h * cfg.proj_size if cfg.proj_size else 0)))

    c = config
    bsz, lq = int(c.train.batch_size), int(c.data.query_len)
    query = body(bsz, lq) + embed_head(bsz)
    if c.task == "realm_mlm":
        k, lb, m = int(c.retrieval.k), int(c.data.block_len), int(c.data.max_masks)
        cands = body(bsz * k, lb) + embed_head(bsz * k)
        encoder = body(bsz * k, lq + lb) + bsz * k * m * (2 * h * h + 2 * h * v)
        forward = query + cands + encoder + 2 * bsz * k * d
        parts = {"query_tower": query, "candidate_tower": cands, "encoder": encoder}
    else:
        s, r, lr = int(c.orqa.searcher_beam_size), int(c.orqa.reader_beam_size), int(
            c.data.reader_len)
        sh, w = cfg.span_hidden_size, cfg.max_span_width
        spans = sum(lr - i + 1 for i in range(1, w + 1))
        reader = body(bsz * r, lr) + bsz * r * (lr * 2 * h * 2 * sh + spans * 2 * sh)
        forward = query + reader + 2 * bsz * s * d
        parts = {"query_tower": query, "reader": reader}
    body_params = b.num_layers * (4 * h * h + 2 * h * b.intermediate_size)
    return {
        "train_step": 3.0 * forward,
        "forward": forward,
        **{f"forward_{k}": x for k, x in parts.items()},
        "host_query_embed": query,  # forward only (padding to the mesh is ignored)
        "body_params_per_tower": float(body_params),
    }


def matmul_peak(sizes=(1024, 2048, 4096), repeats: int = 5) -> dict[str, Any]:
    """Best float32 matmul FLOP/s of a jitted `jnp.matmul` on the default device: the fastest
    of `repeats` runs per size (a peak, so the run least disturbed by other load)."""
    import jax
    import jax.numpy as jnp

    rates = {}
    f = jax.jit(jnp.matmul)
    for n in sizes:
        k1, k2 = jax.random.split(jax.random.key(n))
        a = jax.random.normal(k1, (n, n), jnp.float32)
        bm = jax.random.normal(k2, (n, n), jnp.float32)
        f(a, bm).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, bm).block_until_ready()
            times.append(time.perf_counter() - t0)
        rates[n] = 2 * n**3 / min(times)
    return {"flops_per_s": max(rates.values()), "by_size": rates}


# --------------------------------------------------------------------------- one case


class PhaseClock:
    """Accumulates wall time of wrapped callables by phase name (outermost call only, so a
    wrapped method calling another of the same phase is not counted twice)."""

    def __init__(self):
        self.t: dict[str, float] = collections.defaultdict(float)
        self._depth: dict[str, int] = collections.defaultdict(int)

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            self._depth[name] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._depth[name] -= 1
                if not self._depth[name]:
                    self.t[name] += time.perf_counter() - t0
        return timed

    def instrument(self, obj: Any, methods: tuple[str, ...], name: str) -> None:
        """Time `obj`'s methods that exist (instance attributes shadow the bound methods)."""
        found = [m for m in methods if hasattr(obj, m)]
        if not found:
            raise AttributeError(f"{type(obj).__name__} has none of {methods}")
        for m in found:
            setattr(obj, m, self.wrap(name, getattr(obj, m)))


def build_index(config, workdir: str, corpus, mode: str) -> str:
    """Publish version 0 into `workdir` unless one exists: embedded, or a random table."""
    from realm_jax import defaults
    from realm_jax.retrieval import store
    from realm_jax.retrieval.refresher import Refresher, publish_index

    if store.latest_step(workdir) is not None:
        return "existing"
    t0 = time.perf_counter()
    if mode == "embed":
        Refresher(config, workdir, corpus=corpus, progress=False).cold_start()
    else:
        cfg = defaults.model_config(config)
        rng = np.random.default_rng(0)
        table = rng.standard_normal((len(corpus), cfg.embedding_dim))
        table /= np.linalg.norm(table, axis=1, keepdims=True)
        publish_index(config, workdir, 0, table.astype(np.float32), corpus.fingerprint)
    print(f"  index ({mode}) of {len(corpus)} blocks: {time.perf_counter() - t0:.1f} s",
          flush=True)
    return mode


def run_case(size: str, task_name: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    import jax

    from realm_jax import optim, sharding, train
    from realm_jax.data import loaders
    from realm_jax.data.joins import tokenize_corpus
    from realm_jax.retrieval import store
    from realm_jax.retrieval.searcher import open_searcher
    from realm_jax.tasks import make_task

    config, overrides = case_config(size, task_name, args)
    c = config
    load = load_now(args)
    mesh = sharding.make_mesh(dict(c.mesh))
    tokenizer = loaders.load_tokenizer(c)
    corpus = loaders.load_corpus(c)
    blocks = tokenize_corpus(corpus, tokenizer)
    workdir = os.path.join(root, size)
    mode = args.index if args.index != "auto" else ("embed" if size == "demo" else "random")
    index_source = build_index(c, workdir, corpus, mode)
    searcher = open_searcher(store.load_latest(workdir, {"corpus_fingerprint": corpus.fingerprint}),
                             c, mesh)

    task = make_task(c, mesh, corpus, blocks, tokenizer)
    optimizer = optim.make_optimizer(c.train)
    params, opt_state, _, _, origin = train.init_state(
        c, os.path.join(root, f"{size}_{task_name}_ckpt"), task.towers, mesh, optimizer)
    shard_of = lambda t: jax.tree.map(lambda a: a.sharding, t)  # noqa: E731
    train_step = train.make_train_step(task, optimizer, shard_of(params), shard_of(opt_state))
    clock = PhaseClock()
    # Whichever the task's prepare calls: with the exact engine one device call embeds and
    # searches (retrieve_host_rows, timed as "search"); `--host-retrieval` takes the path
    # before it (embeddings to the host, then the search), for the before/after comparison.
    if args.host_retrieval:
        searcher.device_index = None
    clock.instrument(task.queries, ("embed_host_rows", "embed"), "q_embed")
    clock.instrument(task.queries, ("retrieve_host_rows",), "search")
    clock.instrument(searcher, ("search",), "search")
    data = iter(task.dataset(c.seed))

    def host_part() -> tuple[dict[str, Any], dict[str, float]]:
        clock.t.clear()
        t0 = time.perf_counter()
        batch = next(data)
        t1 = time.perf_counter()
        host_inputs, _ = task.prepare(batch, params, searcher)
        t2 = time.perf_counter()
        inputs = jax.block_until_ready(task.device_inputs(host_inputs, searcher))
        t3 = time.perf_counter()
        phases = {"data": t1 - t0, "q_embed": clock.t["q_embed"], "search": clock.t["search"],
                  "joins": (t2 - t1) - clock.t["q_embed"] - clock.t["search"],
                  "transfer": t3 - t2}
        return inputs, phases

    # Compile step: the first prepare also compiles the query encoder and the search.
    inputs, _ = host_part()
    rng = jax.random.fold_in(jax.random.key(c.seed), 0)
    t0 = time.perf_counter()
    with sharding.activate(mesh, task.rules):
        compiled = train_step.jitted.lower(params, opt_state, inputs, rng).compile()
    compile_s = time.perf_counter() - t0
    print(f"  compiled the step in {compile_s:.1f} s", flush=True)
    cost = compiled.cost_analysis()  # XLA's own count, per device (SPMD), a cross-check
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    parts = step_parts(task, optimizer, params, opt_state, inputs, rng, args.breakdown)

    steps: list[dict[str, float]] = []
    losses = []
    for step in range(1 + args.warmup + args.steps):
        if step:
            inputs, phases = host_part()
        rng = jax.random.fold_in(jax.random.key(c.seed), step)
        t0 = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, inputs, rng)
        metrics = jax.device_get(metrics)
        jax.block_until_ready((params, opt_state))
        device = time.perf_counter() - t0
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"{size}/{task_name}: non-finite loss at step {step}")
        losses.append(loss)
        # The parts run right after the step they dissect, so both see the same machine load.
        part_s = {}
        for name, fn in parts.items():
            t0 = time.perf_counter()
            params, opt_state = fn(params, opt_state, inputs, rng)
            part_s[name] = time.perf_counter() - t0
        if step > args.warmup:
            steps.append({**phases, "device": device, "total": sum(phases.values()) + device,
                          **part_s})
        print(f"  step {step}: {device:.2f} s device"
              + (f", {sum(phases.values()):.2f} s host" if step else " (first run)")
              + "".join(f", {k} {v:.2f} s" for k, v in part_s.items()), flush=True)

    med = {p: statistics.median(s[p] for s in steps) for p in steps[0]}
    fl = flops(c)
    n_params = {t: int(sum(x.size for x in jax.tree.leaves(params[t]))) for t in params}
    bsz = int(c.train.batch_size)
    return {
        "size": size, "task": task_name, "devices": len(jax.devices()),
        "mesh": dict(mesh.shape), "batch_size": bsz,
        "config": f"configs/demo_cpu.py:{TASK_ARGS[task_name]}", "overrides": overrides,
        "model": c.model.to_dict(), "data": {k: c.data[k] for k in (
            "query_len", "block_len", "reader_len", "max_masks")},
        "retrieval_k": int(c.retrieval.k), "orqa_beams": [int(c.orqa.searcher_beam_size),
                                                          int(c.orqa.reader_beam_size)],
        "num_blocks": len(corpus), "index": index_source if index_source != "existing" else mode,
        "origin": origin, "params_per_tower": n_params, "load_before": load,
        "compile_s": compile_s, "steps": steps, "median_s": med, "losses": losses,
        "steps_per_s": 1.0 / med["total"], "examples_per_s": bsz / med["total"],
        "device_steps_per_s": 1.0 / med["device"],
        "flops": fl, "xla_flops_per_device": float(cost.get("flops", float("nan"))),
        # Summed over devices: replicated work (AdamW on replicated parameters) counts n times.
        "xla_cost_analysis_flops": float(cost.get("flops", float("nan"))) * len(jax.devices()),
        "achieved_flops_per_s": fl["train_step"] / med["device"],
        # Whole loop iteration: step and host-side query embedding FLOPs over the step time.
        "end_to_end_flops_per_s": (fl["train_step"] + fl["host_query_embed"]) / med["total"],
    }


def step_parts(task, optimizer, params, opt_state, inputs, rng, breakdown: bool
               ) -> dict[str, Any]:
    """Compiled parts of the device step, each `(params, opt_state, inputs, rng) → (params,
    opt_state)` and blocking:

      adamw                  the optimiser update alone (params and state donated, as in the
                             step; a stand-in gradient of the same layout);
    and with `breakdown`:
      forward                the task's loss;
      forward_backward       the gradient of every parameter, reduced to its global norm as
                             the step does (a scalar out: no fresh gradient buffers);
      forward_backward_no_dropout  the same with every dropout rate 0: the difference is the
                             cost of drawing dropout masks (threefry random bits on the CPU).
    """
    import copy

    import jax
    import optax

    from realm_jax import sharding
    from realm_jax.tasks import make_task

    def update(p, o, g):
        u, o = optimizer.update(g, o, p)
        return optax.apply_updates(p, u), o

    adamw = jax.jit(update, donate_argnums=(0, 1))
    grads = jax.tree.map(lambda x: x * 1e-3, params)
    out: dict[str, Any] = {
        "adamw": lambda p, o, x, r: jax.block_until_ready(adamw(p, o, grads))}
    if not breakdown:
        return _warm(out, params, opt_state, inputs, rng)

    quiet = copy.deepcopy(task.config)
    quiet.unlock()
    quiet.model.bert.hidden_dropout = quiet.model.bert.attention_dropout = 0.0
    quiet.model.embed_dropout = 0.0
    quiet.lock()
    no_dropout = make_task(quiet, task.mesh, task.corpus, task.blocks, task.tokenizer)

    def grad_norm(t):
        return jax.jit(lambda p, x, r: optax.tree.norm(jax.grad(
            lambda p_: t.loss(p_, x, r)[0])(p)))

    scalars = {
        "forward": jax.jit(lambda p, x, r: task.loss(p, x, r)[0]),
        "forward_backward": grad_norm(task),
        "forward_backward_no_dropout": grad_norm(no_dropout),
    }
    with sharding.activate(task.mesh, task.rules):
        for name, fn in scalars.items():
            exe = fn.lower(params, inputs, rng).compile()
            out[name] = lambda p, o, x, r, exe=exe: (jax.block_until_ready(exe(p, x, r)),
                                                     (p, o))[1]
    return _warm(out, params, opt_state, inputs, rng)


def _warm(parts: dict[str, Any], params, opt_state, inputs, rng) -> dict[str, Any]:
    """Run each part once (compiles the lazily jitted ones) before any timing. AdamW's
    donation consumes the arrays it is given, so it runs on copies here."""
    import jax

    for fn in parts.values():
        fn(*jax.tree.map(lambda a: a.copy(), (params, opt_state)), inputs, rng)
    return parts


# --------------------------------------------------------------------------- driver


def run_child(args: argparse.Namespace, root: str, devices: int) -> list[dict[str, Any]]:
    """The demo cases on `devices` emulated CPU devices, in a fresh process."""
    out = os.path.join(root, f"child_{devices}.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + f" --xla_force_host_platform_device_count={devices}").strip())
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--sizes", "demo",
           "--tasks", args.tasks, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--entities", str(args.entities), "--index", args.index, "--devices-compare", "0",
           "--wait-idle", str(args.wait_idle), "--workdir", root, "--out", out]
    print(f"\n{devices} emulated devices (subprocess) ...", flush=True)
    subprocess.run(cmd, env=env, check=True)
    with open(out) as f:
        return json.load(f)["cases"]


def _fmt_flops(x: float) -> str:
    return f"{x / 1e12:.2f} T" if x >= 1e12 else f"{x / 1e9:.1f} G"


def tables(results: dict[str, Any]) -> str:
    peak = results["peak"]["flops_per_s"]
    rows = [("case", "dev", "B", "steps/s", "examples/s", "step s", "device s", "device share",
             "FLOP/step", "XLA count", "achieved", "MFU", "compile s")]
    for r in results["cases"]:
        m = r["median_s"]
        rows.append((
            f"{r['size']}/{r['task']}", str(r["devices"]), str(r["batch_size"]),
            f"{r['steps_per_s']:.3f}", f"{r['examples_per_s']:.2f}", f"{m['total']:.2f}",
            f"{m['device']:.2f}", f"{m['device'] / m['total']:.0%}",
            _fmt_flops(r["flops"]["train_step"]),
            f"{r['xla_cost_analysis_flops'] / r['flops']['train_step']:.3f}x",
            _fmt_flops(r["achieved_flops_per_s"]) + "FLOP/s",
            f"{r['achieved_flops_per_s'] / peak:.0%}", f"{r['compile_s']:.0f}"))
    lines = ["FLOP/step: analytic model FLOPs; XLA count: the compiled step's cost_analysis() "
             "FLOPs per device x devices (elementwise ops, softmax, LayerNorm, AdamW included) "
             "/ analytic",
             _table(rows), ""]
    rows = [("case", "dev", *(p.replace("_", "-") for p in PHASES), "(adamw)", "host total",
             "load")]
    for r in results["cases"]:
        m = r["median_s"]
        host = m["total"] - m["device"]
        rows.append((f"{r['size']}/{r['task']}", str(r["devices"]),
                     *(f"{m[p] * 1e3:.0f} ({m[p] / m['total']:.0%})" for p in PHASES),
                     f"{m['adamw'] * 1e3:.0f}", f"{host * 1e3:.0f} ({host / m['total']:.0%})",
                     f"{r['load_before']['loadavg'][0]:.1f}"))
    lines += ["median ms per step (share of the step); adamw: the optimiser update alone, "
              "part of device; load: 1-min load average before the case",
              _table(rows)]
    rows = [("case", "dev", "device step", "forward", "backward", "of which dropout masks",
             "adamw", "rest")]
    for r in results["cases"]:
        m = r["median_s"]
        if "forward_backward" not in m:
            continue
        dev, fb = m["device"], m["forward_backward"]
        cells = {"forward": m["forward"], "backward": fb - m["forward"],
                 "dropout": fb - m["forward_backward_no_dropout"], "adamw": m["adamw"],
                 "rest": dev - fb - m["adamw"]}
        rows.append((f"{r['size']}/{r['task']}", str(r["devices"]), f"{dev * 1e3:.0f}",
                     *(f"{x * 1e3:.0f} ({x / dev:.0%})" for x in cells.values())))
    if len(rows) > 1:
        lines += ["", "device step, median ms (share of the device step); each part its own "
                  "jit, run right after each step; dropout masks = fwd+bwd minus fwd+bwd with "
                  "dropout off; rest = step - fwd+bwd - adamw (< 0: noise, fusion)",
                  _table(rows)]
    for cmp in results.get("comparisons", []):
        lines.append(f"{cmp['case']}: {cmp['devices']} emulated devices / 1 device: steps/s "
                     f"{cmp['steps_per_s_ratio']:.2f}x, device step {cmp['device_ratio']:.2f}x")
    lines.append(f"peak for MFU: {_fmt_flops(peak)}FLOP/s ({results['peak']['source']}; "
                 "float32 matmul before/after: " + ", ".join(
                     _fmt_flops(results["matmul_peak"][k]["flops_per_s"]) + "FLOP/s"
                     for k in ("before", "after")) + ")")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(rows[0]), "-+-".join("-" * w for w in widths), *map(fmt, rows[1:])])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if argv is None and args.malloc == "retain":
        from encoder_speed import set_malloc

        set_malloc("retain")
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import jax

    sizes = [s for s in args.sizes.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASK_ARGS:
            raise SystemExit(f"unknown task {t!r}; accepted: {sorted(TASK_ARGS)}")
    env = {
        "cpu_model": cpu_model(), "cpus": len(os.sched_getaffinity(0)),
        "backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__, "python": sys.version.split()[0],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_before": list(os.getloadavg()), "cpu_busy_elsewhere_before": cpu_busy_elsewhere(),
    }
    if not args.child:
        print(f"backend={env['backend']} devices={len(jax.devices())} cpus={env['cpus']} "
              f"cpu={env['cpu_model']!r} load={env['loadavg_before'][0]:.1f} "
              f"(other processes {env['cpu_busy_elsewhere_before']:.0%})", flush=True)
        if env["cpu_busy_elsewhere_before"] > 0.1:
            print("WARNING: other processes are using the CPUs; timings will be noisy "
                  "(medians are reported; --wait-idle S waits for quiet)")
    results: dict[str, Any] = {"env": env, "args": vars(args), "cases": []}
    with tempfile.TemporaryDirectory(prefix="realm_train_speed_") as tmp:
        root = args.workdir or tmp
        if not args.child:
            print("float32 matmul peak ...", flush=True)
            results["matmul_peak"] = {"before": matmul_peak()}
        for size in sizes:
            for task in tasks:
                print(f"\n{size}/{task} ({len(jax.devices())} device(s)) ...", flush=True)
                results["cases"].append(run_case(size, task, args, root))
        n = args.devices_compare
        if (not args.child and n > 1 and "demo" in sizes and env["backend"] == "cpu"
                and len(jax.devices()) == 1):
            results["comparisons"] = []
            for other in run_child(args, root, n):
                base = next(r for r in results["cases"]
                            if (r["size"], r["task"]) == (other["size"], other["task"]))
                results["cases"].append(other)
                results["comparisons"].append({
                    "case": f"{other['size']}/{other['task']}", "devices": other["devices"],
                    "steps_per_s_ratio": other["steps_per_s"] / base["steps_per_s"],
                    "device_ratio": other["median_s"]["device"] / base["median_s"]["device"],
                })
    if not args.child:
        # Load varies over a run: the measured peak is the better of a probe before and after.
        measured = results["matmul_peak"]
        measured["after"] = matmul_peak()
        measured["flops_per_s"] = max(measured["before"]["flops_per_s"],
                                      measured["after"]["flops_per_s"])
        results["peak"] = ({"flops_per_s": args.peak_flops, "source": "--peak-flops"}
                           if args.peak_flops else
                           {"flops_per_s": measured["flops_per_s"],
                            "source": "measured float32 matmul"})
    env["loadavg_after"] = list(os.getloadavg())
    env["cpu_busy_elsewhere_after"] = cpu_busy_elsewhere()
    if not args.child:
        for r in results["cases"]:
            r["mfu"] = r["achieved_flops_per_s"] / results["peak"]["flops_per_s"]
        print()
        print(tables(results))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
