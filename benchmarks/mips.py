"""MIPS benchmark: exact (numpy, our JAX engine) vs ScaNN vs FAISS, plus the index refresher.

Run (benchmark-only dependencies: `pip install faiss-cpu matplotlib`):

    python benchmarks/mips.py            # quick: N = 100k, 1,000 queries (~75 s on 2 cores)
    python benchmarks/mips.py --full     # N = 1M (~5.5 min; HNSW build dominates)
    python benchmarks/mips.py --real 20000   # real-text sanity run: MiniLM-embedded sentences

Data. Embedding 100k blocks with the MiniLM-initialised embedder takes tens of minutes on a
2-core CPU (see the refresher figures below), so the default table is a clustered Gaussian
mixture: `--clusters` (default N/100) centres ~ N(0, I_128); each row is a random centre +
`--cluster-std` (default 1.25) · N(0, I_128), scaled so that E‖x‖² = 1 (the scale ScaNN's
anisotropic threshold 0.2 is meant for; the other methods' rankings do not depend on it).
Queries are 1,000 fresh draws from the same mixture. How hard the data is for partitioning
methods depends steeply on the std (1.0: nearly separable clusters, 2.0: almost no structure).
`--real N` instead embeds N short generated sentences (and the queries: generated questions)
with the real MiniLM weights (mean pooling) and the embedder's random 384→128 projection +
LayerNorm, i.e. what the refresher's cold start produces; it writes `mips_real*` files and
skips the refresher section.

Methods (every search is one batch of all queries, k = 10; all methods may use every core):
  * numpy exact: `queries @ table.T` + `argpartition` (+ sort of the k); the QPS baseline.
  * JAX exact: `ExactIndex` (realm_jax.retrieval.mips) on 1 CPU device and on 8 devices, each in
    a subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before jax
    is imported). The 8 emulated devices share the same cores: this exercises the sharded
    code path (local top-k, all-gather, merge), it is not a scaling measurement.
  * ScaNN: `ScannIndex` (realm_jax.retrieval.scann_index), num_leaves = √N (ScannConfig's rule;
    `--scann-num-leaves` to change), at several (num_leaves_to_search, reorder_k) settings with
    `parallel_search=True`; plus the default leaves/10 setting single-threaded
    (`parallel_search=False`, the ScannConfig default, which the refresher's config keeps).
  * FAISS (faiss-cpu) peers: `IndexHNSWFlat` (M=32, inner product) at several efSearch, and
    `IndexIVFFlat` (inner product, nlist = √N) at several nprobe.

Recall@10 is against float64 exact ground truth. Timing: one untimed warm-up search, then
`--repeats` timed ones; QPS = queries / the fastest of them (ann-benchmarks' convention, and the
estimate least disturbed by other processes on a shared machine; the median is in the JSON).
Build time is timed once per index (ScaNN is rebuilt per setting: num_leaves_to_search is
fixed at build time).

Goals (issue #3): ScaNN recall@10 ≥ 0.95 at ≥ 10× numpy-exact QPS, and ≥ FAISS's QPS at equal
recall: each FAISS method's recall→QPS Pareto frontier is interpolated (log QPS, linear in
recall) at the ScaNN point's recall; outside a frontier's measured range the value is only a
bound, and the comparison is "undetermined" when the bound does not decide. The nearest
measured FAISS points are reported too.

Refresher (skip with `--skip-refresher`): documents/s of the block runner
(`embedding.EmbedRunner`) with a MiniLM config (preset minilm_l6_h384, mean pooling, init
"minilm", batch 32, 128-wordpiece blocks) MEASURED on `--refresh-sample` generated blocks
(compile excluded), the time to embed 100k blocks EXTRAPOLATED from it, and `publish_index`
(engine scann and exact) MEASURED on 100k rows of the benchmark table (ScaNN build + save +
sha256 + fsync + rename).

Output: a table on stdout, JSON (`--out`, default benchmarks/results/mips.json) and a
recall-vs-QPS plot (`--plot`, default benchmarks/results/mips_recall_qps.png; log QPS on y,
one line per method, as ann-benchmarks draws it); `--full` writes mips_full*, `--real`
mips_real*. Run on an idle machine: the CPU share used by other processes is measured before
each timed section (`cpu_busy_elsewhere_*` in the JSON); `--wait-idle S` waits up to S seconds
for quiet before each section.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import bench_utils  # noqa: E402
import numpy as np
from bench_utils import cpu_busy_elsewhere, cpu_model, wait_for_idle

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results")
GOAL_RECALL = 0.95
GOAL_SPEEDUP = 10.0

# ScaNN settings: (fraction of num_leaves searched, reorder_k). With N = 100k (316 leaves):
# 9, 32, 63, 95 (twice) and 158 leaves. The second is ScannConfig's default (leaves / 10).
SCANN_SETTINGS = ((0.03, 100), (0.1, 100), (0.2, 100), (0.3, 100), (0.3, 400), (0.5, 200))
SCANN_SINGLE_THREAD = 1  # index into SCANN_SETTINGS also measured with parallel_search=False
# --scann-grid: the build-time knobs as well (ScannConfig fields; "leaves_x" scales √N leaves).
# dims_per_block 4 halves the asymmetric-hashing lookups per scored row (less accurate codes,
# made up by exact reordering); more, smaller leaves score fewer rows per searched fraction;
# the anisotropic threshold is relative to the rows' norm (≈ 1 here; LayerNorm'd embeddings
# have norm ≈ √d). 12 + 2 builds.
SCANN_GRID = tuple(
    dict(leaves_x=lx, frac=frac, reorder_k=reorder, dims_per_block=dpb,
         anisotropic_quantization_threshold=0.2)
    for dpb in (2, 4) for lx in (1, 2) for frac, reorder in ((0.03, 50), (0.05, 100), (0.1, 50))
) + (
    dict(leaves_x=1, frac=0.05, reorder_k=100, dims_per_block=2,
         anisotropic_quantization_threshold=0.1),
    dict(leaves_x=1, frac=0.05, reorder_k=100, dims_per_block=2,
         anisotropic_quantization_threshold=0.5))
HNSW_EF = (16, 32, 64, 128, 256, 512)
HNSW_M = 32
IVF_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Array = np.ndarray


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="N = 1M instead of 100k")
    p.add_argument("--n", type=int, default=None, help="table rows (overrides --full)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=None,
                   help="mixture components (default N / 100: ~100 rows per cluster at any N)")
    p.add_argument("--cluster-std", type=float, default=1.25,
                   help="within-cluster std relative to the centres' (1.0 is nearly separable, "
                        "2.0 nearly structureless)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="timed searches per setting")
    p.add_argument("--real", type=int, default=0, metavar="N",
                   help="embed N generated sentences with MiniLM instead of the mixture")
    p.add_argument("--real-len", type=int, default=32, help="wordpieces per --real sentence")
    p.add_argument("--scann-num-leaves", type=int, default=None,
                   help="ScaNN num_leaves (default √N, ScannConfig's rule)")
    p.add_argument("--scann-grid", action="store_true",
                   help="also ScaNN's build-time knobs (SCANN_GRID: dims per block, leaves, "
                        "reorder, anisotropic threshold), 14 more builds")
    p.add_argument("--skip-refresher", action="store_true")
    p.add_argument("--skip-jax8", action="store_true", help="skip the 8-device subprocess")
    p.add_argument("--refresh-sample", type=int, default=512, help="blocks embedded (timed)")
    p.add_argument("--refresh-blocks", type=int, default=100_000,
                   help="corpus size the refresher figures are extrapolated/published for")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each timed section, wait up to this many seconds for other "
                        "processes to leave the CPU")
    p.add_argument("--out", default=None,
                   help="JSON path (default results/mips.json; mips_full.json with --full, "
                        "mips_real.json with --real)")
    p.add_argument("--plot", default=None,
                   help="PNG path (default results/mips_recall_qps.png, or with the same "
                        "suffix as --out)")
    p.add_argument("--jax-worker", default=None, help=argparse.SUPPRESS)  # internal
    p.add_argument("--jax-chunk-rows", type=int, default=None, help=argparse.SUPPRESS)
    args = bench_utils.parse_args(p, argv)
    if args.n is None:
        args.n = 1_000_000 if args.full else 100_000
    if args.clusters is None:
        args.clusters = max(1, args.n // 100)
    # The default (quick) run writes mips.json; other data sizes and kinds get their own files.
    suffix = ("_real" if args.real else "_full" if args.n == 1_000_000
              else "" if args.n == 100_000 else f"_n{args.n}")
    args.out = args.out or os.path.join(RESULTS, f"mips{suffix}.json")
    args.plot = args.plot or os.path.join(RESULTS, f"mips{suffix}_recall_qps.png")
    return args


# --------------------------------------------------------------------------- environment



# --------------------------------------------------------------------------- data


def clustered_mixture(
    n: int, num_queries: int, dim: int, clusters: int, std: float, seed: int
) -> tuple[Array, Array]:
    """(table [n, dim], queries [num_queries, dim]) float32 from one Gaussian mixture."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    scale = np.float32(1.0 / math.sqrt(dim * (1.0 + std * std)))  # E‖x‖² = 1

    def draw(m: int) -> Array:
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 65536):  # bounded temporaries at N = 1M
            e = min(m, s + 65536)
            c = rng.integers(clusters, size=e - s)
            out[s:e] = (centres[c] + std * rng.standard_normal((e - s, dim), np.float32)) * scale
        return out

    return draw(n), draw(num_queries)


def ground_truth(table: Array, queries: Array, k: int) -> Array:
    """Exact top-k ids [B, k] by float64 inner product (query chunks bound the memory)."""
    t64 = table.astype(np.float64)
    step = max(1, (1 << 27) // table.shape[0])  # ≤ 1 GiB of float64 scores per chunk
    out = np.empty((queries.shape[0], k), np.int64)
    for s in range(0, queries.shape[0], step):
        scores = queries[s:s + step].astype(np.float64) @ t64.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        out[s:s + step] = np.take_along_axis(top, order, 1)
    return out


def recall_at_k(ids: Array, truth: Array) -> float:
    """Mean |returned ∩ true top-k| / k."""
    k = truth.shape[1]
    ids = np.asarray(ids)[:, :k].astype(np.int64)
    hits = (ids[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


# Generated text for the refresher sample and --real (no corpus files needed).
_SYLLABLES = "ka lo mi ra tu sen vel dor an is el or um ba ri fen gal tho wyn ess".split()
_OCCUPATIONS = ("botanist cartographer composer engineer physician novelist astronomer "
                "architect sculptor chemist historian linguist geologist painter").split()
_TOWN_SUFFIX = "ford mere holm wick stead ton by haven dale burg".split()
_THINGS = "engine treatise symphony atlas bridge telescope cipher theorem novel loom".split()
_TEMPLATES = (
    "{name} was a {occ} born in {town} in {year}.",
    "In {year2}, {name} moved to {town2} and worked for the {org} {kind}.",
    "{name} is best known for a {thing} completed in {year2}.",
    "The {kind} of {town} was founded by {name}, a {occ}.",
    "{name} married {other} in {town2}, where the couple lived until {year3}.",
    "Critics compared the {thing} of {name} with the work of {other}.",
)
_QUESTIONS = (
    "where was {name} born?", "which {occ} founded the {kind} of {town}?",
    "what is {name} best known for?", "who did {name} marry?", "when was {name} born?",
)


def _word(rng: np.random.Generator, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES, size=parts))


def _slots(rng: np.random.Generator) -> dict[str, str]:
    name = f"{_word(rng, 2).title()} {_word(rng, 3).title()}"
    return dict(
        name=name, other=f"{_word(rng, 2).title()} {_word(rng, 2).title()}",
        occ=str(rng.choice(_OCCUPATIONS)), thing=str(rng.choice(_THINGS)),
        town=_word(rng, 2).title() + str(rng.choice(_TOWN_SUFFIX)),
        town2=_word(rng, 2).title() + str(rng.choice(_TOWN_SUFFIX)),
        org=_word(rng, 2).title(), kind=str(rng.choice(["Society", "Institute", "Guild"])),
        year=str(rng.integers(1700, 1950)), year2=str(rng.integers(1720, 1990)),
        year3=str(rng.integers(1750, 2000)),
    )


def generated_blocks(n: int, sentences: int, seed: int) -> list[dict[str, str]]:
    """n `{title, text, uid}` blocks of `sentences` templated sentences about one person."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = _slots(rng)
        picks = rng.choice(len(_TEMPLATES), size=sentences, replace=sentences > len(_TEMPLATES))
        text = " ".join(_TEMPLATES[j].format(**_slots(rng) | {"name": s["name"]}) for j in picks)
        out.append({"title": s["name"], "text": text, "uid": f"gen-{seed}-{i}"})
    return out


def generated_questions(n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [{"title": "", "text": str(rng.choice(_QUESTIONS)).format(**_slots(rng)),
             "uid": f"q-{seed}-{i}"} for i in range(n)]


def minilm_config(block_len: int, batch_size: int = 32) -> Any:
    """The base config with the MiniLM-sized embedder the refresher would run."""
    from realm_jax import defaults

    c = defaults.base_config()
    c.model.bert = dict(preset="minilm_l6_h384")
    c.model.pooling = "mean"
    c.init.path = "minilm"
    c.refresh.batch_size = batch_size
    c.data.block_len = block_len
    return c


def minilm_embedder(config: Any) -> tuple[Any, Any, Any, float]:
    """(block runner, tokenizer, embedder params, seconds to load MiniLM and build them)."""
    from realm_jax import initialize, sharding
    from realm_jax.embedding import block_runner
    from realm_jax.retrieval.refresher import load_tokenizer

    t0 = time.perf_counter()
    mesh = sharding.make_mesh(dict(config.mesh))
    embedder = block_runner(config, mesh)
    params, _ = initialize.initial_params(config, ["embedder"], mesh)
    return embedder, load_tokenizer(config), params["embedder"], time.perf_counter() - t0


def embed_blocks(
    embedder: Any, tok: Any, params: Any, blocks: list[dict[str, str]], progress: bool = False
) -> tuple[Array, float]:
    """The block runner over `{title, text}` blocks → (embeddings, seconds spent pre-tokenising).

    The blocks are tokenised once up front (`TokenizedBlocks`), as the refresher does for its
    whole corpus; that time is reported separately.
    """
    from realm_jax.data.joins import TokenizedBlocks

    t0 = time.perf_counter()
    tokenized = TokenizedBlocks.from_lists(tok.tokenize([b["title"] for b in blocks]),
                                           tok.tokenize([b["text"] for b in blocks]), tok)
    tokenize_s = time.perf_counter() - t0
    return embedder.embed_blocks(params, tokenized, console=progress), tokenize_s


def real_text_data(args: argparse.Namespace) -> tuple[Array, Array, dict[str, Any]]:
    """MiniLM embeddings of `args.real` generated sentences and `args.queries` questions."""
    config = minilm_config(args.real_len)
    embedder, tok, params, load_s = minilm_embedder(config)
    embed_blocks(embedder, tok, params, generated_blocks(32, 1, args.seed + 99))  # compile
    t0 = time.perf_counter()
    table, _ = embed_blocks(embedder, tok, params, generated_blocks(args.real, 1, args.seed), True)
    embed_s = time.perf_counter() - t0
    questions = generated_questions(args.queries, args.seed + 1)
    queries, _ = embed_blocks(embedder, tok, params, questions)
    norms = np.linalg.norm(table, axis=1)
    info = {"kind": "minilm_generated_sentences", "block_len": args.real_len,
            "load_s": load_s, "embed_s": embed_s, "docs_per_s": args.real / embed_s,
            "norm_mean": float(norms.mean()), "norm_std": float(norms.std())}
    return table, queries, info


# --------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class Point:
    """One method at one setting: a point on the recall-QPS plot."""

    method: str
    setting: str
    params: dict[str, Any]
    build_s: float | None
    times_s: list[float]
    recall: float
    num_queries: int
    first_call_s: float | None = None  # warm-up search (includes JAX compilation)

    @property
    def qps(self) -> float:
        """Queries / fastest timed search (ann-benchmarks' convention: other load only adds)."""
        return self.num_queries / min(self.times_s)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(qps=self.qps, qps_median=self.num_queries / statistics.median(self.times_s),
                 best_s=min(self.times_s), median_s=statistics.median(self.times_s))
        return d


def timed_search(
    search: Callable[[], Array], repeats: int
) -> tuple[list[float], Array, float]:
    """(timed seconds, ids of the last search, warm-up seconds): 1 warm-up + `repeats`."""
    t0 = time.perf_counter()
    ids = search()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids = search()
        times.append(time.perf_counter() - t0)
    return times, ids, first


def numpy_exact(table: Array, queries: Array, k: int) -> Array:
    """Top-k ids by float32 matmul + argpartition (query chunks keep scores ≤ 2 GiB)."""
    step = max(1, (1 << 29) // table.shape[0])
    out = np.empty((queries.shape[0], k), np.int64)
    for s in range(0, queries.shape[0], step):
        scores = queries[s:s + step] @ table.T  # [b, N]
        top = np.argpartition(scores, -k, axis=1)[:, -k:]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        out[s:s + step] = np.take_along_axis(top, order, 1)
    return out


def bench_numpy(table: Array, queries: Array, truth: Array, args: argparse.Namespace) -> Point:
    times, ids, first = timed_search(lambda: numpy_exact(table, queries, args.k), args.repeats)
    return Point("numpy exact", "matmul+argpartition", {}, 0.0, times,
                 recall_at_k(ids, truth), len(queries), first)


def jax_worker(args: argparse.Namespace) -> None:
    """Subprocess body: time `ExactIndex` on every (possibly emulated) CPU device."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import jax

    from realm_jax import sharding
    from realm_jax.retrieval.mips import ExactIndex

    d = args.jax_worker
    table = np.load(os.path.join(d, "table.npy"))
    queries = np.load(os.path.join(d, "queries.npy"))
    t0 = time.perf_counter()
    index = ExactIndex.build(table, sharding.make_mesh(), chunk_rows=args.jax_chunk_rows)
    jax.block_until_ready(index.table)
    build_s = time.perf_counter() - t0
    times, (ids, _), first = timed_search(lambda: index.search(queries, args.k), args.repeats)
    ndev = len(jax.devices())
    np.save(os.path.join(d, f"ids_{ndev}.npy"), ids)
    with open(os.path.join(d, f"result_{ndev}.json"), "w") as f:
        json.dump({"devices": ndev, "shards": index.num_shards, "build_s": build_s,
                   "times_s": times, "first_call_s": first, "jax": jax.__version__,
                   "chunk_rows": args.jax_chunk_rows}, f)


def bench_jax(
    devices: int, tmp: str, truth: Array, args: argparse.Namespace
) -> Point:
    """Run `jax_worker` in a fresh interpreter with `devices` host-platform devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]))
    cmd = [sys.executable, os.path.abspath(__file__), "--jax-worker", tmp, "--k", str(args.k),
           "--repeats", str(args.repeats)]
    # Above ~150k rows per device the [B, rows] score matrix gets large: score in chunks.
    chunk = args.jax_chunk_rows or (65536 if args.n // devices > 150_000 else None)
    if chunk:
        cmd += ["--jax-chunk-rows", str(chunk)]
    subprocess.run(cmd, env=env, check=True)
    with open(os.path.join(tmp, f"result_{devices}.json")) as f:
        r = json.load(f)
    ids = np.load(os.path.join(tmp, f"ids_{devices}.npy"))
    name = "JAX exact, 1 device" if devices == 1 else f"JAX exact, {devices} devices"
    params = {"devices": r["devices"], "shards": r["shards"], "chunk_rows": r["chunk_rows"]}
    return Point(name, f"{r['devices']} dev" + (" (emulated)" if devices > 1 else ""), params,
                 r["build_s"], r["times_s"], recall_at_k(ids, truth), truth.shape[0],
                 r["first_call_s"])


def bench_scann(table: Array, queries: Array, truth: Array, args: argparse.Namespace
                ) -> list[Point]:
    from realm_jax.retrieval.scann_index import ScannConfig, ScannIndex

    root_n = args.scann_num_leaves or max(1, round(math.sqrt(len(table))))
    runs = [dict(frac=frac, reorder_k=reorder) for frac, reorder in SCANN_SETTINGS]
    runs.append(dict(frac=SCANN_SETTINGS[SCANN_SINGLE_THREAD][0],
                     reorder_k=SCANN_SETTINGS[SCANN_SINGLE_THREAD][1], parallel_search=False))
    if args.scann_grid:
        runs += [dict(run) for run in SCANN_GRID]
    points = []
    for run in runs:
        num_leaves = root_n * run.pop("leaves_x", 1)
        leaves = max(1, min(num_leaves, round(run.pop("frac") * num_leaves)))
        run.setdefault("parallel_search", True)
        config = ScannConfig(num_leaves=num_leaves, num_leaves_to_search=leaves, **run)
        t0 = time.perf_counter()
        index = ScannIndex.build(table, config)
        build_s = time.perf_counter() - t0
        times, (ids, _), first = timed_search(
            lambda index=index: index.search(queries, args.k), args.repeats)
        method = "ScaNN" if config.parallel_search else "ScaNN, 1 thread"
        params = {"num_leaves": index.resolved.get("num_leaves"), "num_leaves_to_search": leaves,
                  **run, "brute_force": index.resolved["brute_force"]}
        setting = f"leaves {leaves}/{num_leaves}, reorder {config.reorder_k}"
        if (config.dims_per_block, config.anisotropic_quantization_threshold) != (2, 0.2):
            setting += (f", {config.dims_per_block} d/block, "
                        f"thr {config.anisotropic_quantization_threshold}")
        points.append(Point(method, setting, params, build_s, times, recall_at_k(ids, truth),
                            len(queries), first))
        print(f"  {method:16s} {points[-1].setting:28s} recall {points[-1].recall:.4f} "
              f"QPS {points[-1].qps:9.0f} build {build_s:5.1f}s", flush=True)
    return points


def _faiss_points(index: Any, method: str, settings: Sequence[tuple[str, dict[str, Any]]],
                  apply: Callable[[dict[str, Any]], None], build_s: float, queries: Array,
                  truth: Array, args: argparse.Namespace) -> list[Point]:
    points = []
    for setting, params in settings:
        apply(params)
        times, ids, first = timed_search(lambda: index.search(queries, args.k)[1], args.repeats)
        points.append(Point(method, setting, params, build_s, times, recall_at_k(ids, truth),
                            len(queries), first))
        print(f"  {method:16s} {setting:28s} recall {points[-1].recall:.4f} "
              f"QPS {points[-1].qps:9.0f} build {build_s:5.1f}s", flush=True)
    return points


def bench_hnsw(table: Array, queries: Array, truth: Array, args: argparse.Namespace
               ) -> list[Point]:
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(table.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.add(table)
    build_s = time.perf_counter() - t0
    ef_c = index.hnsw.efConstruction
    settings = [(f"M {HNSW_M}, efSearch {ef}", {"M": HNSW_M, "efConstruction": ef_c,
                                               "efSearch": ef}) for ef in HNSW_EF]

    def apply(params: dict[str, Any]) -> None:
        index.hnsw.efSearch = max(params["efSearch"], args.k)

    return _faiss_points(index, "FAISS HNSW", settings, apply, build_s, queries, truth, args)


def bench_ivf(table: Array, queries: Array, truth: Array, args: argparse.Namespace
              ) -> list[Point]:
    import faiss

    nlist = max(1, round(math.sqrt(len(table))))  # as ScaNN's num_leaves
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(table.shape[1])
    index = faiss.IndexIVFFlat(quantizer, table.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(table)
    index.add(table)
    build_s = time.perf_counter() - t0
    settings = [(f"nlist {nlist}, nprobe {p}", {"nlist": nlist, "nprobe": p})
                for p in IVF_NPROBE if p <= nlist]

    def apply(params: dict[str, Any]) -> None:
        index.nprobe = params["nprobe"]

    return _faiss_points(index, "FAISS IVF-Flat", settings, apply, build_s, queries, truth,
                         args)


# --------------------------------------------------------------------------- goals


def frontier(points: Sequence[Point]) -> list[tuple[float, float]]:
    """Pareto frontier (recall ascending, QPS descending) of one method's points."""
    best: list[tuple[float, float]] = []
    for p in sorted(points, key=lambda p: (-p.recall, -p.qps)):
        if not best or p.qps > best[-1][1]:
            best.append((p.recall, p.qps))
    return best[::-1]


def qps_at_recall(points: Sequence[Point], recall: float) -> tuple[float, str]:
    """A method's QPS at `recall`, interpolated on its frontier (log QPS, linear in recall).

    Returns (qps, how): how is "interpolated"; "lower bound" when all its points have higher
    recall (its fastest point's QPS: it is at least that fast there); or "upper bound" when
    `recall` is beyond its most accurate point (that point's QPS: more recall costs QPS).
    """
    f = frontier(points)
    if recall > f[-1][0]:
        return f[-1][1], "upper bound: beyond its most accurate measured point"
    if recall <= f[0][0]:
        return f[0][1], "lower bound: its fastest point already has higher recall"
    for (r0, q0), (r1, q1) in zip(f, f[1:], strict=False):
        if r0 <= recall <= r1:
            w = (recall - r0) / (r1 - r0) if r1 > r0 else 0.0
            return math.exp((1 - w) * math.log(q0) + w * math.log(q1)), "interpolated"
    raise AssertionError("unreachable")


def nearest(points: Sequence[Point], recall: float) -> Point:
    return min(points, key=lambda p: abs(p.recall - recall))


def _faster(scann_qps: float, faiss_qps: float, how: str) -> bool | None:
    """Is ScaNN at least as fast? None when FAISS's value is a bound that does not decide."""
    if how.startswith("upper bound") and scann_qps < faiss_qps:
        return None  # FAISS would need a slower setting than any measured to get there
    if how.startswith("lower bound") and scann_qps >= faiss_qps:
        return None  # FAISS might be faster still with a cheaper setting than any measured
    return scann_qps >= faiss_qps


def goals(points: Sequence[Point]) -> dict[str, Any]:
    by_method: dict[str, list[Point]] = {}
    for p in points:
        by_method.setdefault(p.method, []).append(p)
    numpy_qps = by_method["numpy exact"][0].qps
    peers = {m: ps for m, ps in by_method.items() if m.startswith("FAISS")}
    checks = []
    for p in by_method.get("ScaNN", []):
        peer = {}
        for m, ps in peers.items():
            qps, how = qps_at_recall(ps, p.recall)
            near = nearest(ps, p.recall)
            peer[m] = {"qps_at_recall": qps, "how": how, "nearest_setting": near.setting,
                       "nearest_recall": near.recall, "nearest_qps": near.qps,
                       "scann_faster": _faster(p.qps, qps, how)}
        checks.append({
            "setting": p.setting, "recall": p.recall, "qps": p.qps,
            "speedup_vs_numpy": p.qps / numpy_qps,
            "recall_ok": p.recall >= GOAL_RECALL,
            "speedup_ok": p.qps / numpy_qps >= GOAL_SPEEDUP,
            # True: faster than every FAISS method; False: slower than one; None: a FAISS
            # method's frontier does not reach this recall and the bound does not decide.
            "faiss_ok": (False if any(v["scann_faster"] is False for v in peer.values())
                         else None if any(v["scann_faster"] is None for v in peer.values())
                         else True),
            "faiss": peer,
        })
    met = [c for c in checks if c["recall_ok"] and c["speedup_ok"] and c["faiss_ok"] is True]
    open_ = [c for c in checks if c["recall_ok"] and c["speedup_ok"] and c["faiss_ok"] is None]
    return {"goal_recall": GOAL_RECALL, "goal_speedup": GOAL_SPEEDUP, "numpy_qps": numpy_qps,
            "scann": checks, "met": bool(met), "met_by": [c["setting"] for c in met],
            "undetermined_for": [c["setting"] for c in open_]}


# --------------------------------------------------------------------------- refresher


def bench_refresher(table: Array, args: argparse.Namespace) -> dict[str, Any]:
    """Embedder docs/s (measured on a sample) and publish_index times (measured, 100k rows)."""
    from realm_jax.retrieval.refresher import publish_index

    block_len, batch = 128, 32
    config = minilm_config(block_len, batch)
    embedder, tok, params, load_s = minilm_embedder(config)
    sample = generated_blocks(args.refresh_sample, 12, args.seed + 7)
    lengths = tok.encode([b["title"] for b in sample[:64]], block_len,
                         pairs=[b["text"] for b in sample[:64]]).lengths
    t0 = time.perf_counter()
    embed_blocks(embedder, tok, params, sample[:batch])  # compiles the jitted embedder
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb, tokenize_s = embed_blocks(embedder, tok, params, sample)  # (tokenise +) embed + fetch
    embed_s = time.perf_counter() - t0 - tokenize_s
    docs_per_s = len(sample) / embed_s
    out: dict[str, Any] = {
        "config": {"preset": "minilm_l6_h384", "pooling": "mean", "init": "minilm",
                   "proj_size": int(config.model.proj_size), "batch_size": batch,
                   "block_len": block_len, "devices": len(embedder.mesh.devices.flat)},
        "measured": {"load_minilm_s": load_s, "compile_s": compile_s,
                     "sample_blocks": len(sample), "sample_embed_s": embed_s,
                     "docs_per_s": docs_per_s, "mean_real_tokens": float(lengths.mean()),
                     "pretokenize_s": tokenize_s,
                     "embedding_shape": list(emb.shape)},
        "extrapolated": {"blocks": args.refresh_blocks,
                         "embed_s": args.refresh_blocks / docs_per_s},
    }
    print(f"  embedder: {docs_per_s:.1f} docs/s measured on {len(sample)} blocks of "
          f"{block_len} wordpieces (compile {compile_s:.1f}s excluded)", flush=True)
    rows = table[:args.refresh_blocks]
    for engine in ("scann", "exact"):
        config.retrieval.engine = engine
        with tempfile.TemporaryDirectory(prefix="realm_mips_publish_") as workdir:
            t0 = time.perf_counter()
            path = publish_index(config, workdir, 0, rows, "benchmark")
            publish_s = time.perf_counter() - t0
            size = sum(os.path.getsize(os.path.join(root, name))
                       for root, _, names in os.walk(os.fspath(path)) for name in names)
        out["measured"][f"publish_{engine}_s"] = publish_s
        out["measured"][f"publish_{engine}_bytes"] = int(size)
        out["measured"]["publish_rows"] = int(len(rows))
        print(f"  publish_index engine={engine}: {publish_s:.1f}s for {len(rows)} rows "
              f"({size / 2**20:.0f} MiB)", flush=True)
    m, e = out["measured"], out["extrapolated"]
    for engine in ("scann", "exact"):
        e[f"refresh_total_{engine}_s"] = e["embed_s"] + m[f"publish_{engine}_s"]
    return out


# --------------------------------------------------------------------------- report


def table_text(points: Sequence[Point], numpy_qps: float) -> str:
    rows = [("method", "setting", "recall@10", "QPS", "vs numpy", "build s", "first call s")]
    for p in points:
        rows.append((p.method, p.setting, f"{p.recall:.4f}", f"{p.qps:,.0f}",
                     f"{p.qps / numpy_qps:.1f}x",
                     "-" if p.build_s is None else f"{p.build_s:.1f}",
                     "-" if p.first_call_s is None else f"{p.first_call_s:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(rows[0]), "-+-".join("-" * w for w in widths), *map(fmt, rows[1:])])


def goals_text(g: dict[str, Any]) -> str:
    """Per ScaNN point: the three checks; FAISS comparisons spelled out where recall ≥ goal."""
    yes = lambda ok: "undetermined" if ok is None else "yes" if ok else "NO"  # noqa: E731
    lines = [f"Goals: ScaNN recall@10 ≥ {g['goal_recall']} at ≥ {g['goal_speedup']:.0f}x numpy "
             f"QPS ({g['numpy_qps']:,.0f} → {g['numpy_qps'] * g['goal_speedup']:,.0f}) and ≥ "
             "FAISS QPS at equal recall"]
    for c in g["scann"]:
        lines.append(f"  ScaNN {c['setting']}: recall {c['recall']:.4f}, {c['qps']:,.0f} QPS = "
                     f"{c['speedup_vs_numpy']:.1f}x numpy  [recall {yes(c['recall_ok'])}, "
                     f"10x {yes(c['speedup_ok'])}, ≥FAISS {yes(c['faiss_ok'])}]")
        if not c["recall_ok"]:
            continue
        for m, v in c["faiss"].items():
            lines.append(f"      {m}: {v['qps_at_recall']:,.0f} QPS at that recall ({v['how']}); "
                         f"nearest point {v['nearest_setting']}: recall "
                         f"{v['nearest_recall']:.4f}, {v['nearest_qps']:,.0f} QPS")
    if g["met"]:
        lines.append(f"GOAL MET by {', '.join(g['met_by'])}")
    elif g["undetermined_for"]:
        lines.append("GOAL UNDETERMINED: the FAISS comparison is open for "
                     f"{', '.join(g['undetermined_for'])} (FAISS not measured at that recall)")
    else:
        lines.append("GOAL NOT MET")
    return "\n".join(lines)


def refresher_text(r: dict[str, Any]) -> str:
    m, e = r["measured"], r["extrapolated"]
    return "\n".join([
        f"Refresher (MiniLM L6 H384, mean pooling, {r['config']['block_len']}-wordpiece blocks, "
        f"batch {r['config']['batch_size']}, {r['config']['devices']} CPU device):",
        f"  MEASURED     embed {m['sample_blocks']} blocks: {m['sample_embed_s']:.1f} s = "
        f"{m['docs_per_s']:.1f} docs/s (compile {m['compile_s']:.1f} s, MiniLM load "
        f"{m['load_minilm_s']:.1f} s, excluded"
        + (f"; pre-tokenising them {m['pretokenize_s']:.2f} s, not included" if
           m["pretokenize_s"] else "; tokenisation included") + ")",
        f"  MEASURED     publish_index {m['publish_rows']:,} rows: engine scann "
        f"{m['publish_scann_s']:.1f} s (ScaNN build + save + hash), engine exact "
        f"{m['publish_exact_s']:.1f} s",
        f"  EXTRAPOLATED embed {e['blocks']:,} blocks: {e['embed_s']:,.0f} s "
        f"({e['embed_s'] / 3600:.2f} h); full refresh scann {e['refresh_total_scann_s']:,.0f} s,"
        f" exact {e['refresh_total_exact_s']:,.0f} s",
    ])


def plot(points: Sequence[Point], g: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = iter("osD^v<>ph*")
    by_method: dict[str, list[Point]] = {}
    for p in points:
        by_method.setdefault(p.method, []).append(p)
    for method, ps in by_method.items():
        # Like ann-benchmarks: the line joins the Pareto frontier, markers show every setting.
        marker = next(markers)
        front = frontier(ps)
        (line,) = ax.plot([r for r, _ in front], [q for _, q in front], marker=marker,
                          label=method, linestyle="-" if len(front) > 1 else "none")
        ax.plot([p.recall for p in ps], [p.qps for p in ps], marker=marker, linestyle="none",
                color=line.get_color(), markerfacecolor="none")
    ax.axhline(g["numpy_qps"] * GOAL_SPEEDUP, color="grey", linestyle=":", linewidth=1,
               label=f"{GOAL_SPEEDUP:.0f}x numpy exact")
    ax.axvline(GOAL_RECALL, color="grey", linestyle="--", linewidth=1,
               label=f"recall {GOAL_RECALL}")
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second (batch of all queries, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.jax_worker:
        jax_worker(args)
        return
    if REPO_ROOT not in sys.path:  # `python benchmarks/mips.py` from a checkout
        sys.path.insert(0, REPO_ROOT)
    logging.basicConfig(level=logging.WARNING)
    import faiss
    import scann

    t_start = time.perf_counter()
    busy_before = wait_for_idle(args.wait_idle) if args.wait_idle else cpu_busy_elsewhere()
    env = {
        "cpu_model": cpu_model(), "cpus": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0], "numpy": np.__version__,
        "faiss": faiss.__version__, "faiss_omp_threads": faiss.omp_get_max_threads(),
        "scann": getattr(scann, "__version__", "unknown"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_busy_elsewhere_before": busy_before,
    }
    print(f"cpu={env['cpu_model']!r} x{env['cpus']}, faiss {env['faiss']} "
          f"({env['faiss_omp_threads']} threads); other load {busy_before:.0%}", flush=True)
    if busy_before > 0.1:
        print(f"WARNING: {busy_before:.0%} of the CPUs are busy with other processes; "
              "timings will be noisy", flush=True)

    if args.real:
        print(f"embedding {args.real} generated sentences with MiniLM ...", flush=True)
        table, queries, data_info = real_text_data(args)
        args.n = len(table)
    else:
        table, queries = clustered_mixture(args.n, args.queries, args.dim, args.clusters,
                                           args.cluster_std, args.seed)
        data_info = {"kind": "clustered_gaussian_mixture", "clusters": args.clusters,
                     "cluster_std": args.cluster_std, "seed": args.seed,
                     "scale": "E|x|^2 = 1"}
    data_info.update(n=int(table.shape[0]), dim=int(table.shape[1]),
                     queries=int(queries.shape[0]), k=args.k)
    print(f"data: {data_info['kind']}, N={table.shape[0]:,} x {table.shape[1]}, "
          f"{len(queries)} queries, k={args.k}", flush=True)
    t0 = time.perf_counter()
    truth = ground_truth(table, queries, args.k)
    print(f"ground truth (float64): {time.perf_counter() - t0:.1f}s", flush=True)

    busy: dict[str, float] = {}

    def quiet(section: str) -> None:
        """Record (and with --wait-idle, wait out) other load before each timed section."""
        busy[section] = (wait_for_idle(args.wait_idle) if args.wait_idle
                         else cpu_busy_elsewhere(0.5))

    quiet("numpy")
    points = [bench_numpy(table, queries, truth, args)]
    print(f"  numpy exact      recall {points[0].recall:.4f} QPS {points[0].qps:9.0f}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="realm_mips_jax_") as tmp:
        np.save(os.path.join(tmp, "table.npy"), table)
        np.save(os.path.join(tmp, "queries.npy"), queries)
        for devices in (1, 8):
            if devices == 8 and args.skip_jax8:
                continue
            quiet(f"jax{devices}")
            points.append(bench_jax(devices, tmp, truth, args))
            print(f"  {points[-1].method:22s} recall {points[-1].recall:.4f} "
                  f"QPS {points[-1].qps:9.0f} build {points[-1].build_s:.1f}s first call "
                  f"{points[-1].first_call_s:.1f}s", flush=True)
    quiet("scann")
    points += bench_scann(table, queries, truth, args)
    quiet("hnsw")
    points += bench_hnsw(table, queries, truth, args)
    quiet("ivf")
    points += bench_ivf(table, queries, truth, args)
    g = goals(points)

    title = (f"{data_info['kind']}, N={table.shape[0]:,}, d={table.shape[1]}, "
             f"{len(queries)} queries, k={args.k}, {env['cpus']} CPUs")
    plot(points, g, args.plot, title)
    results = {"env": env, "args": vars(args), "data": data_info,
               "points": [p.to_json() for p in points], "goals": g, "refresher": None}

    def save() -> None:
        env["cpu_busy_elsewhere_after"] = cpu_busy_elsewhere()
        env["cpu_busy_elsewhere_per_section"] = busy
        env["total_s"] = time.perf_counter() - t_start
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)

    save()  # the search results survive a failure in the refresher section
    refresher = None
    if not args.skip_refresher and not args.real:  # --real: its embedding rate is in "data"
        print("refresher ...", flush=True)
        quiet("refresher")
        try:
            refresher = bench_refresher(table, args)
        except Exception as e:  # noqa: BLE001  report it, keep the search results
            traceback.print_exc()
            results["refresher"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            results["refresher"] = refresher
        save()

    print()
    print(title)
    print(table_text(points, g["numpy_qps"]))
    print(goals_text(g))
    if refresher:
        print(refresher_text(refresher))
    elif results["refresher"]:
        print(f"Refresher section FAILED: {results['refresher']['error']}")
    print(f"other load: {env['cpu_busy_elsewhere_before']:.0%} before, "
          f"{env['cpu_busy_elsewhere_after']:.0%} after; before each section: "
          + ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
          + f"; total {env['total_s']:.0f}s")
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
