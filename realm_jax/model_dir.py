"""What a model directory holds, for inference: a training workdir (orbax checkpoints, the
published index, config.json) or a Hugging Face REALM open-QA directory converted by
`python -m realm_jax.convert`. `inference.Realm.load` reads one through these functions; each
failure names the path at fault and the command that makes what is missing.
"""

from __future__ import annotations

import functools
import logging
import os

import ml_collections
from etils import epath

from realm_jax import checkpoints, defaults, initialize, restore, run_checkpoints, sharding
from realm_jax.data.blocks import BlockCorpus
from realm_jax.retrieval import store

log = logging.getLogger(__name__)
QUERY_TOWERS = ("query_embedder", "embedder")  # the query tower: the first one present



def _run_cmd(root: epath.Path) -> str:
    return f"python -m realm_jax.train --config configs/X.py --workdir {root}"


def _refresh_cmd(root: epath.Path) -> str:
    return (f"python -m realm_jax.refresh --resolved_config {root / 'config.json'} "
            f"--workdir {root} --once")


def _convert_cmd(root: epath.Path, src: str = "HF_OPENQA_DIR", overwrite: bool = True) -> str:
    """The conversion command; `overwrite` for a `root` that exists (convert refuses it else)."""
    return (f"python -m realm_jax.convert --from hf_realm --src {src} --out {root} "
            "--allow_pickle" + (" --overwrite" if overwrite else ""))


def detect(root: epath.Path) -> str:
    """"run" (a training workdir) or "converted" (a converted HF open-QA directory)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (a training workdir or a converted "
                                "Hugging Face REALM open-QA directory)")
    try:
        fmt = checkpoints.detect_format(root)
    except ValueError:  # a config.json of no known checkpoint format (e.g. ours, untrained)
        fmt = None
    if fmt == "orbax":
        if not ((root / "config.json").exists() and (root / store.INDEX_DIR).is_dir()):
            raise FileNotFoundError(
                f"{root} holds converted weights but no corpus and index (config.json, index/): "
                f"convert the open-QA model with its block records: {_convert_cmd(root)}")
        return "converted"
    if fmt == "run":
        return "run"
    if fmt == "hf_realm":
        raise ValueError(
            f"{root} is a Hugging Face REALM directory; the runtime reads no pickles, so "
            f"convert it once (weights, block_emb, block_records.npy): "
            f"{_convert_cmd(epath.Path('OUT'), str(root), overwrite=False)}, "
            "then Realm.load('OUT')")
    if (root / "config.json").exists():
        raise FileNotFoundError(
            f"{run_checkpoints.checkpoint_dir(root)} does not exist: no checkpoint yet; train "
            f"first: {_run_cmd(root)}")
    raise FileNotFoundError(f"{root} has no config.json: not a training workdir (written by "
                            f"{_run_cmd(root)}) nor a converted open-QA directory")


def resolve_paths(config: ml_collections.ConfigDict, root: epath.Path
                   ) -> ml_collections.ConfigDict:
    """data.vocab / data.corpus given relative to the directory (as convert writes them)."""
    with config.unlocked():
        for key in ("vocab", "corpus"):
            value = str(config.data.get(key, ""))
            if value and not os.path.isabs(value) and (root / value).exists():
                config.data[key] = str(root / value)
    return config


def inference_mesh(config: ml_collections.ConfigDict):
    try:
        return sharding.make_mesh(dict(config.mesh))
    except ValueError as e:  # trained on another topology: spread the batch over what is here
        log.warning("config mesh %s does not fit this machine (%s): using data=-1",
                    dict(config.mesh), e)
        return sharding.make_mesh({"data": -1})


def restore_run(root: epath.Path, step: int | None, config, mesh) -> tuple[int, dict]:
    """The query tower (and the reader, if trained) of checkpoint `step`, sharded on `mesh`;
    an unreadable one is named with the steps that do load."""
    targets = functools.partial(_query_and_reader, config=config, mesh=mesh,
                                where=run_checkpoints.checkpoint_dir(root))
    with restore.reading(root) as manager:
        steps = sorted(manager.all_steps())
        try:
            return restore.read_towers(manager, step, targets)
        except FileNotFoundError as e:  # no checkpoint, or no such step (named with the steps)
            if steps:
                raise
            raise FileNotFoundError(f"{e}: train first: {_run_cmd(root)}") from None
        except restore.CheckpointUnreadable as e:  # which would do, for --step
            step = steps[-1] if step is None else step
            ok = [s for s in steps if s != step and _loads(manager, s, targets)]
            hint = (f"the steps that load: {ok}: pass --step {ok[-1]}" if ok
                    else "no other step loads")
            raise restore.CheckpointUnreadable(f"{e}; {hint}") from None


def _query_and_reader(saved: list[str], *, config, mesh, where: epath.Path) -> dict:
    """Restore targets of what inference needs of the `saved` towers: the query tower (the
    first of QUERY_TOWERS there) and the reader if there is one."""
    query = next((t for t in QUERY_TOWERS if t in saved), None)
    if query is None:
        raise ValueError(f"checkpoints in {where} have towers {sorted(saved)}: no query tower "
                         f"({' or '.join(QUERY_TOWERS)})")
    towers = [query] + (["reader"] if "reader" in saved else [])
    return initialize.abstract_towers(defaults.model_config(config), towers, mesh,
                                      tuple(config.rules))


def _loads(manager, step: int, targets) -> bool:
    try:
        restore.read_towers(manager, step, targets)
    except restore.CheckpointUnreadable:
        return False
    return True


def load_converted(root: epath.Path, config) -> dict:
    """The towers of a converted directory, as host arrays (`Realm` places them)."""
    cfg, towers = checkpoints.load_pretrained(root)
    if cfg != defaults.model_config(config):
        raise ValueError(f"{root / checkpoints.OUR_MARKER} and {root / 'config.json'} describe "
                         f"different models: re-run {_convert_cmd(root)}")
    return towers


def load_index(root: epath.Path, corpus: BlockCorpus, step: int, kind: str
                ) -> store.IndexVersion:
    """The index of checkpoint `step` if published (a pre-training run), else LATEST; it must
    have been built from `corpus`."""
    fix = _refresh_cmd(root) if kind == "run" else _convert_cmd(root)
    if store.latest_step(root) is None:
        raise FileNotFoundError(f"{root / store.INDEX_DIR / store.LATEST}: no index published "
                                f"yet; build it: {fix}")
    if step in store.list_steps(root) and step != store.latest_step(root):
        version = store.load_version(root, step)
    else:
        version = store.load_latest(root)
    if version.num_blocks != len(corpus):
        raise store.IndexStoreError(
            f"{version.path / store.META}: the index has {version.num_blocks} blocks but the "
            f"corpus {corpus.description} has {len(corpus)}: it was built from another corpus; "
            f"rebuild it: {fix}")
    fingerprint = version.meta.get("corpus_fingerprint")
    if fingerprint and fingerprint != corpus.fingerprint:
        raise store.IndexStoreError(
            f"{version.path / store.META}: corpus_fingerprint {fingerprint[:12]}… is not the "
            f"corpus's {corpus.fingerprint[:12]}… ({corpus.description}); rebuild it: {fix}")
    return version
