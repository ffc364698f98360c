"""One process of a multi-process CPU training run (tests/test_multihost.py starts two).

    python tests/multihost_worker.py --process_id 0 --num_processes 2 --port 12345 \
        --devices 4 --workdir DIR --out DIR/result [--set train.steps=3 ...]

Each process emulates `--devices` CPU devices; `jax.distributed.initialize` joins them into one
global mesh over 127.0.0.1 with gloo collectives, exactly how the hosts of a TPU pod form one
(there the coordinator is found from the TPU environment). Runs `train` on configs/tiny.py and
has the primary write the final parameters (gathered from all processes) to OUT.npz and a
summary to OUT.json. With `--check=index`, instead exercises the agreement helpers and an
external-mode `LiveIndex` whose hosts' watchers hold different versions; each process writes
what it saw to OUT.<process>.json. With `--check=answer`, every process loads the ORQA workdir
(made by the test) with `Realm.load` and answers the questions given with `--question` (an
evaluation on a pod runs this way), writing its answers to OUT.<process>.json. With
`--check=refresh`, the processes are a multi-host refresher (`python -m realm_jax.refresh
--once`): cold start, then the newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--process_id", type=int, required=True)
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--question", action="append", default=[], help="for --check=answer")
    p.add_argument("--check", choices=["train", "index", "answer", "refresh"], default="train")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    # Before jax is imported: the device count is fixed when the CPU backend starts.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax

    # Cross-process collectives on CPU go through gloo (the default in recent JAX; explicit so
    # an older or differently configured JAX fails here rather than hanging in a collective).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=120)
    import numpy as np

    from realm_jax import defaults, multihost
    from realm_jax.train import train

    checks = {"index": check_index, "answer": check_answer, "refresh": check_refresh}
    if args.check in checks:
        checks[args.check](args)
        jax.distributed.shutdown()
        return
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    config = defaults.load_config(os.path.join(ROOT, "configs/tiny.py"), overrides)
    result = train(config, args.workdir, progress=False)
    params = multihost.gather(result.params)  # a collective: every process calls it
    if multihost.is_primary():
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(args.out + ".npz", **flat)
        with open(args.out + ".json", "w") as f:
            json.dump({"step": result.step, "origin": result.origin,
                       "history": result.history, "process_count": jax.process_count(),
                       "local_devices": jax.local_device_count(),
                       "devices": jax.device_count()}, f)
    multihost.barrier("multihost_worker_done")
    jax.distributed.shutdown()


def check_index(args: argparse.Namespace) -> None:
    """Process 0's watcher holds v5, process 1's none: both must search v5 after a step."""
    import jax
    import numpy as np

    from realm_jax import defaults, multihost, sharding
    from realm_jax.data.pipeline import mesh_shard
    from realm_jax.retrieval import store
    from realm_jax.retrieval.live import LiveIndex
    from realm_jax.retrieval.watcher import IndexWatcher

    me = jax.process_index()
    seen: dict = {"agree": [multihost.agree(v) for v in ([None, 3][me], [True, False][me],
                                                        [7, 9][me])],
                  "failed": multihost.gather(np.array([me == 1])).tolist()}
    mesh = sharding.make_mesh({"data": -1})
    rows = multihost.process_rows(sharding.batch_sharding(mesh, 2), (8, 3))
    shard = mesh_shard(mesh)
    seen.update(rows=[rows.start, rows.stop], shard=[shard.shard_index, shard.shard_count])

    config = defaults.load_config(os.path.join(ROOT, "configs/tiny.py"),
                                  {"refresh.mode": "external", "refresh.wait_timeout_s": 60.0})
    tables = np.random.default_rng(0).normal(size=(2, 37, 16)).astype(np.float32)
    expect = {"corpus_fingerprint": "fp"}
    if multihost.is_primary():
        store.publish(args.workdir, 0, tables[0], expect)
    multihost.barrier("v0_published")
    live = LiveIndex(config, args.workdir, mesh, corpus_fp="fp")
    live.start(0)
    seen["start"] = live.searcher.step
    live._watcher.close()  # from here on, each host's watcher polls only when told to
    live._watcher = IndexWatcher(args.workdir, expect=expect, start=False)
    if multihost.is_primary():
        store.publish(args.workdir, 5, tables[1], expect)
        live._watcher.poll_once()  # only the primary has seen v5
    multihost.barrier("v5_published")
    live.before_step(5, {})
    ids, _ = live.searcher.search(tables[1][:8], 3)  # a collective over the sharded table
    seen.update(step=live.searcher.step, swaps=live.swaps, ids=ids.tolist(),
                want=np.argsort(-tables[1][:8] @ tables[1].T, axis=1)[:, :3].tolist())
    live.close()
    with open(f"{args.out}.{me}.json", "w") as f:
        json.dump(seen, f)
    multihost.barrier("check_index_done")


def answers_seen(realm, questions: list[str]) -> dict:
    """What `realm` answers and retrieves (top 3) for `questions`, as JSON-able lists; the
    test computes the same on one process to compare."""
    return {"answers": [[a.text, a.block_id, a.score, a.start_char, a.end_char]
                        for a in realm.answer(questions)],
            "retrieved": [[[r.block_id, r.score] for r in row]
                          for row in realm.retrieve(questions, 3)]}


def check_answer(args: argparse.Namespace) -> None:
    """Every process answers the same questions over the 8-device mesh of both processes."""
    import jax

    from realm_jax import multihost
    from realm_jax.inference import Realm

    realm = Realm.load(args.workdir, batch_size=16)
    seen = {"devices": [d.process_index for d in realm.mesh.devices.flat],
            **answers_seen(realm, args.question)}
    with open(f"{args.out}.{jax.process_index()}.json", "w") as f:
        json.dump(seen, f)
    multihost.barrier("check_answer_done")


def check_refresh(args: argparse.Namespace) -> None:
    """The processes are one refresher (`python -m realm_jax.refresh --once` on a pod)."""
    import jax

    from realm_jax import defaults, multihost
    from realm_jax.retrieval.refresher import Refresher

    config = defaults.load_config(os.path.join(args.workdir, "config.json"))
    published = Refresher(config, args.workdir, progress=False).run(once=True)
    with open(f"{args.out}.{jax.process_index()}.json", "w") as f:
        json.dump({"published": published}, f)
    multihost.barrier("check_refresh_done")


if __name__ == "__main__":
    main(sys.argv[1:])
