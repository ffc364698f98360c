"""REALM's pipeline as stages: warm starts → REALM pre-training → ORQA fine-tuning.

The paper's recipe (Guu et al. §3.4, Table 2) is a chain of training runs, each one's workdir
the next one's `init`:

    mlm   masked LM: the knowledge-augmented encoder gets an MLM head (MiniLM has none) and,
          with the "reading" source, learns to read a joined block
    ict   Inverse Cloze Task: the retriever's warm start (optional: `train_retriever`)
    realm REALM pre-training with a refreshed index ("refresh") or a never-refreshed one
          ("norefresh", the paper's staleness ablation)
    orqa  open-QA fine-tuning, from a REALM run, from the warm starts ("none": the paper's
          ORQA row) or from the weights the pipeline starts from ("start")

A pipeline config file (`configs/demo_cpu.py`) answers `get_config(arg)` for each stage name
("" is REALM with the refresher), optionally prefixed by a start ("scratch,mlm"). This module
runs the stages (`run_stage` skips a finished one, so a killed demo or benchmark resumes) and
reads back what they measured; `realm_jax.demo` and `benchmarks/realm_learning.py` are built on it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from etils import epath

from realm_jax import defaults

# ORQA from: the start's own weights, untouched ("start": MiniLM) / the warm starts without
# REALM ("none": the paper's ORQA) / REALM with a refreshed index / with a never-refreshed one.
ARMS = ("start", "none", "refresh", "norefresh")
READERS = ("realm", "start")


def load(pipeline: str, stage: str, **overrides: Any) -> ml_collections.ConfigDict:
    """`configs/<pipeline>.py:<stage>` with dotted-key overrides."""
    path = str(defaults.find_config(f"configs/{pipeline}.py"))
    return defaults.load_config(f"{path}:{stage}" if stage else path, overrides)


def finished(workdir: epath.Path, steps: int) -> bool:
    """A stage is done when its metrics log reached its last step (resume otherwise)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return False
    return any(json.loads(x).get("step") == steps for x in path.read_text().splitlines())


def run_stage(name: str, config: ml_collections.ConfigDict, workdir: epath.Path,
              progress: bool = True) -> float:
    """Train `config` in `workdir` unless already done; seconds spent (0 if skipped)."""
    from realm_jax.train import train

    if finished(workdir, config.train.steps):
        print(f"[stages] {name}: already done in {workdir}", flush=True)
        return 0.0
    print(f"[stages] {name}: {config.task}, {config.train.steps} steps → {workdir}", flush=True)
    t0 = time.time()
    train(config, workdir, progress=progress)
    return time.time() - t0


def history(workdir: epath.Path, key: str, kind: str = "eval") -> list[tuple[int, float]]:
    """(step, value) of `key` in the stage's metrics log, for rows of `kind`."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if r.get("kind") == kind and key in r]


def ends(points: list[tuple[int, float]]) -> tuple[float, float]:
    """The first and the last value of a `history` (NaN for an empty one)."""
    if not points:
        return float("nan"), float("nan")
    return float(points[0][1]), float(points[-1][1])


def last(workdir: epath.Path, key: str, kind: str = "eval") -> float:
    points = history(workdir, key, kind)
    return float(points[-1][1]) if points else float("nan")


@dataclasses.dataclass
class Pipeline:
    """The stages of one start (a config file) and seed under `root`.

    Attributes:
      config: the pipeline's config file name in configs/ ("demo_cpu").
      start: the config's start, prefixed to every stage's arg ("scratch" → "scratch,mlm");
        "" for the file's default (MiniLM).
      root: its workdirs: root/mlm, root/ict, root/realm_<arm>, root/orqa_<arm>.
      seed: every stage's `seed` (data order, masks, dropout, initialisation).
      overrides: dotted-key overrides applied to every stage (e.g. a smaller corpus).
      stage_overrides: per stage name, more overrides (e.g. {"": {"train.steps": 50}}).
      train_retriever: whether the pipeline has an `ict` stage (from scratch); else the
        retriever starts from the config's `init.embedder_path` (MiniLM).
      reader: where ORQA's reader comes from after pre-training: "realm" (the paper: the
        knowledge-augmented encoder of the REALM run, or of the `mlm` warm start for the
        "none" arm) or "start" (the start's own encoder, e.g. MiniLM, with the pre-trained
        retriever: Table 2's "REALM retriever + baseline encoder" row). The retriever is the
        pre-trained one either way.
    """

    config: str
    root: epath.Path
    start: str = ""
    seed: int = 0
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stage_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    train_retriever: bool = False
    reader: str = "realm"
    progress: bool = True
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.reader not in READERS:
            raise ValueError(f"Pipeline.reader={self.reader!r}; accepted: {READERS}")

    def cfg(self, stage: str, **extra: Any) -> ml_collections.ConfigDict:
        arg = f"{self.start},{stage}" if self.start else stage
        return load(self.config, arg, seed=self.seed,
                    **{**self.overrides, **self.stage_overrides.get(stage, {}), **extra})

    def dir(self, name: str) -> epath.Path:
        return epath.Path(self.root) / name

    def _run(self, name: str, config: ml_collections.ConfigDict) -> epath.Path:
        workdir = self.dir(name)
        self.timings[f"{name}_s"] = run_stage(name, config, workdir, self.progress)
        return workdir

    def warm_starts(self) -> dict[str, str]:
        """Run the warm-start stages the pipeline has → REALM's `init.*` overrides: the
        encoder from `mlm`, the retriever from `ict` if the pipeline trains one, else the
        config's own `init.embedder_path` (MiniLM)."""
        init = {"init.path": str(self._run("mlm", self.cfg("mlm")).resolve())}
        if self.train_retriever:
            init["init.embedder_path"] = str(self._run("ict", self.cfg("ict")).resolve())
        return init

    def realm(self, arm: str, init: Mapping[str, str]) -> epath.Path:
        """REALM pre-training, index refreshed ("refresh") or never ("norefresh")."""
        stage = {"refresh": "", "norefresh": "norefresh"}[arm]
        return self._run(f"realm_{arm}", self.cfg(stage, **init))

    def orqa(self, arm: str, init: Mapping[str, str]) -> epath.Path:
        """ORQA from the REALM run of `arm`, from the warm starts ("none"), or from the
        weights the pipeline starts from ("start")."""
        own = self.cfg("").init
        if arm == "start":
            source = {"init.path": own.path, "init.embedder_path": own.embedder_path}
        elif arm == "none":
            source = dict(init)
        else:
            source = {"init.path": str(self.dir(f"realm_{arm}").resolve()),
                      "init.embedder_path": ""}
        if self.reader == "start" and arm != "start":
            # "" = the retriever comes with init.path
            source = {"init.path": own.path,
                      "init.embedder_path": source["init.embedder_path"] or source["init.path"]}
        return self._run(f"orqa_{arm}", self.cfg("orqa", **source))

    def run(self, arms: tuple[str, ...] = ARMS) -> dict[str, dict[str, Any]]:
        """Every stage the arms need, then `measure` of each arm."""
        init = self.warm_starts()
        for arm in arms:
            if arm in ("refresh", "norefresh"):
                self.realm(arm, init)
            self.orqa(arm, init)
        return {arm: self.measure(arm) for arm in arms}

    def measure(self, arm: str) -> dict[str, Any]:
        """What an arm reached: fresh-index gold recall@5 of held-out questions before and
        after pre-training, held-out retrieval utility, how well the encoder reads the gold
        block, ORQA dev EM and answer recall."""
        orqa = self.dir(f"orqa_{arm}")
        out: dict[str, Any] = {"em": last(orqa, "exact_match")}
        recall_keys = [k for k in _eval_keys(orqa) if k.startswith("recall@")]
        if recall_keys:
            out["answer_" + recall_keys[0]] = last(orqa, recall_keys[0])
        if arm in ("start", "none"):
            return out
        realm = self.dir(f"realm_{arm}")
        fresh = {k: history(realm, f"fresh_gold_recall_at_{k}") for k in (5, 1)}
        for k, prefix in ((5, "recall"), (1, "recall_at_1")):
            ict = (history(self.dir("ict"), f"fresh_gold_recall_at_{k}")
                   if self.train_retriever else [])
            before, after = ends(fresh[k])
            # The retriever the pipeline starts from (before ICT, if it trains one).
            out[f"{prefix}_start"] = ends(ict)[0] if ict else before
            out[f"{prefix}_before"] = before
            out[f"{prefix}_after"] = after
        # Whether the encoder reads (RealmMlm.evaluate): the pdist teacher's worth; and the
        # retriever on REALM's own queries (held-out sentences), beside the questions.
        for key in ("gold_gain", "teacher_gold_first", "fresh_gold_recall_at_1"):
            out[f"{key}_before"], out[f"{key}_after"] = ends(history(realm, f"heldout_{key}"))
        out.update(
            fresh_recall_curve=fresh[5],
            fresh_recall_at_1_curve=fresh[1],
            live_recall_curve=history(realm, "gold_recall_at_5"),
            utility_curve=history(realm, "heldout_retrieval_utility"),
            index_refreshes=int(max((s for _, s in history(realm, "index_swaps", "train")),
                                    default=0)),
        )
        return out


def _eval_keys(workdir: epath.Path) -> list[str]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    keys: list[str] = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "eval":
            keys += [k for k in row if k not in keys]
    return keys
