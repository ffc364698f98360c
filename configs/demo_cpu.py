"""The embedded default (`./launch/demo.sh`): REALM on the generated knowledge base, from
MiniLM, on a 2-core CPU in about 11 minutes.

    ./launch/demo.sh                 # = python -m realm_jax.demo --workdir runs/demo
    python -m realm_jax.train --config configs/demo_cpu.py --workdir runs/demo/pretrain
    python -m realm_jax.train --config configs/demo_cpu.py:orqa --workdir runs/demo/orqa \\
        --config.init.path=runs/demo/pretrain

Args: "" (pre-training, refresher as a subprocess), "norefresh" (the paper's ablation: the
same pre-training with the index never refreshed), "orqa" (fine-tuning on the train questions).

Why these sizes (budget: a 2-core CPU, ~500 GFLOP/s float32 matmul peak measured, ~40 % of it
reached by a training step — benchmarks/train_speed.py; MiniLM-L6 costs about 22 MFLOP per
token forward): blocks of 32 wordpieces cut the ~1,100 generated pages into ~10k blocks of one
or two sentences each, so a full re-embedding is ~7 TFLOP (≈ 32 s alone, longer while
training shares the cores) and several refreshes fit into the pre-training minutes;
k = 5 candidates (null + 4) of 32 + 32-wordpiece joins keep a step of 16 queries at ~3 s;
100 pre-training steps with a checkpoint every 25 give the refresher 3–4 refreshes.
MiniLM's mean pooling without a projection keeps its pretrained retrieval quality at step 0.
"""

from realm_jax import defaults


def get_config(arg: str | None = None):
    c = defaults.base_config()
    c.model.bert = dict(preset="minilm_l6_h384")
    c.model.update(pooling="mean", proj_size=0, normalize=False, span_hidden_size=128,
                   max_span_width=8)
    c.init.path = "minilm"
    c.mesh = dict(data=-1, fsdp=1, model=1)

    c.data.corpus = "synthetic"
    c.data.synthetic = dict(num_entities=1130, seed=0, pretrain_splits=("train",))
    c.data.update(query_len=32, block_len=32, reader_len=64, max_masks=6)

    c.retrieval.update(k=5, extra=1, engine="exact")
    c.refresh.update(mode="subprocess", keep=3, batch_size=256, poll_interval_s=2.0,
                     wait_timeout_s=600.0)
    # MiniLM ships no MLM head: the encoder's head starts random and its early gradients to the
    # retriever are noise, which Adam turns into full-size steps. A 10× smaller retriever rate
    # keeps MiniLM's embedding geometry while the encoder learns to copy from the blocks.
    c.train.update(batch_size=16, steps=100, lr=3e-4, warmup_steps=15, checkpoint_every=25,
                   keep_checkpoints=5, log_every=5, lr_scale={"embedder": 0.1})
    c.eval.update(every_steps=25, split="dev", recall_k=5, batch_size=64, at_start=True)
    c.orqa.update(searcher_beam_size=40, reader_beam_size=4, eval_every=50)

    if arg == "norefresh":
        # Ablation: the index built from the initial embedder stays in use for the whole run.
        c.refresh.update(mode="sync", every_steps=0)
    elif arg == "orqa":
        c.task = "orqa"
        c.init.path = ""  # set to the pre-training workdir
        c.train.update(batch_size=16, steps=80, lr=5e-5, warmup_steps=8, checkpoint_every=40,
                       lr_scale={})
        c.eval.update(every_steps=0, at_start=False)  # dev EM once, at the end
        c.orqa.eval_every = 0
    elif arg not in (None, "", "pretrain"):
        raise ValueError(f"configs/demo_cpu.py: unknown arg {arg!r} (pretrain|norefresh|orqa)")
    return c
