"""Open-QA fine-tuning on WebQuestions from a REALM pre-training run (ORQA recipe).

configs/orqa_nq.py with WebQuestions: the same towers, frozen index, beams (5000 retrieved, 5
read), lr 1e-5 and 20 epochs at 16 questions per step; only the questions and the step counts
differ. Paper: WQ test EM 40.7. The questions are ORQA's resplit of WebQuestions (JSONL,
`{"question", "answer": [...]}`, 3,417 / 361 / 2,032 train / dev / test), which ORQA
published at gs://orqa-data/resplit (or build it with language/orqa/preprocessing).

    export REALM_PROJECT=my-project REALM_ACCELERATOR=v5e-8 REALM_CONFIG=configs/orqa_wq.py
    export REALM_WORKDIR=gs://my-bucket/realm/orqa_wq
    launch/tpu_pod.sh create train && launch/tpu_pod.sh setup train
    launch/tpu_pod.sh train --config.init.path=gs://my-bucket/realm/pretrain_ccnews

    python -m realm_jax.train --config configs/orqa_wq.py --workdir $WORKDIR     # one machine
    python -m realm_jax.train --config configs/orqa_wq.py:tiny --workdir /tmp/realm_wq  # CPU

`arg`: "" (the paper run) | "tiny" / "runlocal" (laptop CPU, seconds per step).
"""

import math
import pathlib

import ml_collections

from realm_jax import defaults

ARGS = ("", "tiny", "runlocal")

EPOCHS = 20  # the released ORQA command for WebQuestions: --num_train_steps=$((3417 * 20))
TRAIN_EXAMPLES = 3_417  # ORQA resplit train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or ""
    if arg not in ARGS:
        raise ValueError(f"configs/orqa_wq.py: unknown arg {arg!r}; accepted: {ARGS}")
    # configs/ is not a package: the NQ file is loaded by path, like any config.
    nq = str(pathlib.Path(__file__).with_name("orqa_nq.py"))
    c = defaults.load_config(f"{nq}:{arg}" if arg else nq)
    c.unlock()
    if arg:
        return c  # tiny: the generated knowledge base's questions, as orqa_nq.py:tiny

    c.data.qa = "gs://orqa-data/resplit/WebQuestions.resplit.{split}.jsonl"
    c.data.qa_format = "web_questions"
    batch = c.train.batch_size
    # 4,272 steps: evaluate and checkpoint about every 2.5 epochs.
    c.train.update(steps=math.ceil(EPOCHS * TRAIN_EXAMPLES / batch), checkpoint_every=500)
    c.eval.update(every_steps=500, split="dev")
    return c
