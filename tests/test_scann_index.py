"""ScaNN index (realm_jax.retrieval.scann_index): recall against exact search, persistence."""

import os

import numpy as np
import pytest

from realm_jax.retrieval.scann_index import META_FILE, ScannConfig, ScannIndex

K = 10


def _mixture(rng, centres, count, noise=0.3):
    """Points from a Gaussian mixture: a random centre plus isotropic noise. [count, d]"""
    picks = rng.integers(len(centres), size=count)
    return (centres[picks] + noise * rng.normal(size=(count, centres.shape[1]))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def clustered():
    """50k × 128 table and 200 queries from the same 500-centre mixture (like real blocks)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(500, 128)).astype(np.float32)
    return _mixture(rng, centres, 50_000), _mixture(rng, centres, 200)


@pytest.fixture(scope="module")
def built(clustered):
    table, _ = clustered
    return ScannIndex.build(table)


def _exact_top_k(table, queries, k):
    exact = queries @ table.T  # [B, N]
    return np.argsort(-exact, axis=1, kind="stable")[:, :k], exact


def _recall(ids, true_ids):
    k = true_ids.shape[1]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, true_ids, strict=True)])


def test_recall_against_exact(clustered, built):
    table, queries = clustered
    assert not built.resolved["brute_force"]
    assert built.resolved["num_leaves"] == 447  # round(2 sqrt(50_000))
    ids, scores = built.search(queries, K)
    assert ids.shape == scores.shape == (200, K)
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    true_ids, exact = _exact_top_k(table, queries, K)
    assert _recall(ids, true_ids) >= 0.9
    # Scores are the exact float32 dot products of the returned ids, best first.
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, 1), rtol=1e-5, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert all(len(set(row)) == K for row in ids.tolist())


def test_save_load_round_trip(clustered, built, tmp_path):
    table, queries = clustered
    ids, scores = built.search(queries, K)
    staged = tmp_path / ".tmp-staging"
    built.save(staged)
    assert (staged / META_FILE).is_file()
    # The refresher renames the staged directory: saved asset paths must be relative.
    final = tmp_path / "v100"
    os.rename(staged, final)
    for loaded in (ScannIndex.load(final), ScannIndex.load(final, table=table)):
        assert loaded.size == 50_000 and loaded.dim == 128
        assert loaded.config == built.config and loaded.resolved == built.resolved
        ids2, scores2 = loaded.search(queries, K)
        np.testing.assert_array_equal(ids2, ids)
        np.testing.assert_array_equal(scores2, scores)


def test_k_beyond_reorder_and_leaf_sizes(caplog):
    """k larger than reorder_k and than the searched leaves: ScaNN would pad with id 0 / NaN."""
    rng = np.random.default_rng(1)
    table = rng.normal(size=(5000, 16)).astype(np.float32)
    queries = rng.normal(size=(8, 16)).astype(np.float32)
    config = ScannConfig(num_leaves=100, num_leaves_to_search=1, reorder_k=20)
    index = ScannIndex.build(table, config)
    ids, scores = index.search(queries, 200)
    assert "re-searching them over all leaves" in caplog.text  # the short-result path ran
    assert ids.shape == (8, 200)
    assert np.isfinite(scores).all()
    assert all(len(set(row)) == 200 for row in ids.tolist())
    np.testing.assert_allclose(
        scores, np.take_along_axis(queries @ table.T, ids, 1), rtol=1e-5, atol=1e-4
    )


def test_small_table_uses_exact_brute_force(tmp_path):
    rng = np.random.default_rng(2)
    table = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    index = ScannIndex.build(table)
    assert index.resolved == {"brute_force": True}
    ids, scores = index.search(queries, 300)
    true_ids, exact = _exact_top_k(table, queries, 300)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, true_ids, 1), atol=1e-5)
    assert ((ids == true_ids) | (np.abs(np.take_along_axis(exact, ids, 1) - scores) < 1e-5)).all()
    index.save(tmp_path / "bf")
    reloaded = ScannIndex.load(tmp_path / "bf")
    np.testing.assert_array_equal(reloaded.search(queries, 7)[0], ids[:, :7])
    single_ids, _ = index.search(queries[0], 4)  # one vector: a batch of one
    np.testing.assert_array_equal(single_ids, ids[:1, :4])


def test_bad_inputs_raise(tmp_path):
    rng = np.random.default_rng(3)
    table = rng.normal(size=(100, 8)).astype(np.float32)
    index = ScannIndex.build(table)
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k=101 .*N=100"):
        index.search(queries, 101)
    with pytest.raises(ValueError, match="k=0"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match=r"dimension 7 does not match .* dimension 8"):
        index.search(queries[:, :7], 3)
    bad = queries.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 of 4 queries contain NaN or Inf .*\[2\]"):
        index.search(bad, 3)
    broken = table.copy()
    broken[5, 5] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf .*\[5\]"):
        ScannIndex.build(broken)
    with pytest.raises(ValueError, match=r"num_leaves=200 exceeds the table size N=100"):
        ScannIndex.build(table, ScannConfig(num_leaves=200, brute_force_below=0))
    with pytest.raises(ValueError, match="reorder_k"):
        ScannConfig(reorder_k=0)
    with pytest.raises(ValueError, match=f"no {META_FILE}"):
        ScannIndex.load(tmp_path)
    index.save(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"shape \(100, 7\).*\[100, 8\]"):
        ScannIndex.load(tmp_path / "ok", table=table[:, :7])
    (tmp_path / "ok" / "scann_docids.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="unpickle"):
        ScannIndex.load(tmp_path / "ok")
