"""A training run's checkpoints: where they live and how orbax writes and reads them.

WORKDIR/checkpoints/<step>/ holds one orbax item per tower, so the refresher can restore the
embedder alone (a partial restore reads nothing else), plus the optimiser state, the data
iterator's state and a small JSON of run metadata. Writing is the trainer's
(`save_train_state`); reading the newest readable step, with one-line errors, is
`realm_jax.restore`'s, on top of `restore_items` here. (Pretrained weights from elsewhere,
Hugging Face or converted, are `realm_jax.checkpoints`'.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

CHECKPOINT_DIR = "checkpoints"
TOWERS = ("embedder", "query_embedder", "encoder", "reader")
STATE_ITEMS = ("opt_state", "data", "meta")


def absolute(path: epath.PathLike) -> epath.Path:
    """A local path made absolute (orbax refuses relative ones); gs:// and other URLs as is."""
    return epath.Path(path) if "://" in str(path) else epath.Path(path).resolve()


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


def checkpoint_manager(
    workdir: epath.PathLike, *, keep: int = 5, async_save: bool = True, read_only: bool = False
):
    """The run's orbax CheckpointManager. `keep` ≥ 5 so a refresher reading an older step is
    not raced by deletion (STYLE pitfalls)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir).resolve(), options=options, item_names=(*TOWERS, *STATE_ITEMS)
    )


def save_train_state(
    manager, step: int, params: Mapping[str, Any], opt_state: Any, data_state: Mapping,
    meta: Mapping,
) -> None:
    """Save towers, optimiser state, iterator state and metadata (async; returns at once)."""
    import orbax.checkpoint as ocp

    unknown = set(params) - set(TOWERS)
    if unknown:
        raise ValueError(f"unknown tower(s) {sorted(unknown)}; accepted: {TOWERS}")
    items = {name: ocp.args.StandardSave(tree) for name, tree in params.items()}
    if jax.tree.leaves(opt_state):  # orbax refuses empty trees (e.g. a stateless optimiser)
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    items["data"] = ocp.args.JsonSave(dict(data_state))
    items["meta"] = ocp.args.JsonSave({**meta, "step": int(step), "towers": sorted(params)})
    manager.save(step, args=ocp.args.Composite(**items))


def restore_items(manager, step: int, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """Restore only the named items: trees of `jax.ShapeDtypeStruct` (with `.sharding` to
    restore sharded) for towers / opt_state (None: as saved, unsharded), or None for the JSON
    items."""
    import orbax.checkpoint as ocp

    args = {}
    for name, target in abstract.items():
        if name in ("data", "meta"):
            args[name] = ocp.args.JsonRestore()
        else:
            args[name] = ocp.args.StandardRestore(target)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] for name in abstract}
