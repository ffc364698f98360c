"""Every experiment config loads and builds its task's parameters on its mesh (STYLE 11).

For each `configs/*.py` and each argument it handles (found in its source, so a new config or a
new arg is tested without editing this file), `defaults.load_config` must succeed and
`jax.eval_shape` must build the towers its task trains on the config's mesh over the 8 emulated
devices — no parameter is allocated, so BERT-base configs cost about a second each. BERT-base
towers are checked against the closed-form BERT parameter count, and the per-device parameter
memory of each layout is printed (`pytest -s`), the number that decides whether a pod fits.

The paper configs' own numbers (DESIGN §1) are pinned separately, so an edit that drifts from
the paper fails here rather than in a 200k-step run.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from realm_jax import defaults, initialize, sharding
from realm_jax.data import qa as qa_lib
from realm_jax.models.config import BertConfig
from realm_jax.testing.tasks import towers_of

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))
BERT_BASE_PARAMS = 109_482_240  # bert-base-uncased with its pooler, as Hugging Face counts it


# --------------------------------------------------------------------------- discovery
def _handled_args(path: Path) -> list[str]:
    """"" plus every string `get_config` compares `arg` with, the module's `ARGS`, and every
    `configs/<name>.py:<arg>` its docstring shows."""
    source = path.read_text()
    tree = ast.parse(source)
    args = {""}
    named: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple | ast.List):
            values = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
            for target in node.targets:
                if isinstance(target, ast.Name):
                    named[target.id] = [v for v in values if isinstance(v, str)]
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                and node.left.id == "arg"):
            continue
        for comp in node.comparators:
            elts = comp.elts if isinstance(comp, ast.Tuple | ast.List | ast.Set) else [comp]
            for e in elts:
                if isinstance(e, ast.Constant) and isinstance(e.value, str):
                    args.add(e.value)
                elif isinstance(e, ast.Name):
                    args.update(named.get(e.id, []))
    args.update(named.get("ARGS", []))
    args.update(re.findall(rf"configs/{re.escape(path.name)}:([\w-]+)", source))
    return sorted(args)


CASES = [pytest.param(path, arg, id=f"{path.stem}:{arg}" if arg else path.stem)
         for path in CONFIGS for arg in _handled_args(path)]


def _spec(path: Path, arg: str) -> str:
    return f"{path}:{arg}" if arg else str(path)


def test_every_config_is_discovered():
    names = {p.name for p in CONFIGS}
    assert {"pretrain_ccnews.py", "orqa_nq.py", "orqa_wq.py", "orqa_ct.py", "tiny.py"} <= names
    for name in ("pretrain_ccnews.py", "orqa_nq.py", "orqa_wq.py", "orqa_ct.py"):
        assert {"", "tiny", "runlocal"} <= set(_handled_args(REPO / "configs" / name)), name


# --------------------------------------------------------------------------- parameter counts
def bert_body_params(b: BertConfig, pooler: bool) -> int:
    """BERT's parameter count in closed form (embeddings + layers [+ pooler])."""
    h, i = b.hidden_size, b.intermediate_size
    embeddings = (b.vocab_size + b.max_position_embeddings + b.type_vocab_size) * h + 2 * h
    attention = 4 * (h * h + h) + 2 * h  # q, k, v, output projections + LayerNorm
    mlp = (h * i + i) + (i * h + h) + 2 * h  # up, down + LayerNorm
    return embeddings + b.num_layers * (attention + mlp) + ((h * h + h) if pooler else 0)


def head_params(tower: str, cfg) -> int:
    """The parameters a tower adds on top of its BERT body (DESIGN §1)."""
    h, v = cfg.bert.hidden_size, cfg.bert.vocab_size
    if tower in ("embedder", "query_embedder"):
        p = cfg.proj_size
        return (h * p + p + 2 * p) if p else 0  # Dense(proj) + LayerNorm
    if tower == "encoder":
        return (h * h + h) + 2 * h + v  # MLM transform + LayerNorm + output bias (tied decoder)
    if tower == "reader":
        s = cfg.span_hidden_size
        return (h * 2 * s + 2 * s) + 2 * s + (s + 1)  # start/end Dense + LayerNorm + Dense(1)
    raise ValueError(tower)


def test_bert_formula_matches_bert_base():
    assert bert_body_params(BertConfig(), pooler=True) == BERT_BASE_PARAMS


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _device_bytes(tree) -> int:
    """Bytes one device holds: each leaf's shard shape under its sharding."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


@functools.cache
def _abstract(model_json: str, towers: tuple[str, ...], mesh_axes: tuple, rules: tuple):
    """abstract_towers, shared by configs with the same model (e.g. the three ORQA files)."""
    config = defaults.base_config()
    config.model = json.loads(model_json)
    cfg = defaults.model_config(config)
    mesh = sharding.make_mesh(mesh_axes)
    return cfg, mesh, initialize.abstract_towers(cfg, towers, mesh, rules)


@pytest.mark.parametrize("path, arg", CASES)
def test_config_builds_its_towers(path, arg, eight_devices):
    config = defaults.load_config(_spec(path, arg))
    towers = towers_of(config)
    cfg, mesh, abstract = _abstract(
        json.dumps(config.model.to_dict(), sort_keys=True), towers,
        tuple(sorted(dict(config.mesh).items())), tuple(config.rules))
    assert set(abstract) == set(towers)

    # Global batches split over the mesh's batch axes (the loader and refresher require it).
    shards = sharding.mesh_batch_size(mesh, tuple(config.rules))
    assert config.train.batch_size % shards == 0, (config.train.batch_size, shards)
    assert config.refresh.batch_size % shards == 0, (config.refresh.batch_size, shards)
    if config.data.get("qa_format", ""):
        assert config.data.qa_format in qa_lib.FORMATS

    layout = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    print(f"\n{_spec(path.relative_to(REPO), arg)}  task={config.task}  "
          f"bert={cfg.bert.num_layers}x{cfg.bert.hidden_size}  mesh {layout}")
    for tower, tree in abstract.items():
        n, per_device = _count(tree), _device_bytes(tree)
        print(f"  {tower:15s} {n:>13,d} params  {per_device / 2**20:9.1f} MiB/device "
              f"(x3 with Adam's two moments: {3 * per_device / 2**20:.1f} MiB)")
        assert 0 < per_device <= n * 4
        pooler = "pooler" in tree["bert"]
        assert _count(tree["bert"]) == bert_body_params(cfg.bert, pooler), tower
        assert n == bert_body_params(cfg.bert, pooler) + head_params(tower, cfg), tower
        if config.model.bert.get("preset") == "bert_base":
            # "about 110M per BERT-base tower"
            assert abs(n - BERT_BASE_PARAMS) / BERT_BASE_PARAMS < 0.01, (tower, n)


# --------------------------------------------------------------------------- the paper's numbers
def _load(name: str, arg: str = ""):
    return defaults.load_config(_spec(REPO / "configs" / name, arg))


def test_pretrain_ccnews_is_the_paper_recipe():
    c = _load("pretrain_ccnews.py")
    assert c.task == "realm_mlm" and c.model.bert.preset == "bert_base"
    assert (c.train.batch_size, c.train.lr, c.train.steps) == (512, 3e-5, 200_000)
    assert (c.retrieval.k, c.data.query_len, c.data.block_len) == (8, 96, 288)
    assert (c.data.masking, c.data.max_masks) == ("salient", 10)
    # Refreshed by its own job, from checkpoints written at the paper's ~500-step cadence.
    assert c.refresh.mode == "external" and c.train.checkpoint_every == 500
    assert c.train.keep_checkpoints >= 5  # the refresher must not lose the step it reads
    assert c.init.path and c.init.embedder_path  # BERT + an ICT-style embedder
    assert c.model.bert.dtype == "bfloat16"


@pytest.mark.parametrize("name, qa_format, regex", [
    ("orqa_nq.py", "nq_open", False),
    ("orqa_wq.py", "web_questions", False),
    ("orqa_ct.py", "curated_trec", True),
])
def test_orqa_configs_are_the_orqa_recipe(name, qa_format, regex):
    c = _load(name)
    assert c.task == "orqa" and c.model.bert.preset == "bert_base"
    assert (c.orqa.searcher_beam_size, c.orqa.reader_beam_size) == (5000, 5)
    assert (c.data.reader_len, c.data.block_len, c.train.lr) == (320, 288, 1e-5)
    assert (c.model.span_hidden_size, c.model.max_span_width) == (256, 10)
    assert c.init.path, "ORQA starts from a pre-training run"
    assert c.data.qa and c.data.qa_format == qa_format
    assert (qa_format in qa_lib.REGEX_FORMATS) == regex
    nq = _load("orqa_nq.py")
    assert c.data.corpus == nq.data.corpus  # every dataset searches the same blocks


@pytest.mark.parametrize("name", ["pretrain_ccnews.py", "orqa_nq.py", "orqa_wq.py",
                                  "orqa_ct.py"])
@pytest.mark.parametrize("arg", ["tiny", "runlocal"])
def test_tiny_arg_runs_on_a_laptop(name, arg):
    c, paper = _load(name, arg), _load(name)
    assert c.task == paper.task
    assert c.model.bert.preset == "tiny" and c.data.corpus == "synthetic"
    assert c.refresh.mode == "sync" and c.train.steps <= 10
    assert c.init.path == "" and c.data.qa == ""  # nothing to download


@pytest.mark.parametrize("name", ["pretrain_ccnews.py", "orqa_nq.py", "orqa_wq.py",
                                  "orqa_ct.py"])
def test_unknown_arg_is_an_error(name):
    with pytest.raises(ValueError, match="unknown arg 'bert_large'"):
        _load(name, "bert_large")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_docstring_has_the_run_command(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert f"python -m realm_jax.train --config configs/{path.name}" in doc


# --------------------------------------------------------------------------- an installed wheel
@pytest.mark.slow
def test_a_wheel_carries_the_configs_and_the_demo_runs_from_anywhere(tmp_path):
    """`pip install .` (not editable): from another directory, every config loads by its
    `configs/x.py` name, a command takes `--config configs/x.py`, and the demo answers --help."""
    import os
    import shutil
    import subprocess
    import sys

    source, target = tmp_path / "src", tmp_path / "site"  # a copy: the build leaves build/
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "realm_jax", "configs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    names = [p.name for p in CONFIGS]
    check = (
        "import realm_jax, sys; from realm_jax import defaults; "
        f"assert realm_jax.__file__.startswith({str(target)!r}), realm_jax.__file__; "
        f"[defaults.load_config('configs/' + n) for n in {names!r}]; "
        "assert str(defaults.find_config('configs/tiny.py')).startswith("
        f"{str(target)!r}); print('ok')")
    run = functools.partial(subprocess.run, cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    loaded = run([sys.executable, "-c", check])
    assert loaded.returncode == 0 and loaded.stdout.strip() == "ok", loaded.stderr[-2000:]
    demo = run([sys.executable, "-m", "realm_jax.demo", "--help"])
    assert demo.returncode == 0 and "usage" in demo.stdout.lower(), demo.stderr[-2000:]
    refresh = run([sys.executable, "-m", "realm_jax.refresh", "--config", "configs/tiny.py",
                   "--workdir", str(tmp_path / "w"), "--once", "--timeout_s", "1",
                   "--helpshort"])
    assert refresh.returncode == 0, refresh.stderr[-2000:]
