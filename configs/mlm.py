"""Plain BERT masked-LM (task=mlm): the knowledge-augmented encoder's warm start, no retrieval.

REALM's encoder starts from a BERT with an MLM head; MiniLM ships none. This trains the
`encoder` tower alone on masked text; its workdir is a REALM run's `init.path` (the encoder is
grafted whole, MLM head included):

    python -m realm_jax.train --config configs/mlm.py:demo --workdir runs/mlm_demo
    python -m realm_jax.train --config configs/demo_cpu.py --workdir runs/realm \\
        --config.init.path=runs/mlm_demo --config.init.embedder_path=minilm

(The MLM workdir holds only the encoder: without `init.embedder_path` — MiniLM, or an ICT
run — REALM's embedder would keep its random init.)

Args:
  ""        the paper-sized run: BERT-base from bert-base-uncased, masked LM on the Wikipedia
            blocks with BERT's recipe (batch 256, lr 1e-4, 10k warmup steps, 15 % of the
            288-wordpiece block masked) — the "baseline encoder" row of REALM's table;
  "demo"    from MiniLM on the generated knowledge base of configs/demo_cpu.py (the same
            corpus, 32-wordpiece blocks), 150 steps. Measured on 2 CPU cores shared with
            other jobs (load ~7): 6.2 min wall (3.5 min CPU); held-out MLM accuracy on 256
            dev-entity sentences 0.000 → 0.149 (loss 10.86 → 5.61), training accuracy 0.35;
            an idle 2-core machine should take a third of that;
  "scratch" a 4-layer, 256-wide BERT (BERT-mini) from random init on the same generated KB,
            the from-scratch pipeline's first stage;
  "tiny"    configs/tiny.py's 1-layer model, a few steps (tests, CPU smoke runs):

    python -m realm_jax.train --config configs/mlm.py:tiny --workdir /tmp/mlm_tiny
    python -m realm_jax.train --config configs/mlm.py:scratch --workdir runs/mlm_scratch
"""

import ml_collections

from realm_jax import defaults

ROOT = "gs://YOUR_BUCKET/realm"
ARGS = ("", "demo", "scratch", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or ""
    if arg not in ARGS:
        raise ValueError(f"configs/mlm.py: unknown arg {arg!r}; accepted: {ARGS}")
    if arg == "tiny":
        return _tiny()
    if arg in ("demo", "scratch"):
        return _generated_kb(arg)

    c = defaults.base_config()
    c.task = "mlm"
    # bf16 compute on TPU, f32 parameters and optimiser state; one BERT-base tower at 288
    # wordpieces and 32 examples per chip fits without remat.
    c.model.bert = dict(preset="bert_base", dtype="bfloat16", param_dtype="float32",
                        remat=False)
    c.init.path = f"{ROOT}/weights/bert-base-uncased"  # HF BertForMaskedLM: body + MLM head
    c.mesh = dict(data=-1, fsdp=1, model=1)
    c.data.corpus = f"{ROOT}/data/enwiki_blocks"  # the blocks REALM retrieves
    c.data.update(block_len=288, max_masks=10)
    # BERT's masking at the block length REALM's encoder reads: 15 % of the ≤ 286 body
    # wordpieces is at most 43 predictions (BERT: 20 at 128, 76 at 512 tokens).
    c.mlm.update(source="corpus", masking="random_token", max_len=288, max_masks=43,
                 eval_examples=2048)
    # BERT's optimiser recipe (batch 256, lr 1e-4, 10k warmup, linear decay), for 100k steps of
    # continued pre-training on the retrieval corpus.
    c.train.update(batch_size=256, steps=100_000, lr=1e-4, warmup_steps=10_000,
                   weight_decay=0.01, checkpoint_every=1000, keep_checkpoints=5, log_every=100)
    c.eval.update(every_steps=5000, batch_size=256)
    return c


def _generated_kb(arg: str) -> ml_collections.ConfigDict:
    """The generated knowledge base of configs/demo_cpu.py (same entities, seed, 32-wordpiece
    blocks, so the same ~10k-block corpus), evaluated on the dev entities' sentences."""
    c = defaults.base_config()
    c.task = "mlm"
    c.mesh = dict(data=-1, fsdp=1, model=1)
    c.data.corpus = "synthetic"
    c.data.synthetic = dict(num_entities=1130, seed=0, pretrain_splits=("train",))
    c.data.update(query_len=32, block_len=32, max_masks=6)
    # ≈ 15 % of a 32-wordpiece block's body is 4 masks; 6 leaves the rate uncapped.
    c.mlm.update(source="corpus", masking="random_token", max_len=32, max_masks=6,
                 eval_examples=256)
    c.eval.update(split="dev", batch_size=64, at_start=True)
    if arg == "demo":
        # MiniLM's body; its MLM head (transform, LayerNorm, bias) starts random and the tied
        # decoder is MiniLM's word embeddings. Budget (2 CPU cores, configs/demo_cpu.py): a
        # step of 32 blocks × 32 wordpieces costs ~0.1 TFLOP with the masked positions' 30k
        # vocabulary projection, ~0.4 s.
        c.model.bert = dict(preset="minilm_l6_h384")
        c.model.update(pooling="mean", proj_size=0)
        c.init.path = "minilm"
        c.train.update(batch_size=32, steps=150, lr=2e-4, warmup_steps=15,
                       checkpoint_every=50, log_every=10)
        c.eval.every_steps = 50
    else:
        # BERT-mini (Turc et al. 2019: 4 layers, 256 wide) from random init, the real uncased
        # vocabulary; a from-scratch model needs more steps and a larger rate. No preset: the
        # BERT-base defaults (gelu_new, eps 1e-12, dropout 0.1) at BERT-mini's sizes.
        c.model.bert = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                            max_position_embeddings=128)
        c.init.path = ""
        c.train.update(batch_size=64, steps=3000, lr=5e-4, warmup_steps=300,
                       checkpoint_every=500, log_every=50)
        c.eval.every_steps = 500
    return c


def _tiny() -> ml_collections.ConfigDict:
    """configs/tiny.py's 1-layer, 32-wide BERT on its 20-entity generated KB: seconds."""
    c = defaults.tiny_config()
    c.task = "mlm"
    c.mlm.update(source="corpus", masking="random_token", max_len=0, max_masks=0,
                 eval_examples=32)
    c.eval.batch_size = 16
    return c
