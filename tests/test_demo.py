"""The demo's driver (`realm_jax.demo.run`, what ./launch/demo.sh runs) end to end, on the tiny
model instead of MiniLM: every stage of `realm_jax.stages` (mlm warm start, REALM with a
refreshed and a never-refreshed index, ORQA with and without pre-training), the result table,
demo_result.json and an answer.

The refresher keeps only 2 index versions here, so index v0 is pruned during pre-training, as
it is in the real demo: the "recall before" figure must not need it.
"""

import json
import os

import pytest

from realm_jax import defaults, demo, stages
from realm_jax.retrieval import store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(pipeline: str, stage: str, **overrides):
    """configs/tiny.py shaped like configs/demo_cpu.py's stages, a few steps each."""
    assert pipeline == "demo_cpu"
    start, _, stage = stage.rpartition(",")
    assert start == "quick"  # the demo's budget stages
    c = defaults.load_config(os.path.join(REPO, "configs/tiny.py"))
    c.unlock()
    c.refresh.update(mode="sync", every_steps=1, keep=2)
    c.train.update(steps=4, checkpoint_every=1)
    c.eval.update(every_steps=2, recall_k=5, at_start=True, fresh_index=True,
                  heldout_sentences=8)
    c.train.freeze_steps = {"embedder": 1}
    if stage == "norefresh":
        c.refresh.every_steps = 0
    elif stage in ("mlm", "ict", "orqa"):
        c.task = stage
        c.train.freeze_steps = {}
        c.eval.update(every_steps=0, at_start=stage == "ict", fresh_index=False)
    c.update_from_flattened_dict(overrides)
    return c


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch, eight_devices, capsys):
    monkeypatch.setattr(stages, "load", small_config)
    root = tmp_path / "demo"
    result = demo.run(root, ablation=True)

    realm = root / "realm_refresh"
    assert 0 not in store.list_steps(realm)  # v0 was pruned: no longer needed
    rows = [json.loads(x) for x in (realm / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert result["recall_at_5_after_ict"] == evals[0]["fresh_gold_recall_at_5"]
    assert result["recall_at_5_after"] == evals[-1]["fresh_gold_recall_at_5"]
    assert all("heldout_retrieval_utility" in r for r in evals)
    for key in ("gold_gain", "teacher_gold_first"):
        assert result[f"{key}_before"] == evals[0][f"heldout_{key}"], key
        assert result[f"{key}_after"] == evals[-1][f"heldout_{key}"], key
    # Both pre-training runs start from the same baseline (same towers, same index v0).
    stale = [json.loads(x) for x in (root / "realm_norefresh" / "metrics.jsonl").read_text()
             .splitlines() if json.loads(x)["kind"] == "eval"]
    assert stale[0]["step"] == 0
    assert stale[0]["fresh_gold_recall_at_5"] == evals[0]["fresh_gold_recall_at_5"]
    assert result["recall_at_1_after_never_refreshed"] == stale[-1]["fresh_gold_recall_at_1"]
    assert result["index_refreshes"] >= 1
    for key in ("em_with_pretraining", "em_without_pretraining", "em_never_refreshed",
                "em_warm_starts_only"):
        assert 0.0 <= result[key] <= 1.0, key
    # "Recall before" is the retriever the pipeline starts from, before ICT.
    ict = [json.loads(x) for x in (root / "ict" / "metrics.jsonl").read_text().splitlines()]
    assert result["recall_at_5_before"] == ict[0]["fresh_gold_recall_at_5"]
    assert ict[0]["step"] == 0
    assert result["recall_at_1_after"] == evals[-1]["fresh_gold_recall_at_1"]
    assert result["recall_at_1_before"] == ict[0]["fresh_gold_recall_at_1"]
    # ORQA's reader is the start's own encoder (reader="start"); its retriever is the start's,
    # ICT's (the warm starts without REALM) or REALM's.
    origins = {arm: json.loads((root / f"orqa_{arm}" / "config.json").read_text())["init"]
               for arm in ("start", "none", "refresh")}
    assert origins["start"] == {"path": "", "embedder_path": ""}  # tiny: from scratch
    assert origins["none"] == {"path": "", "embedder_path": str((root / "ict").resolve())}
    assert origins["refresh"] == {"path": "", "embedder_path": str(realm.resolve())}
    assert (root / "refresh_ablation.png").stat().st_size > 0
    assert json.loads((root / "demo_result.json").read_text()) == json.loads(json.dumps(result))
    assert [s for s, _ in result["heldout_utility_curve"]] == [0, 2, 4]
    out = capsys.readouterr().out
    assert "Q: " in out and "| wall time |" in out

    # A second run finds every stage finished and only measures again.
    again = demo.run(root, ablation=True)
    assert again["em_with_pretraining"] == result["em_with_pretraining"]
    assert all(v == 0.0 for k, v in again.items() if k.endswith("_s") and k != "wall_s")
