"""The demo's driver (`realm_jax.demo.run`, what ./launch/demo.sh runs) end to end, on the tiny
model instead of MiniLM: pre-training, the ablation, fine-tuning, the result table and answer.

The refresher keeps only 2 index versions here, so index v0 is pruned during pre-training, as
it is in the real demo (keep=3, 4 refreshes): the "recall before" figure must not need it.
"""

import json
import os

import pytest

from realm_jax import defaults, demo
from realm_jax.retrieval import store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(arg: str, **overrides):
    """configs/tiny.py shaped like configs/demo_cpu.py's args, a few steps each."""
    c = defaults.load_config(os.path.join(REPO, "configs/tiny.py"))
    c.unlock()
    c.refresh.update(mode="sync", every_steps=1, keep=2)
    c.train.update(steps=4, checkpoint_every=1)
    c.eval.update(every_steps=2, recall_k=5, at_start=True)
    if arg == "norefresh":
        c.refresh.every_steps = 0
    elif arg == "orqa":
        c.task = "orqa"
        c.eval.update(every_steps=0, at_start=False)
        c.orqa.eval_every = 0
    c.update_from_flattened_dict(overrides)
    return c


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch, eight_devices, capsys):
    monkeypatch.setattr(demo, "_config", small_config)
    root = tmp_path / "demo"
    result = demo.run(root, ablation=True)

    assert 0 not in store.list_steps(root / "pretrain")  # v0 was pruned: no longer needed
    rows = [json.loads(x) for x in (root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert result["gold_recall_at_5_before"] == evals[0]["gold_recall_at_5"]
    # Both pre-training runs start from the same baseline (same towers, same index v0).
    stale = [json.loads(x) for x in (root / "norefresh" / "metrics.jsonl").read_text()
             .splitlines() if json.loads(x)["kind"] == "eval"]
    assert stale[0]["step"] == 0
    assert stale[0]["gold_recall_at_5"] == evals[0]["gold_recall_at_5"]
    assert result["index_refreshes"] >= 1
    assert 0.0 <= result["dev_exact_match"] <= 1.0
    assert (root / "refresh_ablation.png").stat().st_size > 0
    assert json.loads((root / "demo_result.json").read_text()) == result
    out = capsys.readouterr().out
    assert "Q: " in out and "| wall time |" in out
