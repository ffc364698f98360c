"""Ahead-of-time compilation of the train step at the paper's sizes: XLA's per-device memory.

    python benchmarks/aot.py                           # both tasks, 8 emulated CPU devices
    python benchmarks/aot.py --tasks realm_mlm --batch 128 --mesh fsdp=-1
    python benchmarks/aot.py --arg tiny --out /tmp/aot.json       # smoke run, seconds
    PYTHONPATH=/tmp/libtpu python benchmarks/aot.py --target v4:2x2x2  # XLA:TPU, no TPU needed

Before renting a pod, check that the step fits: lower and compile the real jitted, sharded
train step (`train.make_train_step`, the one `train` runs) for the paper's configs without
allocating anything. Parameters and optimiser state are `jax.ShapeDtypeStruct`s with their
shardings (`train.abstract_train_state`), the batch is `Task.abstract_inputs` (the layout
`pipeline.to_global` gives `Task.prepare`'s output), and `compiled.memory_analysis()` reports
what one device needs: arguments (parameters, Adam state, the batch), outputs, how much of the
outputs alias donated arguments, and temporaries (activations kept for the backward pass, the
gradients, XLA scratch). Peak ≈ arguments + outputs − aliased + temporaries.

Cases:
  realm_mlm  configs/pretrain_ccnews.py: BERT-base embedder + knowledge-augmented encoder,
             batch 512, k = 8 candidates, 96-wordpiece queries, 288-wordpiece blocks;
  orqa       configs/orqa_nq.py: BERT-base query tower + reader, batch 16, 5000 frozen block
             embeddings per question, 5 blocks of 320 wordpieces read.

Targets:
  cpu (default)  `--devices` (8) emulated CPU devices: XLA:CPU compiles the same sharded program,
                 but its fusion, scheduling and bf16 handling differ from XLA:TPU's (it keeps,
                 e.g., attention-dropout random bits as u32 [B·K, heads, L, L] buffers), so its
                 temporaries overstate what a TPU chip needs;
  a TPU topology e.g. `v4:2x2x2` (8 v4 chips, megacore) or `v5e:2x4`: XLA:TPU compiles for
                 that slice on this CPU-only machine (MaxText's train_compile trick); needs
                 libtpu importable (`pip install --target /tmp/libtpu --no-deps
                 libtpu==<the version jax[tpu] pins>`, then PYTHONPATH=/tmp/libtpu).
HBM per chip: v4 32 GiB, v5e 16 GiB. With the configs' pure data parallelism the per-device
numbers depend on the batch per device: 512 over 8 devices is 64 examples each, where a v4-64
(32 chips) holds 16, i.e. `--batch 128` here. Compiling BERT-base on 2 CPU cores takes minutes.

Writes a table to stdout and JSON to benchmarks/results/aot.json (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"realm_mlm": "configs/pretrain_ccnews.py", "orqa": "configs/orqa_nq.py"}
GIB = 1024**3


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="realm_mlm,orqa", help="comma-separated: realm_mlm, orqa")
    p.add_argument("--target", default="cpu",
                   help="cpu, or a TPU topology such as v4:2x2x2 / v5e:2x4 (needs libtpu)")
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices (--target cpu)")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    p.add_argument("--mesh", default="", help="e.g. fsdp=-1 or data=4,fsdp=2 (default: config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="config override, e.g. --set model.bert.remat=true")
    p.add_argument("--blocks", type=int, default=13_353_718,
                   help="index rows ORQA's step reads its block embeddings from (default: "
                        "REALM's Wikipedia, 13,353,718 blocks)")
    p.add_argument("--arg", default="", help="config arg: tiny for a seconds-long smoke run")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/aot.json"))
    return p.parse_args(argv)  # one-word flags: no spelling to normalise


def parse_mesh(spec: str) -> dict[str, int]:
    axes = {"data": 1, "fsdp": 1, "model": 1}
    for item in filter(None, spec.split(",")):
        name, _, size = item.partition("=")
        axes[name.strip()] = int(size)
    return axes


def per_device_bytes(tree: Any) -> int:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def target_devices(target: str) -> list:
    """The devices to compile for: this process's (emulated CPU) ones, or a TPU slice's."""
    import jax

    if target == "cpu":
        return jax.devices()
    from jax.experimental import topologies

    chip = "megacore" if target.split(":")[0] in ("v4", "v5p") else "default"
    return topologies.get_topology_desc(platform="tpu", topology_name=target,
                                        chip_config_name=chip).devices


def compile_case(task_name: str, args: argparse.Namespace, devices: list) -> dict[str, Any]:
    """Lower and compile `task_name`'s train step; its memory analysis and our accounting."""
    import jax

    from realm_jax import defaults, optim, sharding, train
    from realm_jax.tasks import make_task

    overrides: dict[str, Any] = {"task": task_name}
    if args.batch:
        overrides["train.batch_size"] = args.batch
    if args.mesh:
        overrides["mesh"] = parse_mesh(args.mesh)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    spec = os.path.join(ROOT, CONFIGS[task_name]) + (f":{args.arg}" if args.arg else "")
    config = defaults.load_config(spec, overrides)
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    task = make_task(config, mesh, None, None, None)  # the loss only: no data needed
    optimizer = optim.make_optimizer(config.train)
    t0 = time.perf_counter()
    params, opt_state = train.abstract_train_state(config, task.towers, mesh, optimizer)
    step = train.make_train_step(task, optimizer, train._shardings(params),
                                 train._shardings(opt_state))
    inputs = task.abstract_inputs(int(config.train.batch_size), args.blocks)
    key = jax.eval_shape(jax.random.key, 0)
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    with sharding.activate(mesh, task.rules):  # as the step's first call traces it
        lowered = step.jitted.lower(params, opt_state, inputs, rng)
    t_lower = time.perf_counter() - t0
    row: dict[str, Any] = {
        "task": task_name, "config": CONFIGS[task_name], "overrides": args.set,
        "target": args.target, "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "devices": mesh.size, "batch": int(config.train.batch_size),
        "batch_per_device": int(config.train.batch_size) // sharding.mesh_batch_size(
            mesh, task.rules),
        "bert": dict(config.model.bert), "towers": list(task.towers),
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        "params_bytes_per_device": per_device_bytes(params),
        "opt_state_bytes_per_device": per_device_bytes(opt_state),
        "inputs_bytes_per_device": per_device_bytes(inputs), "lower_s": round(t_lower, 1),
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # XLA:TPU refuses a program that cannot fit in HBM: exactly what this check is for.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                         str(e))
        return {**row, "fits": False, "error": str(e).splitlines()[0][:500],
                "temp_gib_needed": float(need.group(1)) if need else float("nan"),
                "hbm_gib": float(need.group(2)) if need else float("nan"),
                "compile_s": round(time.perf_counter() - t0 - t_lower, 1)}
    t_compile = time.perf_counter() - t0 - t_lower
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla = {k: int(getattr(mem, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "generated_code_size_in_bytes")}
    peak = (xla["argument_size_in_bytes"] + xla["output_size_in_bytes"]
            - xla["alias_size_in_bytes"] + xla["temp_size_in_bytes"])
    return {
        **row, "fits": True, "xla": xla, "peak_bytes_per_device": peak,
        "flops_per_device": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "compile_s": round(t_compile, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    def gib(n: float) -> str:
        return f"{n / GIB:.2f}"

    head = ("| task | target | overrides | mesh | batch (per dev) | params | params/dev GiB | "
            "Adam/dev GiB | batch/dev GiB | XLA args GiB | outputs GiB | aliased GiB | temp GiB | "
            "peak GiB | TFLOP/dev | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mesh = "×".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        cells = [r["task"], r["device_kind"], " ".join(r["overrides"]) or "-", mesh,
                 f"{r['batch']} ({r['batch_per_device']})", f"{r['parameters'] / 1e6:.1f}M",
                 gib(r["params_bytes_per_device"]), gib(r["opt_state_bytes_per_device"]),
                 gib(r["inputs_bytes_per_device"])]
        if r["fits"]:
            x = r["xla"]
            cells += [gib(x[k]) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                          "alias_size_in_bytes", "temp_size_in_bytes")]
            cells += [gib(r["peak_bytes_per_device"]), f"{r['flops_per_device'] / 1e12:.2f}"]
        else:  # XLA:TPU's refusal: temporaries needed vs HBM available
            cells += ["-", "-", "-", f"{r['temp_gib_needed']:.2f}",
                      f"OOM (HBM {r['hbm_gib']:.2f})", "-"]
        lines.append("| " + " | ".join([*cells, f"{r['compile_s']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse(argv)
    # Before jax is imported: the CPU backend fixes its device count when it starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu, compile-only: no pod
    sys.path.insert(0, ROOT)
    import jax

    devices = target_devices(args.target)

    rows = []
    for name in filter(None, args.tasks.split(",")):
        if name not in CONFIGS:
            raise SystemExit(f"--tasks: unknown task {name!r}; accepted: {sorted(CONFIGS)}")
        print(f"compiling the {name} train step ({CONFIGS[name]}) ...", flush=True)
        rows.append(compile_case(name, args, devices))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"created": datetime.datetime.now(datetime.UTC).isoformat(),
                   "jax": jax.__version__, "backend": jax.default_backend(),
                   "cpu": platform.processor() or platform.machine(),
                   "argv": argv, "cases": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
