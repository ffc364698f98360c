"""A 1-layer, 32-wide REALM for tests and CPU smoke runs (seconds per step on a laptop).

    python -m realm_jax.train --config configs/tiny.py --workdir /tmp/realm_tiny
    python -m realm_jax.refresh --config configs/tiny.py --workdir /tmp/realm_tiny --once

`arg` "scann" switches the index engine to ScaNN.
"""

from realm_jax import defaults


def get_config(arg: str | None = None):
    c = defaults.base_config()
    # Real uncased BERT vocab (the packaged MiniLM one), so tokenised text indexes the table.
    c.model.bert = dict(preset="tiny", vocab_size=30522, max_position_embeddings=128,
                        hidden_dropout=0.0, attention_dropout=0.0)
    c.model.proj_size = 16
    c.model.span_hidden_size = 8
    c.model.max_span_width = 4
    c.data.corpus = "synthetic"
    c.data.synthetic = dict(num_entities=20, seed=0)
    c.data.update(query_len=24, block_len=48, reader_len=64, max_masks=4)
    c.retrieval.k = 4
    c.retrieval.extra = 1
    if arg == "scann":
        c.retrieval.engine = "scann"
    c.refresh.update(mode="sync", every_steps=2, batch_size=16, keep=3, poll_interval_s=0.2)
    c.train.update(batch_size=8, steps=3, lr=1e-3, checkpoint_every=1, log_every=1)
    c.orqa.update(searcher_beam_size=8, reader_beam_size=2)
    return c
