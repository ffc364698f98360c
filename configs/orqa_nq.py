"""Open-QA fine-tuning on Natural Questions (open) from a REALM pre-training run (ORQA recipe).

DESIGN §1 / the released ORQA code: the block index is built once from the pre-trained embedder
and frozen; the query tower and the reader train. Retrieve the top 5000 blocks for the
retriever loss, read the top 5 with a BERT reader on 320-wordpiece `[CLS] q [SEP] block [SEP]`,
lr 1e-5, 64-wordpiece questions, spans of width <= 10. Paper: NQ test EM 40.4.

The released code trains on one question per step for 20 epochs; a device mesh wants a batch
it can split, so we train on 16 questions per step for the same 20 epochs (the step count
below). Raise `train.batch_size` to a multiple of the device count on slices above 16 chips.

`init.path` is the pre-training run's workdir (its newest checkpoint): its embedder starts the
query tower and builds the frozen index, its knowledge-augmented encoder's BERT starts the
reader. Questions come from the TFDS `natural_questions_open` dataset, prepared beforehand
(`tfds build natural_questions_open`, then TFDS_DATA_DIR / REALM_TFDS_DATA_DIR on a pod). Its
"validation" split is NQ-open dev, which ORQA's resplit uses as the *test* set (3,610), and
its train split is ORQA's train + dev. ORQA's own splits (JSONL) instead:

    --config.data.qa='gs://orqa-data/resplit/NaturalQuestions.resplit.{split}.jsonl'
    --config.eval.split=dev --config.train.steps=98960   (79,168 train questions)

On a v5e-8 (README "Run on a TPU pod"):

    export REALM_PROJECT=my-project REALM_ACCELERATOR=v5e-8 REALM_CONFIG=configs/orqa_nq.py
    export REALM_WORKDIR=gs://my-bucket/realm/orqa_nq
    launch/tpu_pod.sh create train && launch/tpu_pod.sh setup train
    launch/tpu_pod.sh train --config.init.path=gs://my-bucket/realm/pretrain_ccnews

On one machine:

    python -m realm_jax.train --config configs/orqa_nq.py --workdir $WORKDIR

On a laptop CPU (1-layer BERT, generated knowledge base and its questions):

    python -m realm_jax.train --config configs/orqa_nq.py:tiny --workdir /tmp/realm_orqa

`arg`: "" (the paper run) | "tiny" / "runlocal" (laptop CPU, seconds per step).
"""

import math

import ml_collections

from realm_jax import defaults

ROOT = "gs://YOUR_BUCKET/realm"
ARGS = ("", "tiny", "runlocal")

EPOCHS = 20  # the released ORQA command: num_train_steps = 20 x train examples at batch 1
BATCH_SIZE = 16
TRAIN_EXAMPLES = 87_925  # TFDS natural_questions_open train (ORQA's resplit train + dev)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or ""
    if arg not in ARGS:
        raise ValueError(f"configs/orqa_nq.py: unknown arg {arg!r}; accepted: {ARGS}")
    if arg in ("tiny", "runlocal"):
        return _tiny()

    c = defaults.base_config()
    c.task = "orqa"
    c.model.bert = dict(preset="bert_base", dtype="bfloat16", param_dtype="float32",
                        remat=False)
    c.model.update(span_hidden_size=256, max_span_width=10, reader_layer_norm_eps=1e-3)
    c.init.path = f"{ROOT}/pretrain_ccnews"  # a training workdir is a valid init.path
    c.init.embedder_path = ""
    c.mesh = dict(data=-1, fsdp=1, model=1)

    c.data.corpus = f"{ROOT}/data/enwiki_blocks"  # the same blocks pre-training indexed
    c.data.qa = "natural_questions_open"  # TFDS, prepared as array_record under:
    c.data.tfds_data_dir = f"{ROOT}/tensorflow_datasets"
    c.data.qa_format = "nq_open"
    c.data.update(query_len=64, block_len=288, reader_len=320)

    c.retrieval.update(engine="exact", table_dtype="float32")
    # The index is frozen whatever refresh.mode says (task=orqa: retrieval/live.py "frozen"):
    # the trainer builds it once, when the workdir has none, from init.path's embedder, in
    # batches of refresh.batch_size blocks over all devices; nothing re-embeds it afterwards.
    c.refresh.update(batch_size=1024, max_staleness_steps=0)

    c.orqa.update(searcher_beam_size=5000, reader_beam_size=5)
    c.train.update(batch_size=BATCH_SIZE, steps=math.ceil(EPOCHS * TRAIN_EXAMPLES / BATCH_SIZE),
                   lr=1e-5, weight_decay=0.01, grad_clip=1.0, checkpoint_every=1000,
                   keep_checkpoints=5, log_every=50, warmup_steps=-1)
    c.eval.update(every_steps=5000, split="validation", batch_size=64, max_examples=0)
    return c


def _tiny() -> ml_collections.ConfigDict:
    """configs/tiny.py (1-layer 32-wide BERT, generated knowledge base with its questions,
    small beams, a few steps) with this file's task and frozen index."""
    c = defaults.tiny_config()
    c.task = "orqa"
    c.refresh.mode = "sync"  # no refresher process; the frozen index is built in the trainer
    c.eval.split = "dev"
    return c
