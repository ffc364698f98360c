"""The training tasks, one module each, and their registry (`TASKS`, here, so that the base
module `common` knows none of them): REALM pre-training (`realm_mlm`), ORQA fine-tuning
(`orqa`), and the warm starts — the Inverse Cloze Task for the retriever (`ict`) and plain
masked LM for the knowledge-augmented encoder (`mlm`).

Each task turns a host batch into device inputs (retrieval and joins happen on the host, between
steps) and defines a pure loss over the parameters of the towers it trains; `train.py` owns the
loop, the optimiser and the checkpoints.
"""

from __future__ import annotations

import ml_collections

from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.joins import TokenizedBlocks
from realm_jax.data.tokenizer import WordPiece
from realm_jax.tasks.common import Task
from realm_jax.tasks.ict import Ict
from realm_jax.tasks.mlm import Mlm
from realm_jax.tasks.orqa import Orqa
from realm_jax.tasks.realm_mlm import RealmMlm

TASKS: dict[str, type[Task]] = {"realm_mlm": RealmMlm, "orqa": Orqa, "ict": Ict, "mlm": Mlm}


def make_task(config: ml_collections.ConfigDict, mesh, corpus: BlockCorpus | None,
              blocks: TokenizedBlocks | None, tokenizer: WordPiece | None) -> Task:
    """The task `config.task` names (None data: a task that only computes its loss)."""
    if config.task not in TASKS:
        raise ValueError(f"task={config.task!r}; accepted: {', '.join(TASKS)}")
    return TASKS[config.task](config, mesh, corpus, blocks, tokenizer)


__all__ = ["TASKS", "Task", "make_task"]
