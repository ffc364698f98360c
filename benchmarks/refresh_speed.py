"""The refresher on real text: our block runner vs sentence-transformers, same MiniLM weights.

Run (needs the `bench` extra: `pip install -e ".[bench]"`):

    python benchmarks/refresh_speed.py                      # 50k dictionary blocks, ~15 min
    python benchmarks/refresh_speed.py --blocks 5000 --sample 1000   # a quick look
    python benchmarks/refresh_speed.py --padding-only       # what padding costs, no timing

Corpus: GCIDE, the GNU Collaborative International Dictionary of English, as Debian's
`dict-gcide` ships it (`apt-get download dict-gcide`, fetched into --cache if no --deb is given):
one block per entry (title: the headword; text: the entry with its markup stripped), `--blocks`
entries spread evenly over the alphabet. Real text of real lengths: most entries are short,
a few run past the block.

Timed, each over the same blocks, in one process, on the same cores (XLA's pool and
`torch.set_num_threads(os.cpu_count())`), compile included (a refresher pays it too):
  ours, buckets B   `embedding.block_runner(...).embed_blocks` with data.length_buckets=B
                    (1: every block padded to data.block_len, the runner before length
                    buckets; measured on the first `--sample` blocks only, and so marked);
                    with `--batch-tokens T`, one more row: the last bucket count batching
                    by padded tokens (refresh.batch_tokens=T: short blocks in larger calls);
                    with `--bf16`, one more: bfloat16 compute (model.bert.dtype);
  sentence-transformers  `SentenceTransformer(all-MiniLM-L6-v2).encode(texts, batch_size)`,
                    which sorts by length and pads each batch to its longest; its texts are
                    `title [SEP] text` so both sides read the same wordpieces (its token type
                    ids are all 0, ours 1 after the first [SEP]: the cosine column shows how
                    close the two functions are);
  publish           `refresher.publish_index` of our table (exact and ScaNN engines): build +
                    save + sha256 + fsync + rename.
Also the generated KB's blocks/s (the corpus the tests and the demo use) for comparison.

Output: a table on stdout and JSON (`--out`, default benchmarks/results/refresh_speed.json)
with blocks/s, seconds, the ratio to sentence-transformers, the corpus's wordpiece lengths and
the CPU model (`lscpu`: machines differ ~2.3x per step).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_utils  # noqa: E402
from bench_utils import cpu_busy_elsewhere, cpu_model  # noqa: E402

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DICT = "usr/share/dictd/gcide"
PADDING_BUCKETS = [1, 4, 8, 16, 32, 64]  # bucket counts of the padding table


def _b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64.index(c)
    return v


def gcide_deb(cache: str) -> str:
    """Debian's dict-gcide package, downloaded into `cache` unless it is there."""
    os.makedirs(cache, exist_ok=True)
    debs = [f for f in os.listdir(cache) if f.startswith("dict-gcide_") and f.endswith(".deb")]
    if not debs:
        subprocess.run(["apt-get", "download", "dict-gcide"], cwd=cache, check=True)
        debs = [f for f in os.listdir(cache) if f.startswith("dict-gcide_")]
    return os.path.join(cache, sorted(debs)[-1])


def _clean(entry: str) -> str:
    text = re.sub(r"\\[^\\]*\\", " ", entry)  # pronunciations \Al"lo*cate\
    text = re.sub(r"\[(1913 Webster|WordNet[^\]]*|PJC|Century[^\]]*)\]", " ", text)
    return re.sub(r"\s+", " ", text.replace("{", "").replace("}", "")).strip()


def gcide_blocks(deb: str, n: int) -> list[dict[str, str]]:
    """`n` entries of the dictionary, evenly spread, as {title, text} blocks."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        data = gzip.open(os.path.join(tmp, _DICT + ".dict.dz")).read()
        index = open(os.path.join(tmp, _DICT + ".index"), encoding="utf-8").read().splitlines()
    entries, seen = [], set()
    for line in index:
        word, off, size = line.split("\t")
        if word.startswith("00") or off in seen:  # dictd's own headers; one entry, one block
            continue
        seen.add(off)
        entries.append((word, _b64(off), _b64(size)))
    if n > len(entries):
        raise SystemExit(f"--blocks {n}: the dictionary has {len(entries)} entries")
    pick = np.linspace(0, len(entries) - 1, n).astype(int)
    out = []
    for i in pick:
        word, off, size = entries[i]
        text = _clean(data[off:off + size].decode("utf-8", "replace"))
        out.append({"title": word, "text": " ".join(text.split()[:120])})
    return out


def generated_kb_blocks(n: int, block_len: int) -> list[dict[str, str]]:
    """The first `n` blocks of the generated KB the tests and the demo use."""
    from realm_jax import defaults
    from realm_jax.data.loaders import load_corpus, load_tokenizer

    config = defaults.base_config()
    config.data.update(corpus="synthetic", block_len=block_len)
    corpus = load_corpus(config, load_tokenizer(config))
    return [{"title": corpus[i]["title"], "text": corpus[i]["text"]}
            for i in range(min(n, len(corpus)))]


def tokenize_blocks(blocks: list[dict[str, str]], tok: Any) -> Any:
    """Blocks → `TokenizedBlocks` (title and text), as the refresher reads them."""
    from realm_jax.data.joins import TokenizedBlocks

    return TokenizedBlocks.from_lists(tok.tokenize([b["title"] for b in blocks]),
                                      tok.tokenize([b["text"] for b in blocks]), tok)


def ours(blocks: list[dict[str, str]], block_len: int, batch: int, buckets: int,
         batch_tokens: int = 0, dtype: str = "float32") -> dict:
    from mips import minilm_config

    from realm_jax import embedding, initialize, sharding
    from realm_jax.data.loaders import load_tokenizer

    config = minilm_config(block_len, batch)
    config.model.proj_size = 0  # MiniLM's own mean-pooled output, as sentence-transformers'
    config.data.length_buckets = buckets
    config.refresh.batch_tokens = batch_tokens
    config.model.bert.dtype = dtype  # compute dtype; the parameters stay float32
    mesh = sharding.make_mesh(dict(config.mesh))
    params, _ = initialize.initial_params(config, ["embedder"], mesh)
    tok = load_tokenizer(config)
    t0 = time.perf_counter()
    tokenized = tokenize_blocks(blocks, tok)
    t1 = time.perf_counter()
    embedding._embed_fn.cache_clear()  # compile included, as a refresher pays it
    table = embedding.block_runner(config, mesh).embed_blocks(params["embedder"], tokenized,
                                                               console=True)
    t2 = time.perf_counter()
    return {"table": table, "tokenize_s": t1 - t0, "embed_s": t2 - t1,
            "blocks_per_s": len(blocks) / (t2 - t1), "config": config}


def sentence_transformers(blocks: list[dict[str, str]], block_len: int, batch: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from realm_jax.checkpoints import minilm_path

    torch.set_num_threads(os.cpu_count() or 1)
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = block_len
    texts = [f"{b['title']} [SEP] {b['text']}" for b in blocks]
    t0 = time.perf_counter()
    table = model.encode(texts, batch_size=batch, show_progress_bar=True,
                         convert_to_numpy=True, normalize_embeddings=False)
    dt = time.perf_counter() - t0
    return {"table": table, "embed_s": dt, "blocks_per_s": len(blocks) / dt}


def padding(config: Any, lengths: np.ndarray, buckets: list[int]) -> dict[str, dict]:
    """What padding costs under each bucket count, computed, not timed: the runner's own
    batching (`EmbedRunner.batches`, per window of BLOCK_WINDOW batches as `embed_blocks`
    does) over the corpus' wordpiece `lengths` [N] → padded wordpieces per block, the shapes
    compiled, and forward FLOPs relative to no padding at all (dense layers per token, plus
    attention per query-key pair). Why: it bounds what any padding scheme, bucketing or
    packing, can still gain at today's per-token speed."""
    from realm_jax import defaults, embedding, sharding

    bert = defaults.model_config(config).bert
    dense = 2 * bert.num_layers * (4 * bert.hidden_size ** 2
                                   + 2 * bert.hidden_size * bert.intermediate_size)
    pair = 2 * bert.num_layers * 2 * bert.hidden_size  # q·k and p·v, per query-key pair
    ideal = float(np.sum(lengths * dense + lengths.astype(np.float64) ** 2 * pair))
    config = config.copy_and_resolve_references()  # the caller's keeps its bucket count
    mesh = sharding.make_mesh(dict(config.mesh))
    rows = {}
    for b in buckets:
        config.data.length_buckets = b
        runner = embedding.block_runner(config, mesh)
        window = runner.batch_size * embedding.BLOCK_WINDOW
        calls = [(size, length) for start in range(0, len(lengths), window)
                 for _, size, length in runner.batches(lengths[start:start + window])]
        flops = sum(size * (length * dense + length ** 2 * pair) for size, length in calls)
        rows[str(b)] = {"padded_per_block": sum(s * n for s, n in calls) / len(lengths),
                        "shapes": len(set(calls)), "flops_vs_unpadded": flops / ideal}
    return rows


def publish(config: Any, table: np.ndarray, engine: str) -> float:
    from realm_jax.retrieval.refresher import publish_index

    config.retrieval.engine = engine
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        publish_index(config, workdir, 0, table, "bench")
        return time.perf_counter() - t0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.median((a * b).sum(1)))


def corpus_lengths(blocks: list[dict[str, str]], block_len: int, batch: int
                   ) -> tuple[np.ndarray, Any]:
    """Wordpieces per block as our runner reads them, and the benchmark's config."""
    from mips import minilm_config

    from realm_jax.data.loaders import load_tokenizer

    config = minilm_config(block_len, batch)
    tokenized = tokenize_blocks(blocks, load_tokenizer(config))
    return tokenized.encode(np.arange(len(blocks)), block_len).lengths, config


def padding_table(rows: dict[str, dict]) -> str:
    lines = [f"{'buckets':>8} {'padded wp/block':>16} {'shapes':>7} {'FLOPs vs unpadded':>18}"]
    lines += [f"{b:>8} {r['padded_per_block']:>16.2f} {r['shapes']:>7} "
              f"{r['flops_vs_unpadded']:>17.3f}x" for b, r in rows.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    blocks = gcide_blocks(args.deb or gcide_deb(args.cache), args.blocks)
    lengths, config = corpus_lengths(blocks, args.block_len, args.batch)
    pad = padding(config, lengths, PADDING_BUCKETS)
    if args.padding_only:
        return {"corpus": {"blocks": len(blocks), "wordpieces_mean": float(lengths.mean())},
                "padding": pad}
    busy = cpu_busy_elsewhere()
    rows: dict[str, dict] = {}
    st = sentence_transformers(blocks, args.block_len, args.batch)
    rows["sentence-transformers"] = {"blocks": len(blocks), **_timing(st)}
    table = None
    for b in args.buckets:
        subset = blocks if b > 1 else blocks[:args.sample]
        r = ours(subset, args.block_len, args.batch, b)
        rows[f"ours, buckets {b}"] = _ours_row(r, len(subset), st)
        if b > 1 and table is None:
            table, config = r["table"], r["config"]
    b = args.buckets[-1]
    if args.batch_tokens:
        r = ours(blocks, args.block_len, args.batch, b, args.batch_tokens)
        rows[f"ours, buckets {b}, {args.batch_tokens} tok"] = _ours_row(r, len(blocks), st)
    if args.bf16:
        r = ours(blocks, args.block_len, args.batch, b, args.batch_tokens, "bfloat16")
        rows[f"ours, buckets {b}, bfloat16"] = _ours_row(r, len(blocks), st)
    publish_s = {e: publish(config, table, e) for e in ("exact", "scann")}
    kb_blocks = generated_kb_blocks(args.sample, args.block_len)
    kb_rows = {"ours": _timing(ours(kb_blocks, args.block_len, args.batch, args.buckets[-1])),
               "sentence-transformers": _timing(sentence_transformers(kb_blocks, args.block_len,
                                                                      args.batch))}
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_busy_elsewhere": busy,
            "padding": pad,
            "corpus": {"name": "GCIDE (Debian dict-gcide)", "blocks": len(blocks),
                       "block_len": args.block_len,
                       "wordpieces_mean": float(lengths.mean()),
                       "wordpieces_median": float(np.median(lengths)),
                       "share_at_block_len": float((lengths >= args.block_len).mean())},
            "batch": args.batch, "rows": rows, "publish_s": publish_s,
            "generated_kb": {"blocks": len(kb_blocks), **kb_rows}}


def _ours_row(r: dict, n: int, st: dict) -> dict:
    """A table row of ours over the first `n` blocks, against sentence-transformers' `st`."""
    return {"blocks": n, **_timing(r), "tokenize_s": r["tokenize_s"],
            "vs_sentence_transformers": r["blocks_per_s"] / st["blocks_per_s"],
            "cosine_to_st_median": _cosine(r["table"], st["table"][:n])}


def _timing(r: dict) -> dict:
    return {"embed_s": r["embed_s"], "blocks_per_s": r["blocks_per_s"]}


def table(result: dict) -> str:
    c = result["corpus"]
    lines = [f"CPU: {result['cpu']} ({result['cores']} cores); {c['name']}: {c['blocks']} "
             f"blocks ≤ {c['block_len']} wordpieces (mean {c['wordpieces_mean']:.1f}, "
             f"{c['share_at_block_len']:.0%} at the limit); batch {result['batch']}",
             f"{'':28} {'blocks':>7} {'seconds':>8} {'blocks/s':>9} {'vs ST':>6} {'cos':>6}"]
    for name, r in result["rows"].items():
        lines.append(f"{name:28} {r['blocks']:>7} {r['embed_s']:>8.1f} {r['blocks_per_s']:>9.1f}"
                     f" {r.get('vs_sentence_transformers', 1.0):>5.2f}x"
                     f" {r.get('cosine_to_st_median', 1.0):>6.3f}")
    p = result["publish_s"]
    lines.append(f"publish the index: exact {p['exact']:.1f}s, ScaNN {p['scann']:.1f}s")
    kb = result["generated_kb"]
    lines.append(f"generated KB ({kb['blocks']} blocks): ours {kb['ours']['blocks_per_s']:.1f} "
                 f"blocks/s, sentence-transformers "
                 f"{kb['sentence-transformers']['blocks_per_s']:.1f}")
    return "\n".join([*lines, padding_table(result["padding"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=50_000)
    parser.add_argument("--sample", type=int, default=5_000,
                        help="blocks for the unbucketed run and the generated-KB figure")
    parser.add_argument("--block-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--buckets", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch-tokens", type=int, default=0,
                        help="also run the last bucket count batching by padded tokens "
                             "(refresh.batch_tokens)")
    parser.add_argument("--bf16", action="store_true",
                        help="also run the last bucket count with bfloat16 compute "
                             "(model.bert.dtype): measured, since CPUs differ in bf16 support")
    parser.add_argument("--deb", default="", help="a dict-gcide .deb (else apt-get download)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "realm_bench"))
    parser.add_argument("--out", default="benchmarks/results/refresh_speed.json")
    parser.add_argument("--padding-only", action="store_true",
                        help="only the padding table (no model runs): padded wordpieces and "
                             "FLOPs per bucket count, from the corpus' lengths")
    args = bench_utils.parse_args(parser, argv)
    result = run(args)
    print(padding_table(result["padding"]) if args.padding_only else table(result))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
