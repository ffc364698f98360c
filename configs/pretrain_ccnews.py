"""REALM pre-training as in the paper: CC-News sentences, Wikipedia blocks, BERT-base towers.

Guu et al. 2020 §4 / DESIGN §1: batch 512, lr 3e-5, 200k steps, k = 8 candidates including the
null document, 96-wordpiece queries and 288-wordpiece blocks, salient span masking, the index
re-embedded about every 500 steps by a separate job (64 TPUs train, 16 re-embed).

On a Cloud TPU pod (README "Run on a TPU pod"; v4-64 trains, v4-16 re-embeds):

    export REALM_PROJECT=my-project REALM_WORKDIR=gs://my-bucket/realm/pretrain_ccnews
    launch/tpu_pod.sh create train && launch/tpu_pod.sh create refresh
    launch/tpu_pod.sh setup train && launch/tpu_pod.sh setup refresh
    launch/tpu_pod.sh refresh     # cold start: index v0 from the initial embedder, then follows
    launch/tpu_pod.sh train

On one machine (the same two processes by hand):

    python -m realm_jax.refresh --config configs/pretrain_ccnews.py --workdir $WORKDIR &
    python -m realm_jax.train --config configs/pretrain_ccnews.py --workdir $WORKDIR

On a laptop CPU (1-layer BERT, generated knowledge base, index re-embedded inside the loop):

    python -m realm_jax.train --config configs/pretrain_ccnews.py:tiny --workdir /tmp/realm_pre

Data and weights live under `ROOT`: edit it, or override single keys on the command line
(`--config.data.corpus=gs://...`). Every path must be readable from every host of the pod.
`arg`: "" (the paper run) | "tiny" / "runlocal" (laptop CPU, seconds per step).
"""

import pathlib

import ml_collections

from realm_jax import defaults

ROOT = "gs://YOUR_BUCKET/realm"
ARGS = ("", "tiny", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or ""
    if arg not in ARGS:
        raise ValueError(f"configs/pretrain_ccnews.py: unknown arg {arg!r}; accepted: {ARGS}")
    if arg in ("tiny", "runlocal"):
        return _tiny()

    c = defaults.base_config()
    c.task = "realm_mlm"
    # bf16 compute on TPU (the MXU's native type), f32 parameters and optimiser state.
    # remat: at 16 examples per chip (batch 512 on a v4-64's 32 chips) the step needs 34.0 GiB
    # per v4 chip without it (30.75 GiB HBM), 7.4 GiB with it, for +37% FLOPs
    # (benchmarks/aot.py --target v4:2x2x2 --batch 128, benchmarks/README.md).
    c.model.bert = dict(preset="bert_base", dtype="bfloat16", param_dtype="float32",
                        remat=True)
    c.model.share_embedders = True  # one embedder for queries and blocks (released code)

    # BERT-base uncased (an HF directory with model.safetensors + config.json) goes into every
    # tower; the retriever towers are then replaced by an ICT-trained embedder, because REALM
    # warm-starts retrieval (the paper's "cold-start problem": a retriever that fetches
    # unrelated blocks teaches the encoder to ignore them, and then gets no useful gradient).
    # Without an ICT embedder, pass --config.init.embedder_path='' to start from BERT anyway.
    c.init.path = f"{ROOT}/weights/bert-base-uncased"
    c.init.embedder_path = f"{ROOT}/weights/ict_embedder"

    # Pure data parallelism: f32 parameters, gradients and Adam state of the two BERT-base
    # towers (~3.5 GB) fit on every chip (32 GiB on v4, 16 on v5e), so sharding them (fsdp)
    # would only add all-gathers.
    c.mesh = dict(data=-1, fsdp=1, model=1)

    c.data.corpus = f"{ROOT}/data/enwiki_blocks"  # realm_blocks: 13,353,718 Wikipedia blocks
    c.data.sentences = f"{ROOT}/data/ccnews_sentences"  # realm_sentences with salient spans
    c.data.qa = ""  # no gold blocks for real QA sets: no recall@k during pre-training
    c.data.update(query_len=96, block_len=288, max_masks=10, masking="salient")

    # Exact search sharded over all devices: 13.35M x 128 float32 = 6.8 GB, 214 MB per v4-64
    # chip — the released code's brute-force MIPS, without ScaNN's approximation.
    c.retrieval.update(k=8, extra=2, engine="exact", table_dtype="float32")

    # The refresher runs as its own job on its own slice (launch/tpu_pod.sh refresh) and
    # follows the checkpoints, so a checkpoint every 500 steps is what lets the index track
    # the embedder at the paper's cadence. The trainer waits rather than train on an index
    # more than 5000 steps (10x the paper's) behind: in the paper's ablation a 30x staler index
    # took NQ dev EM from 38.2 to 28.7, so a dead refresher should stall the run, not degrade it.
    c.refresh.update(mode="external", every_steps=500, max_staleness_steps=5000, keep=3,
                     batch_size=1024, poll_interval_s=30.0, wait_timeout_s=3 * 3600.0)

    c.train.update(batch_size=512, steps=200_000, lr=3e-5, weight_decay=0.01, grad_clip=1.0,
                   checkpoint_every=500, keep_checkpoints=5, log_every=100, warmup_steps=-1,
                   mlm_variant="per_token")
    c.eval.every_steps = 0
    return c


def _tiny() -> ml_collections.ConfigDict:
    """configs/tiny.py (1-layer 32-wide BERT, generated knowledge base, a few steps, the index
    re-embedded synchronously inside the loop): the same code path in seconds on a CPU."""
    c = defaults.load_config(str(pathlib.Path(__file__).with_name("tiny.py")))
    c.unlock()
    c.task = "realm_mlm"
    c.refresh.mode = "sync"
    return c
