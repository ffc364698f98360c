"""The training tasks, one module each, one registry (`common.TASKS`): REALM pre-training
(`realm_mlm`), ORQA fine-tuning (`orqa`), and the warm starts — the Inverse Cloze Task for the
retriever (`ict`) and plain masked LM for the knowledge-augmented encoder (`mlm`).

Each task turns a host batch into device inputs (retrieval and joins happen on the host, between
steps) and defines a pure loss over the parameters of the towers it trains; `train.py` owns the
loop, the optimiser and the checkpoints.
"""

from realm_jax.tasks.common import Task, make_task

__all__ = ["Task", "make_task"]
