"""REALM pre-training (task=realm_mlm) and ORQA fine-tuning (task=orqa).

    python -m realm_jax.train --config configs/X.py[:arg] --workdir DIR [--config.key=value]

One loop for both tasks (realm_jax.tasks): between steps the host retrieves with the current
index and builds the joins; the jitted, sharded step computes the task's marginal loss and
applies AdamW. The index is kept fresh by `retrieval.live.LiveIndex` (refresh modes
subprocess / external / sync; ORQA's is frozen). While the devices run step t the host loads
step t+1's batch (one batch ahead: the same batches in the same order); retrieval waits for
step t's query tower, as REALM's retrieval uses the current one.

Resume order (STYLE 8): this workdir's newest checkpoint → `config.resume` (another run's
workdir: its parameters, optimiser state, data position and step) → `config.init.path`
(pretrained towers, `initialize.initial_params`) → scratch. A checkpoint holds every trained
tower, the optimiser state, the data iterator's state and the step, so a killed run continues
bitwise-identically on CPU (same data order, same index versions in sync mode, dropout keys
folded from the step). A workdir resumes only on the corpus it started on (`corpus_guard`:
a changed corpus is refused unless `data.allow_corpus_change` restarts the data position).

Multi-host (a TPU pod: `--multihost`, one process per host): every host runs this loop over one
global mesh. Each host reads its rows of every global batch (`data.pipeline`: the same global
batches whatever the number of hosts), retrieves for them (`tasks.common.retrieve_host_rows`:
exact search is a collective over all hosts' queries), and contributes them to global arrays
(`Task.device_inputs`). Every collective (the step, search, index refresh, checkpoint save)
is entered by all hosts in the same order; decisions that gate one come from the primary
(`realm_jax.multihost`). Only the primary writes config.json, metrics and TensorBoard; orbax
writes checkpoints from all hosts; the primary alone publishes in-process index versions.
Host-side metrics (e.g. `gold_recall_at_k`) are averaged over hosts, the rest are global.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from realm_jax import (
    corpus_guard,
    defaults,
    initialize,
    multihost,
    optim,
    restore,
    run_checkpoints,
    sharding,
    workdir_lock,
)
from realm_jax.data import loaders
from realm_jax.data.joins import tokenize_corpus
from realm_jax.retrieval.live import LiveIndex
from realm_jax.retrieval.refresher import Refresher
from realm_jax.tasks import Task, make_task

log = logging.getLogger(__name__)
MIN_KEPT_CHECKPOINTS = 5  # train.keep_checkpoints below this is raised (said in the log)
PyTree = Any


@dataclasses.dataclass
class TrainResult:
    """What a run returns: final parameters, and the logged history (also in metrics.jsonl)."""

    step: int
    params: dict[str, PyTree]
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    origin: str  # where the run started from: workdir / resume / init / scratch
    index_swaps: int
    wall_s: float


# --------------------------------------------------------------------------- state


def _shardings(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a.sharding, tree)


def _abstract(tree: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def _restore(source: epath.Path, abstract_params: PyTree, abstract_opt: PyTree
             ) -> tuple[int, dict, PyTree, dict, list[int]] | None:
    """(step, params, opt_state, data_state, newer unreadable steps) of `source`'s newest
    checkpoint that reads (`restore.restore_newest`), or None if it has none."""
    items = {**abstract_params, "data": None, "meta": None}
    if jax.tree.leaves(abstract_opt):
        items["opt_state"] = abstract_opt
    with restore.reading(source) as manager:
        newest = restore.restore_newest(manager, items)
    if newest is None:
        return None
    step, got, unreadable = newest
    params = {t: got[t] for t in abstract_params}
    return step, params, got.get("opt_state", abstract_opt), got["data"], unreadable


def _set_aside(workdir: epath.Path, steps: Sequence[int]) -> None:
    """Move this run's unreadable checkpoints out of checkpoints/ (to checkpoints.unreadable/):
    orbax would never save those steps again, and every resume would trip on them."""
    if not steps or not multihost.is_primary():
        return
    aside = workdir / f"{run_checkpoints.CHECKPOINT_DIR}.unreadable"
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
        target = aside / f"{step}-{int(time.time())}"
        (run_checkpoints.checkpoint_dir(workdir) / str(step)).rename(target)
        log.warning("moved unreadable checkpoint %d to %s", step, target)


def abstract_train_state(config: ml_collections.ConfigDict, towers: Sequence[str], mesh,
                         optimizer: optax.GradientTransformation) -> tuple[PyTree, PyTree]:
    """ShapeDtypeStructs with shardings of (params, opt_state), nothing allocated: the
    restore targets, and the train step's arguments for AOT compilation (benchmarks/aot.py)."""
    abstract = initialize.abstract_towers(defaults.model_config(config), towers, mesh,
                                          tuple(config.rules))
    # The optimiser state's layout follows the parameters' (compiled init, nothing computed).
    compiled = jax.jit(optimizer.init).lower(abstract).compile().output_shardings
    # Scalars (Adam's count) come back on one device; they belong replicated on the mesh.
    opt_shardings = jax.tree.map(
        lambda s: s if isinstance(s, jax.sharding.NamedSharding) else sharding.replicated(mesh),
        compiled)
    return abstract, _abstract(jax.eval_shape(optimizer.init, abstract), opt_shardings)


def init_state(config: ml_collections.ConfigDict, workdir: epath.Path, towers: Sequence[str],
               mesh, optimizer: optax.GradientTransformation):
    """Resume order (module docstring) → (params, opt_state, step, data_state, origin)."""
    cfg = defaults.model_config(config)
    abstract, abstract_opt = abstract_train_state(config, towers, mesh, optimizer)
    for origin, source in (("workdir", workdir), ("resume", config.resume)):
        if not source:
            continue
        restored = _restore(epath.Path(source), abstract, abstract_opt)
        if restored is None:
            if origin == "resume":
                raise FileNotFoundError(f"config.resume={source}: no checkpoint in "
                                        f"{run_checkpoints.checkpoint_dir(source)}")
            continue
        step, params, opt_state, data_state, unreadable = restored
        if origin == "workdir":  # another run's (config.resume) are not ours to move
            _set_aside(workdir, unreadable)
        log.info("resumed from %s (%s) at step %d", origin, source, step)
        return params, opt_state, step, data_state, origin
    params, _ = initialize.initial_params(config, towers, mesh, cfg)
    opt_state = jax.jit(optimizer.init, out_shardings=_shardings(abstract_opt))(params)
    origin = f"init:{config.init.path}" if config.init.path else "scratch"
    return params, opt_state, 0, None, origin


# --------------------------------------------------------------------------- the step


def make_train_step(task: Task, optimizer: optax.GradientTransformation, param_shardings,
                    opt_shardings):
    """The jitted, sharded step: (params, opt_state, inputs, rng) → (params, opt_state,
    metrics). Parameters and optimiser state are donated: updated in place on device."""

    def step(params, opt_state, inputs, rng):
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(
            params, inputs, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, metrics

    return sharding.jit_sharded(
        step, task.mesh, task.rules,
        out_shardings=(param_shardings, opt_shardings, sharding.replicated(task.mesh)),
        donate_argnums=(0, 1))


def _mean_over_hosts(metrics: dict[str, float]) -> dict[str, float]:
    """Host-side metrics (means over each host's rows, the same keys everywhere) → their mean
    over hosts; NaN (nothing measured) is ignored, and a metric NaN on every host dropped."""
    keys = sorted(metrics)
    if not keys:
        return {}
    per_host = multihost.gather(np.array([[metrics[k] for k in keys]], np.float32))  # [P, K]
    measured = ~np.isnan(per_host)
    sums = np.where(measured, per_host, 0.0).sum(0)
    return {k: float(sums[i] / measured[:, i].sum()) for i, k in enumerate(keys)
            if measured[:, i].any()}


# --------------------------------------------------------------------------- logging


class _Logger:
    """metrics.jsonl + TensorBoard + a progress bar, on the primary process only (STYLE 6).

    Not `clu.metric_writers` / `periodic_actions`: both import TensorFlow at module load
    (clu 0.0.12's `metric_writers/__init__` imports its tf `SummaryWriter`), which this
    package does not need; tensorboardX writes the same event files without it."""

    def __init__(self, workdir: epath.Path, start: int, total: int, progress: bool):
        self.enabled = multihost.is_primary()
        self.bar = self.tb = self.file = None
        if not self.enabled:
            return
        from tqdm import tqdm

        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            log.warning("tensorboardX missing: no TensorBoard events")
        self.file = (workdir / "metrics.jsonl").open("a")
        self.bar = tqdm(total=total, initial=start, unit="step", disable=not progress,
                        desc="train")

    def write(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, n: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        for x in (self.bar, self.tb, self.file):
            if x is not None:
                x.close()


# --------------------------------------------------------------------------- the loop


def check_config(config: ml_collections.ConfigDict) -> None:
    """A ValueError naming a setting that would make the run do nothing, or nonsense."""
    if int(config.train.steps) < 1:  # 0 steps would exit 0 having trained nothing
        raise ValueError(f"config.train.steps={config.train.steps}: must be at least 1 (the "
                         "step to train up to)")


def train(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    *,
    progress: bool = True,
    inject_nan_at: int | None = None,
) -> TrainResult:
    """Train `config.task` in `workdir` until `config.train.steps`; see module docstring.

    Args:
      inject_nan_at: test hook: poison the parameters before this step, which must stop the
        run with a FloatingPointError naming the step (no checkpoint of it is written).

    Raises:
      FloatingPointError: a non-finite loss or gradient norm, naming the step.
      ValueError: a setting no run can use (`check_config`).
      workdir_lock.WorkdirBusy: another trainer holds the workdir (its pid and host named).
      corpus_guard.CorpusChanged: the run in `workdir` started on another corpus (and
        `data.allow_corpus_change` is not set).
    """
    t_start = time.time()
    c = config
    check_config(c)  # before anything is written
    workdir = workdir_lock.make_dir(run_checkpoints.absolute(workdir), "workdir")
    # One trainer per workdir, for the whole run (before config.json is rewritten).
    with workdir_lock.hold(workdir_lock.trainer_lock(workdir), "trainer"):
        return _train(c, workdir, t_start, progress, inject_nan_at)


def _train(c: ml_collections.ConfigDict, workdir: epath.Path, t_start: float, progress: bool,
           inject_nan_at: int | None) -> TrainResult:
    """`train` in its locked workdir."""
    tokenizer = loaders.load_tokenizer(c)
    corpus = loaders.load_corpus(c)
    # Before anything is written: the run resumes only the corpus it started on.
    new_corpus = corpus_guard.check(workdir, corpus,
                                    bool(c.data.get("allow_corpus_change", False)))
    mesh = sharding.make_mesh(dict(c.mesh))
    blocks = tokenize_corpus(corpus, tokenizer)
    task = make_task(c, mesh, corpus, blocks, tokenizer)
    optimizer = optim.make_optimizer(c.train)
    params, opt_state, step, data_state, origin = init_state(c, workdir, task.towers, mesh,
                                                             optimizer)
    if origin == "resume":  # another run's data position: of its corpus, if that is this one
        new_corpus = corpus_guard.check_source(
            c.resume, corpus, bool(c.data.get("allow_corpus_change", False))) or new_corpus
    if new_corpus and data_state:  # allowed: its position in the old corpus means nothing
        data_state = None
    # Only now: a config whose model does not fit the checkpoints must not replace theirs.
    if multihost.is_primary():
        defaults.save_resolved(c, workdir)
    train_step = make_train_step(task, optimizer, _shardings(params), _shardings(opt_state))
    total = int(c.train.steps)

    data = iter(task.dataset(c.seed))
    # The iterator state counts global batches ({"next_index": t}), the same on every host and
    # for any number of hosts, so the primary's copy in the checkpoint resumes them all.
    if data_state:
        data.set_state(data_state)
    keep = int(c.train.keep_checkpoints)
    if keep < MIN_KEPT_CHECKPOINTS:
        log.warning("train.keep_checkpoints=%d raised to %d: the refresher embeds checkpoints "
                    "behind the trainer, and a resume falls back past unreadable ones", keep,
                    MIN_KEPT_CHECKPOINTS)
    manager = run_checkpoints.checkpoint_manager(workdir, keep=max(keep, MIN_KEPT_CHECKPOINTS))
    mode = task.index_mode or c.refresh.mode
    if mode != c.refresh.mode:
        log.info("refresh.mode=%s does not apply: task %s needs index mode %r", c.refresh.mode,
                 c.task, mode)
    needs_refresher = mode in ("frozen", "sync")
    refresher = (Refresher(c, workdir, corpus=corpus, progress=progress, blocks=blocks)
                 if needs_refresher else None)
    live = LiveIndex(c, workdir, mesh, corpus_fp=corpus.fingerprint, refresher=refresher,
                     mode=mode)
    logger = _Logger(workdir, step, total, progress)
    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    meta = {"task": c.task, "origin": origin}

    def evaluate(at: int) -> None:
        """Held-out evaluation with the current `params`; logged as kind "eval" at `at`.

        With `eval.fresh_index`, the index is first brought up to `at` where the refresh mode
        makes that version anyway (LiveIndex.catch_up); the task is told whether it is fresh,
        so it re-embeds the corpus itself only when it is not."""
        fresh = False
        if c.eval.get("fresh_index", False) and at > 0 and at % c.train.checkpoint_every == 0:
            fresh = live.catch_up(at, params)
        result = task.evaluate(params, live.searcher, fresh=fresh or at == live.index_step)
        if result:
            evals.append({"step": at, **result})
            logger.write(at, result, kind="eval")
            log.info("step %d eval: %s", at, result)

    try:
        live.start(step, params)
        log.info("training %s from step %d (%s) to %d", c.task, step, origin, total)
        if step == 0 and c.eval.get("at_start", False):
            evaluate(0)  # the baseline the curve starts from (index v0, initial towers)
        t_last, steps_since = time.time(), 0
        batch = next(data) if step < total else None
        while step < total:
            live.before_step(step, params)
            host_inputs, host_metrics = task.prepare(batch, params, live.searcher)
            host_metrics = _mean_over_hosts(host_metrics)
            inputs = task.device_inputs(host_inputs, live.searcher)
            if inject_nan_at is not None and step == inject_nan_at:
                params = jax.tree.map(lambda x: x * jnp.nan, params)
            rng = jax.random.fold_in(jax.random.key(c.seed), step)
            params, opt_state, metrics = train_step(params, opt_state, inputs, rng)
            # The step runs on the devices (dispatch is asynchronous) while the host loads the
            # next batch (reading, masking); its retrieval and joins must wait for the new
            # query tower. The checkpoint keeps the position after this step's batch.
            data_state = copy.deepcopy(data.get_state())
            batch = next(data) if step + 1 < total else None
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise FloatingPointError(
                    f"non-finite loss {metrics['loss']} (grad norm {metrics['grad_norm']}) at "
                    f"step {step}; the last good checkpoint is {manager.latest_step()} in "
                    f"{run_checkpoints.checkpoint_dir(workdir)}")
            metrics.update(host_metrics, index_swaps=live.swaps)
            if live.index_step is not None:
                metrics["index_step"] = live.index_step
            stale = live.staleness(step)
            if stale is not None:  # ORQA's frozen index has none to report
                metrics["staleness_steps"] = stale
            step += 1
            steps_since += 1
            history.append({"step": step, **metrics})
            if step % c.train.checkpoint_every == 0 or step == total:
                run_checkpoints.save_train_state(manager, step, params, opt_state, data_state,
                                             {**meta, "index_step": live.index_step})
            if step % c.train.log_every == 0 or step == total:
                now = time.time()
                metrics["steps_per_s"] = steps_since / max(now - t_last, 1e-9)
                metrics["examples_per_s"] = metrics["steps_per_s"] * c.train.batch_size
                t_last, steps_since = now, 0
                logger.write(step, metrics)
            logger.progress(1, {"loss": f"{metrics['loss']:.3f}",
                                "stale": metrics.get("staleness_steps", "-"),
                                "v": live.index_step})
            every = c.eval.every_steps
            if (every and step % every == 0) or step == total:
                evaluate(step)
        manager.wait_until_finished()
    finally:
        live.close()
        manager.close()
        logger.close()
    return TrainResult(step, params, history, evals, origin, live.swaps, time.time() - t_start)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
    """The command: errors a user can fix (a setting, a busy or broken workdir) end it with
    one line (`realm_jax.cli`)."""
    del argv
    from absl import flags

    check_config(flags.FLAGS.config)  # before jax.distributed starts
    multihost.initialize(flags.FLAGS.multihost)  # also REALM_MULTIHOST=1 (launch/tpu_pod.sh)
    result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    if multihost.is_primary():
        last = result.history[-1] if result.history else {}
        print(json.dumps({"step": result.step, "origin": result.origin,
                          "loss": last.get("loss"), "evals": result.evals[-1:],
                          "index_swaps": result.index_swaps, "wall_s": round(result.wall_s, 1)}))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from realm_jax import cli

    config_flags.DEFINE_config_file("config", None, "Experiment config (configs/x.py[:arg]).")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, index/, logs.")
    flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (a pod).")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
