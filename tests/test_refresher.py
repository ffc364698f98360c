"""The refresher: cold start from the initial embedder, refresh from a checkpoint, skip bad
checkpoints, ScaNN engine. (Crash safety under kill -9: tests/test_refresher_crash.py.)"""

import jax
import numpy as np
import pytest

from realm_jax import defaults, initialize, run_checkpoints
from realm_jax.data.blocks import BlockCorpus
from realm_jax.models import Embedder
from realm_jax.retrieval import store
from realm_jax.retrieval.refresher import Refresher, load_tokenizer

CORPUS = BlockCorpus.from_blocks([
    {"title": f"Entity {i}", "text": f"Entity {i} was born in {1900 + i} in city number {i % 7}."}
    for i in range(37)  # not a multiple of the batch size: the last batch is padded
])


def tiny(**overrides):
    return defaults.load_config("configs/tiny.py", overrides)


def direct_embeddings(config, params):
    """What the embedder gives for the corpus, without the refresher's batching machinery."""
    tok = load_tokenizer(config)
    enc = tok.encode_blocks([b["title"] for b in CORPUS], [b["text"] for b in CORPUS],
                            config.data.block_len)
    module = Embedder(defaults.model_config(config))
    return np.asarray(module.apply({"params": jax.device_get(params)}, enc.input_ids,
                                   enc.attention_mask, enc.token_type_ids))


def test_cold_start_then_refresh_from_checkpoint(tmp_path, eight_devices):
    config = tiny()
    refresher = Refresher(config, tmp_path, corpus=CORPUS, progress=False)
    assert refresher.run(once=True) == [0]  # no checkpoint yet: initial index only
    v0 = store.load_latest(tmp_path)
    init, _ = initialize.initial_params(config, ["embedder"], refresher.mesh)
    np.testing.assert_allclose(v0.embeddings, direct_embeddings(config, init["embedder"]),
                               atol=1e-5)
    assert v0.meta["corpus_fingerprint"] == refresher.corpus_fp

    # A "trained" embedder: the initial one perturbed, saved as checkpoint 5.
    trained = jax.tree.map(lambda x: np.asarray(x) * 1.5 + 0.01, jax.device_get(init))
    manager = run_checkpoints.checkpoint_manager(tmp_path)
    run_checkpoints.save_train_state(manager, 5, trained, {}, {}, {})
    manager.wait_until_finished()
    assert refresher.run(once=True) == [0, 5]
    v5 = store.load_latest(tmp_path)
    assert v5.step == 5 and v5.meta["checkpoint_step"] == 5
    np.testing.assert_allclose(v5.embeddings, direct_embeddings(config, trained["embedder"]),
                               atol=1e-5)
    assert np.abs(v5.embeddings - v0.embeddings).max() > 1e-2
    assert refresher.run(once=True) == [0, 5]  # nothing newer: nothing published


def test_unreadable_checkpoint_is_skipped(tmp_path, eight_devices):
    config = tiny()
    refresher = Refresher(config, tmp_path, corpus=CORPUS, progress=False)
    refresher.cold_start()
    bad = run_checkpoints.checkpoint_dir(tmp_path) / "9"
    bad.mkdir(parents=True)
    (bad / "embedder").mkdir()
    (bad / "embedder" / "garbage").write_text("half written")
    assert refresher.refresh_step(9) is False
    assert store.latest_step(tmp_path) == 0
    assert store.load_latest(tmp_path).step == 0


def test_scann_engine_publishes_a_loadable_searcher(tmp_path, eight_devices):
    from realm_jax.retrieval.scann_index import ScannIndex

    config = defaults.load_config("configs/tiny.py:scann")
    Refresher(config, tmp_path, corpus=CORPUS, progress=False).run(once=True)
    version = store.load_latest(tmp_path)
    index = ScannIndex.load(version.path / "scann", table=version.embeddings)
    q = version.embeddings[:3]
    _, scores = index.search(q, 5)
    # Near-ties are common in a random tiny embedder: compare the top-5 scores, not positions.
    want = -np.sort(-(q @ version.embeddings.T), axis=1)[:, :5]
    np.testing.assert_allclose(scores, want, atol=1e-4)


def test_batch_size_must_split_over_devices(tmp_path, eight_devices):
    with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
        Refresher(tiny(**{"refresh.batch_size": 12}), tmp_path, corpus=CORPUS)
    # Calls sized by tokens ignore the row count: nothing to refuse.
    Refresher(tiny(**{"refresh.batch_size": 12, "refresh.batch_tokens": 512}), tmp_path / "t",
              corpus=CORPUS)
