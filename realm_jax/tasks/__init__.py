"""The two training tasks: REALM pre-training (`realm_mlm`) and ORQA fine-tuning (`orqa`).

Each task turns a host batch into device inputs (retrieval and joins happen on the host, between
steps) and defines a pure loss over the parameters of the towers it trains; `train.py` owns the
loop, the optimiser and the checkpoints.
"""

from realm_jax.tasks.common import Task, make_task

__all__ = ["Task", "make_task"]
