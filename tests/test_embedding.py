"""The one embedder runner: length buckets change no row, the order comes back, compilations
stay bounded, an index build shows its progress."""

import logging

import jax
import numpy as np
import pytest

from realm_jax import defaults, embedding, initialize, sharding
from realm_jax.data.blocks import BlockCorpus
from realm_jax.data.joins import tokenize_corpus
from realm_jax.data.loaders import load_tokenizer
from realm_jax.data.tokenizer import Encoded
from realm_jax.models import Embedder

WORDS = "the river city was founded by a merchant who sailed north in winter".split()


def mixed_corpus(n: int = 41) -> BlockCorpus:
    """Blocks from 3 to ~45 wordpieces, in no particular order of length."""
    rng = np.random.default_rng(0)
    return BlockCorpus.from_blocks([
        {"title": f"Entity {i}",
         "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))}
        for i in range(n)])


@pytest.fixture(scope="module")
def setup(eight_devices):
    config = defaults.load_config("configs/tiny.py")
    mesh = sharding.make_mesh({"data": -1}, eight_devices)
    params, _ = initialize.init_towers(defaults.model_config(config), ["embedder"], mesh)
    blocks = tokenize_corpus(mixed_corpus(), load_tokenizer(config))
    return config, mesh, params["embedder"], blocks


def direct(config, params, enc) -> np.ndarray:
    """The tower applied to all rows at once, at full length, no runner."""
    module = Embedder(defaults.model_config(config))
    return np.asarray(module.apply({"params": jax.device_get(params)}, enc.input_ids,
                                   enc.attention_mask, enc.token_type_ids))


def runner(config, mesh, buckets: int, batch_size: int = 16, batch_tokens: int = 0
           ) -> embedding.EmbedRunner:
    embedding._embed_fn.cache_clear()  # count this runner's compilations alone
    return embedding.EmbedRunner(defaults.model_config(config), mesh, config.rules,
                                 max_len=config.data.block_len, batch_size=batch_size,
                                 length_buckets=buckets, batch_tokens=batch_tokens)


def test_bucketed_rows_equal_full_length_rows_in_input_order(setup):
    config, mesh, params, blocks = setup
    enc = blocks.encode(np.arange(len(blocks)), config.data.block_len)
    assert len(set(enc.lengths.tolist())) > 10  # mixed lengths, unsorted
    want = direct(config, params, enc)
    full = runner(config, mesh, 1).embed_blocks(params, blocks, console=False)
    bucketed = runner(config, mesh, 4).embed_blocks(params, blocks, console=False)
    np.testing.assert_allclose(full, want, atol=1e-5)
    np.testing.assert_allclose(bucketed, want, atol=1e-5)
    again = runner(config, mesh, 4).embed_blocks(params, blocks, console=False)
    np.testing.assert_array_equal(again, bucketed)  # one corpus, one table: bitwise


def test_batches_are_sorted_bucketed_and_cover_every_row_once(setup):
    config, mesh, *_ = setup
    r = runner(config, mesh, 4)
    lengths = np.array([5, 48, 13, 30, 7, 12, 47, 20, 3] * 3)
    seen = []
    for rows, size, length in r.batches(lengths):
        assert length in (12, 24, 36, 48) and length >= lengths[rows].max()
        assert size in (8, 16) and len(rows) <= size
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(lengths)))
    assert lengths[seen].tolist() == sorted(lengths.tolist(), reverse=True)  # longest first


def test_batches_by_tokens_put_short_rows_in_larger_calls(setup):
    """batch_tokens=768 over 8 batch devices: 16 rows of 48 or 36, 32 of 24, 64 of 12 — the same
    table as batching by rows, within the same compilation bound."""
    config, mesh, params, blocks = setup
    r = runner(config, mesh, 4, batch_tokens=768)
    lengths = np.array([5, 48, 13, 30, 7, 12, 47, 20, 3] * 20)
    seen = []
    for rows, size, length in r.batches(lengths):
        assert size in (8, r.rows_for(length)) and len(rows) <= size
        assert length * size <= 768 and length >= lengths[rows].max()
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(lengths)))
    assert r.batch_size == 16 and r.rows_for(12) == 64 and r.rows_for(24) == 32
    assert r.rows_for(36) == 16 and r.rows_for(768) == 8  # at least one row per device
    by_tokens = r.embed_blocks(params, blocks, console=False)
    assert 1 < r.compilations <= 2 * 4
    by_rows = runner(config, mesh, 4).embed_blocks(params, blocks, console=False)
    np.testing.assert_allclose(by_tokens, by_rows, atol=1e-5)
    with pytest.raises(ValueError, match="batch_tokens=-1 must be >= 0"):
        runner(config, mesh, 4, batch_tokens=-1)


def test_compilations_stay_within_the_bucket_count(setup):
    config, mesh, params, blocks = setup
    r = runner(config, mesh, 4)
    for n in (1, 5, 9, 16, 23, len(blocks)):
        r.embed(params, blocks.encode(np.arange(n), config.data.block_len))
    assert 1 < r.compilations <= 2 * 4  # per bucket: a full batch and a small one
    assert embedding.bucket_length(17, 64, 4) == 32 and embedding.bucket_length(64, 64, 4) == 64
    assert embedding.bucket_length(1, 24, 4) == 6 and embedding.bucket_length(0, 24, 1) == 24


def test_retrieval_on_the_devices_equals_embedding_then_search(setup):
    """One device call (embed, search the row-sharded table, return ids and scores) finds
    what embedding on the host and then searching finds; 5 rows on 8 devices (padded)."""
    from realm_jax.retrieval import mips
    from realm_jax.tasks.common import retrieve_host_rows

    config, mesh, params, blocks = setup
    runner_ = embedding.query_runner(config, mesh)
    table = runner(config, mesh, 4).embed_blocks(params, blocks, console=False)  # [41, d]
    index = mips.ExactIndex.build(table, mesh)
    enc = load_tokenizer(config).encode_queries(
        [f"the river city {w}" for w in WORDS[:5]], config.data.query_len)
    arrays = (enc.input_ids, enc.attention_mask, enc.token_type_ids)
    ids, scores = runner_.retrieve_host_rows(params, *arrays, index, 7)
    want_ids, want_scores = index.search(runner_.embed_host_rows(params, *arrays).mine, 7)
    assert ids.shape == (5, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)

    class FakeSearcher:  # what tasks see: the exact engine exposes its device index
        engine, device_index = "exact", index

        def search(self, q, k):
            return index.search(q, k)

    got, _ = retrieve_host_rows(runner_, params, FakeSearcher(), *arrays, 7)
    np.testing.assert_array_equal(got, want_ids)
    # ScaNN: embeddings come back and the host searches its own rows (`search_host_rows`).
    FakeSearcher.engine, FakeSearcher.device_index = "scann", None
    got, _ = retrieve_host_rows(runner_, params, FakeSearcher(), *arrays, 7)
    np.testing.assert_array_equal(got, want_ids)
    with pytest.raises(ValueError, match="k"):
        runner_.retrieve_host_rows(params, *arrays, index, 42)
    nan = jax.tree.map(lambda a: a * np.nan, params)  # a diverged tower: refused, as on host
    with pytest.raises(ValueError, match="NaN or inf"):
        runner_.retrieve_host_rows(nan, *arrays, index, 7)


def test_query_rows_padded_and_cut_back(setup):
    """Fewer rows than the mesh splits the batch into: padded by a real row, cut back."""
    config, mesh, params, _ = setup
    tok = load_tokenizer(config)
    questions = ["who founded the river city?", "where", "when did the merchant sail north?"]
    enc = tok.encode_queries(questions, config.data.query_len)
    got = embedding.query_runner(config, mesh).embed(params, enc)
    assert got.shape == (3, config.model.proj_size)
    np.testing.assert_allclose(got, direct(config, params, enc), atol=1e-5)
    none = Encoded(*(a[:0] for a in (enc.input_ids, enc.attention_mask, enc.token_type_ids)))
    assert embedding.query_runner(config, mesh).embed(params, none).shape[0] == 0


def test_an_index_build_shows_rate_and_eta(setup, capsys, caplog, monkeypatch):
    config, mesh, params, blocks = setup
    monkeypatch.setattr(embedding, "LOG_EVERY_S", 0.0)  # a line for every batch
    with caplog.at_level(logging.INFO, logger="realm_jax.embedding"):
        runner(config, mesh, 4).embed_blocks(params, blocks, console=True)
    bar = capsys.readouterr().err
    # tqdm redraws at most every 0.1 s, so which counts the bar drew depends on the clock;
    # the log lines are the deterministic record of every batch.
    assert "embedding blocks" in bar and f"/{len(blocks)}" in bar
    lines = [r.getMessage() for r in caplog.records]
    assert any("/s, ETA" in m for m in lines)
    assert any(m.startswith(f"embedding blocks: {len(blocks)}/{len(blocks)}, ") for m in lines)
    assert any(m.startswith(f"embedding blocks: {len(blocks)} in ") for m in lines)


def test_bad_sizes_are_refused(setup):
    config, mesh, *_ = setup
    with pytest.raises(ValueError, match="length_buckets=0 must be >= 1"):
        runner(config, mesh, 0)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        runner(config, mesh, 4, batch_size=0)


def test_refresh_benchmark_padding_table_follows_the_runner(benchmark_module):
    """benchmarks/refresh_speed.py's padding table (what bucketing leaves to gain) counts the
    calls the runner really makes: rows sorted, each call padded to its longest row's bucket
    and to a full batch."""
    bench = benchmark_module("refresh_speed")
    from mips import minilm_config

    config = minilm_config(64, 128)
    lengths = np.array([8] * 128 + [64] * 128 + [30] * 100)
    rows = bench.padding(config, lengths, [1, 8])
    assert rows["1"]["shapes"] == 1  # the last call's 100 rows are padded to 128 too
    assert rows["1"]["padded_per_block"] == pytest.approx(3 * 128 * 64 / len(lengths))
    eight = rows["8"]
    assert eight["shapes"] == 3  # 64; 32 (the 30s and 28 of the 8s); 8 (100 rows → 128)
    assert eight["padded_per_block"] == pytest.approx(128 * (64 + 32 + 8) / len(lengths))
    assert 1.0 < eight["flops_vs_unpadded"] < rows["1"]["flops_vs_unpadded"]
    assert config.data.length_buckets == defaults.base_config().data.length_buckets
