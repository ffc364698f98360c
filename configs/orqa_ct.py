"""Open-QA fine-tuning on CuratedTrec from a REALM pre-training run (ORQA recipe).

configs/orqa_nq.py with CuratedTrec: the same towers, frozen index, beams (5000 retrieved, 5
read), lr 1e-5 and 20 epochs at 16 questions per step. CuratedTrec's answers are regular
expressions: `data.qa_format="curated_trec"` makes both the training signal (which blocks and
spans count as correct) and exact match use regex matching. Paper: CT test EM 42.9.

ORQA did not publish its CuratedTrec resplit (1,353 / 133 / 694 train / dev / test): build it
with language/orqa/preprocessing/create_data_splits.py from DrQA's CuratedTrec files and copy
the three `CuratedTrec.resplit.{train,dev,test}.jsonl` files to `ROOT`/qa (or override
`--config.data.qa`).

    export REALM_PROJECT=my-project REALM_ACCELERATOR=v5e-8 REALM_CONFIG=configs/orqa_ct.py
    export REALM_WORKDIR=gs://my-bucket/realm/orqa_ct
    launch/tpu_pod.sh create train && launch/tpu_pod.sh setup train
    launch/tpu_pod.sh train --config.init.path=gs://my-bucket/realm/pretrain_ccnews

    python -m realm_jax.train --config configs/orqa_ct.py --workdir $WORKDIR     # one machine
    python -m realm_jax.train --config configs/orqa_ct.py:tiny --workdir /tmp/realm_ct  # CPU

`arg`: "" (the paper run) | "tiny" / "runlocal" (laptop CPU, seconds per step).
"""

import math
import pathlib

import ml_collections

from realm_jax import defaults

ROOT = "gs://YOUR_BUCKET/realm"
ARGS = ("", "tiny", "runlocal")

EPOCHS = 20
TRAIN_EXAMPLES = 1_353  # ORQA resplit train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or ""
    if arg not in ARGS:
        raise ValueError(f"configs/orqa_ct.py: unknown arg {arg!r}; accepted: {ARGS}")
    # configs/ is not a package: the NQ file is loaded by path, like any config.
    nq = str(pathlib.Path(__file__).with_name("orqa_nq.py"))
    c = defaults.load_config(f"{nq}:{arg}" if arg else nq)
    c.unlock()
    if arg:
        return c  # tiny: the generated knowledge base's questions, as orqa_nq.py:tiny

    c.data.qa = f"{ROOT}/qa/CuratedTrec.resplit.{{split}}.jsonl"
    c.data.qa_format = "curated_trec"
    batch = c.train.batch_size
    # 1,692 steps: evaluate and checkpoint about every 2.4 epochs.
    c.train.update(steps=math.ceil(EPOCHS * TRAIN_EXAMPLES / batch), checkpoint_every=200)
    c.eval.update(every_steps=200, split="dev")
    return c
