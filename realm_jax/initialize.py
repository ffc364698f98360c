"""Initial tower parameters: born-sharded random init, then pretrained weights grafted in.

Trainer and refresher both call `initial_params`, so the index built before any checkpoint
exists (the refresher's cold start) is built from exactly the embedder training starts with.

Grafting rules (what a demanding user expects from "init from X"):
  * a REALM tower present in the pretrained set replaces ours whole (shapes checked);
  * a missing `query_embedder` starts as a copy of the pretrained `embedder` (ORQA);
  * a missing `reader` starts from the pretrained `encoder`'s BERT body (ORQA: the reader is
    initialised from the knowledge-augmented encoder);
  * a bare `bert` body (HF BERT, MiniLM) goes into every tower, and its `mlm_head` into the
    encoder's head; the heads without a pretrained counterpart keep their random init.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from realm_jax import checkpoints, multihost, sharding
from realm_jax.models.config import RealmModelConfig

log = logging.getLogger(__name__)
PyTree = Any
RETRIEVER_TOWERS = ("embedder", "query_embedder")


def init_towers(
    cfg: RealmModelConfig, towers: Sequence[str], mesh, rules=sharding.DEFAULT_RULES,
    seed: int = 0,
) -> tuple[dict[str, PyTree], dict[str, PyTree]]:
    """Random, born-sharded params for each tower → (params, shardings), keyed by tower."""
    params, shardings = {}, {}
    for i, tower in enumerate(towers):
        module = checkpoints.tower_module(cfg, tower)
        args = checkpoints.example_inputs(tower, cfg)
        params[tower], shardings[tower] = sharding.init_sharded(
            module, jax.random.fold_in(jax.random.key(seed), i), *args, mesh=mesh, rules=rules
        )
    return params, shardings


def abstract_towers(
    cfg: RealmModelConfig, towers: Sequence[str], mesh, rules=sharding.DEFAULT_RULES
) -> dict[str, PyTree]:
    """ShapeDtypeStructs with shardings for each tower: restore targets for orbax."""
    out = {}
    for tower in towers:
        module = checkpoints.tower_module(cfg, tower)
        boxed = sharding.abstract_params(module, *checkpoints.example_inputs(tower, cfg))
        shardings = sharding.param_shardings(boxed, mesh, rules)
        unboxed = nn.meta.unbox(boxed)
        out[tower] = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unboxed, shardings)
    return out


def _graft(target: PyTree, source: Mapping[str, Any], where: str) -> PyTree:
    """Replace target leaves by source leaves of the same path; extra source keys are ignored
    (e.g. a pooler the target does not have), a shape mismatch is an error naming the path."""
    if not isinstance(source, Mapping):
        t_shape, s_shape = tuple(np.shape(target)), tuple(np.shape(source))
        if t_shape != s_shape:
            raise ValueError(f"pretrained {where} has shape {s_shape}, the model wants {t_shape}")
        return np.asarray(source, dtype=np.asarray(target).dtype)
    out = dict(target)
    for key, value in source.items():
        if key in target:
            out[key] = _graft(target[key], value, f"{where}/{key}")
    # Said, not silent: a shallower config (MiniLM's first 2 layers) drops the other layers.
    if extra := sorted(set(source) - set(target)):
        log.info("pretrained %s: %s not loaded (the model has no place for them)", where, extra)
    return out


def pretrained_towers(
    pretrained: Mapping[str, Any], towers: Sequence[str], host_params: Mapping[str, PyTree],
    filled_later: Sequence[str] = (),
) -> dict[str, PyTree]:
    """Host (numpy) params per tower with pretrained weights grafted by the module's rules.

    `filled_later`: towers another source will replace (`init.embedder_path`), so finding no
    weights for them here is no reason to warn."""
    out = {}
    for tower in towers:
        tree = host_params[tower]
        if tower in pretrained:
            source, what = pretrained[tower], tower
        elif tower == "query_embedder" and "embedder" in pretrained:
            source, what = pretrained["embedder"], "embedder"
        elif tower == "reader" and "encoder" in pretrained:
            source, what = {"bert": pretrained["encoder"]["bert"]}, "encoder body"
        elif "bert" in pretrained:
            source = {"bert": pretrained["bert"]}
            if tower == "encoder" and "mlm_head" in pretrained:
                source.update(pretrained["mlm_head"])
            what = "bert body" + (" + mlm head" if len(source) > 1 else "")
        else:
            if tower not in filled_later:
                log.warning("no pretrained weights for tower %s: it keeps its random init",
                            tower)
            out[tower] = tree
            continue
        log.info("tower %s: initialised from pretrained %s", tower, what)
        out[tower] = _graft(tree, source, tower)
    return out


def initial_params(
    config: ml_collections.ConfigDict,
    towers: Sequence[str],
    mesh,
    cfg: RealmModelConfig | None = None,
) -> tuple[dict[str, PyTree], dict[str, PyTree]]:
    """The parameters a run starts from when it has no checkpoint: (params, shardings).

    `config.init.path` names pretrained weights (`checkpoints.load_pretrained`: HF REALM /
    BERT, a conversion, another run's workdir), "minilm" for the packaged all-MiniLM-L6-v2, or
    "" for the seeded random init alone. `config.init.embedder_path`, if set, then replaces
    the retriever towers (embedder, query_embedder) — REALM starts its retriever from ICT.
    """
    from realm_jax import defaults

    cfg = cfg or defaults.model_config(config)
    params, shardings = init_towers(cfg, towers, mesh, tuple(config.rules), config.seed)
    host = None
    retrievers = [t for t in towers if t in RETRIEVER_TOWERS]
    later = retrievers if config.init.get("embedder_path", "") else []
    for key, which in (("path", towers), ("embedder_path", retrievers)):
        path = config.init.get(key, "")
        if not path or not which:
            continue
        src = checkpoints.minilm_path() if path == "minilm" else path
        _, pretrained = checkpoints.load_pretrained(src)
        # gather/put_global rather than device_get/device_put: on a pod the parameters span
        # other hosts' devices, and every host holds the same pretrained weights.
        host = multihost.gather(params) if host is None else host
        host.update(pretrained_towers(pretrained, which, host,
                                      filled_later=later if key == "path" else ()))
    if host is None:
        return params, shardings
    return jax.tree.map(multihost.put_global, host, shardings), shardings
