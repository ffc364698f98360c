"""Exact sharded MIPS (realm_jax.retrieval.mips) against numpy, on 8 emulated devices."""

import functools

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from realm_jax.retrieval import mips
from realm_jax.retrieval.mips import ExactIndex, exact_search, sharded_exact_search
from realm_jax.sharding import make_mesh

MESHES = {"d2f2m2": {"data": 2, "fsdp": 2, "model": 2}, "d8": {"data": 8}}


def _data(n: int, d: int = 32, b: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(n, d)).astype(np.float32)  # [N, d]
    queries = rng.normal(size=(b, d)).astype(np.float32)  # [B, d]
    return table, queries


def _assert_matches_numpy(ids, scores, table, queries, k, atol=1e-5):
    """ids equal numpy's argsort except among exact (within atol) ties; scores within atol."""
    n = table.shape[0]
    exact = queries @ table.T  # [B, N]
    true_ids = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # [B, k]
    true_scores = np.take_along_axis(exact, true_ids, 1)
    assert ids.shape == scores.shape == (queries.shape[0], k)
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    assert ((ids >= 0) & (ids < n)).all(), "a padding id was returned"
    assert all(len(set(row)) == k for row in ids.tolist()), "duplicate ids"
    np.testing.assert_allclose(scores, true_scores, rtol=0, atol=atol)
    # Scores belong to the ids they come with.
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, 1), rtol=0, atol=atol)
    tie = np.abs(np.take_along_axis(exact, ids, 1) - true_scores) <= atol
    assert ((ids == true_ids) | tie).all()


@pytest.fixture(scope="module", params=sorted(MESHES))
def mesh(request, eight_devices):
    return make_mesh(MESHES[request.param])


@pytest.mark.parametrize(
    "options",
    [{}, {"use_approx": True}, {"chunk_rows": 48}],
    ids=["top_k", "approx_max_k", "chunked"],
)
def test_float32_equals_numpy(mesh, options):
    table, queries = _data(1001)  # 1001 rows: not divisible by 8 devices
    index = ExactIndex.build(table, mesh, **options)
    assert index.size == 1001 and index.num_shards == 8
    ids, scores = index.search(queries, 10)
    _assert_matches_numpy(ids, scores, table, queries, 10)


def test_table_is_sharded_over_all_devices(mesh):
    table, _ = _data(1001)
    index = ExactIndex.build(table, mesh)
    assert index.table.sharding.spec == PartitionSpec(("data", "fsdp", "model"), None)
    shards = index.table.addressable_shards
    assert len({s.device for s in shards}) == 8
    assert {s.data.shape for s in shards} == {(126, 32)}  # ceil(1001 / 8) rows each


def test_bfloat16_table(mesh):
    table, queries = _data(1001, seed=1)
    k = 10
    index = ExactIndex.build(table, mesh, dtype="bfloat16")
    assert index.table.dtype == jax.numpy.bfloat16
    ids, scores = index.search(queries, k)
    # Exact with respect to what is stored: bf16 table and bf16-cast queries, f32 sums.
    rounded_t = table.astype(ml_dtypes.bfloat16).astype(np.float32)
    rounded_q = queries.astype(ml_dtypes.bfloat16).astype(np.float32)
    _assert_matches_numpy(ids, scores, rounded_t, rounded_q, k, atol=1e-4)
    # Against the float32 truth: scores within the bf16 rounding bound, high recall.
    exact = queries @ table.T  # [B, N]
    bound = 2.0**-7 * 1.01 * (np.abs(queries)[:, None, :] * np.abs(table[ids])).sum(-1)
    assert (np.abs(scores - np.take_along_axis(exact, ids, 1)) <= bound).all()
    true_ids = np.argsort(-exact, axis=1)[:, :k]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, true_ids, strict=True)])
    assert recall >= 0.9


@pytest.mark.parametrize("n,k", [(13, 5), (13, 13), (3, 3), (9, 8)])
def test_fewer_rows_than_devices_times_k(mesh, n, k):
    """Most shards hold < k real rows (some none): padding must never surface."""
    table, queries = _data(n, d=8, b=4, seed=n)
    index = ExactIndex.build(table, mesh)
    ids, scores = index.search(queries, k)
    _assert_matches_numpy(ids, scores, table, queries, k)
    assert np.isfinite(scores).all()


def test_chunked_with_fewer_chunk_rows_than_k(eight_devices):
    table, queries = _data(300, d=8, b=4)
    index = ExactIndex.build(table, make_mesh({"data": 8}), chunk_rows=4)
    ids, scores = index.search(queries, 20)
    _assert_matches_numpy(ids, scores, table, queries, 20)


def test_negative_scores_beat_padding(eight_devices):
    """All real scores negative: padding rows (zeros, score 0 before masking) must still lose."""
    table, queries = _data(11, d=8, b=3)
    table = -np.abs(table)
    queries = np.abs(queries)
    ids, scores = ExactIndex.build(table, make_mesh({"data": 8})).search(queries, 11)
    assert (scores < 0).all()
    _assert_matches_numpy(ids, scores, table, queries, 11)


def test_pure_function_inside_jit(mesh):
    """The train step will call sharded_exact_search inside its own jit."""
    table, queries = _data(1001)
    index = ExactIndex.build(table, mesh)
    search = jax.jit(
        functools.partial(sharded_exact_search, k=7, mesh=mesh, num_valid=index.num_valid)
    )
    ids, scores = search(index.table, jax.numpy.asarray(queries))
    _assert_matches_numpy(np.asarray(ids), np.asarray(scores), table, queries, 7)
    ids_host, _ = index.search(queries, 7)
    np.testing.assert_array_equal(np.asarray(ids), ids_host)


def test_sharded_gather_equals_numpy_take_without_gathering_the_table(mesh):
    """ORQA's step reads its retrieved blocks' rows from the row-sharded table: every id,
    on whichever shard, comes back exactly; an id outside the table (−1) gives zeros; and
    no device ever holds the whole table (the compiled program has no all-gather of it)."""
    table, _ = _data(1001)
    index = ExactIndex.build(table, mesh)
    ids = np.array([[0, 125, 126, 1000], [-1, 500, 999, 7], [3, 3, 1001, 64]], np.int32)
    gather = jax.jit(functools.partial(mips.sharded_gather_rows, mesh=mesh))
    got = np.asarray(gather(index.table, ids))  # [3, 4, 32]
    want = np.where((ids >= 0)[..., None], table[np.clip(ids, 0, 1000)], 0)
    want[2, 2] = 0  # 1001 is a padding row of the table: zeros, as the build padded it
    np.testing.assert_array_equal(got, want)
    hlo = gather.lower(index.table, ids).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo


def test_unsharded_exact_search_matches_numpy():
    table, queries = _data(500)
    for chunk in (None, 100):
        ids, scores = jax.jit(
            functools.partial(exact_search, k=9, chunk_rows=chunk)
        )(table, queries)
        _assert_matches_numpy(np.asarray(ids), np.asarray(scores), table, queries, 9)


def test_search_compiles_once_per_shape(eight_devices):
    table, queries = _data(1001)
    index = ExactIndex.build(table, make_mesh({"data": 8}))
    index.search(queries, 4)
    before = mips._search_jit._cache_size()
    for _ in range(3):
        index.search(queries, 4)
    index.search(queries + 1.0, 4)
    assert mips._search_jit._cache_size() == before
    index.search(queries, 5)  # a new k compiles once more
    assert mips._search_jit._cache_size() == before + 1


def test_single_vector_is_a_batch_of_one(eight_devices):
    table, queries = _data(100, d=8)
    index = ExactIndex.build(table, make_mesh({"data": 8}))
    ids, scores = index.search(queries[0], 3)
    assert ids.shape == scores.shape == (1, 3)
    np.testing.assert_array_equal(ids[0], index.search(queries[:1], 3)[0][0])


def test_bad_inputs_raise(eight_devices):
    table, queries = _data(100, d=8)
    mesh = make_mesh({"data": 8})
    index = ExactIndex.build(table, mesh)
    with pytest.raises(ValueError, match=r"k=101 .*N=100"):
        index.search(queries, 101)
    with pytest.raises(ValueError, match="k=0"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="k must be an int"):
        index.search(queries, 2.0)
    with pytest.raises(ValueError, match=r"dimension 9 does not match .* dimension 8"):
        index.search(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 8\)"):
        index.search(np.zeros((2, 2, 8), np.float32), 3)
    bad = queries.copy()
    bad[3, 1] = np.nan
    bad[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 of 16 queries contain NaN or Inf .*\[3, 5\]"):
        index.search(bad, 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        index.search(jax.numpy.asarray(bad), 3)  # device arrays are checked too
    broken = table.copy()
    broken[7, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 rows with NaN or Inf .*\[7\]"):
        ExactIndex.build(broken, mesh)
    with pytest.raises(ValueError, match=r"\[N, d\].*\(8,\)"):
        ExactIndex.build(table[0], mesh)
    with pytest.raises(ValueError, match="dtype"):
        ExactIndex.build(table, mesh, dtype="float16")
