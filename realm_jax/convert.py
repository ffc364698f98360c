"""Convert a Hugging Face REALM / BERT or sentence-transformers checkpoint to realm_jax's
orbax format, once. This is the only place a PyTorch `.bin` (a pickle) is ever read.

    python -m realm_jax.convert --from hf_realm --src path/to/realm-orqa-nq-openqa --out DIR \
        [--allow_pickle] [--overwrite]

DIR must be new or empty: a non-empty DIR (a training workdir, an earlier conversion) is refused
unless --overwrite is given, since the converted files would replace what is there.

A Hugging Face open-QA model (`RealmForOpenQA` weights with their `block_emb`, plus the
retriever's `block_records.npy` and `vocab.txt`) becomes, with `--allow_pickle` (the block
records are a pickled object array: only for files you trust), a directory that
`realm_jax.inference.Realm.load(DIR)` answers questions from:

  DIR/realm_jax.json, DIR/params/   the towers embedder + reader (as for every conversion)
  DIR/config.json                   a resolved config (task orqa, lengths and beams from HF's
                                    config; data.corpus / data.vocab relative to DIR)
  DIR/vocab.txt                     the tokenizer's vocabulary
  DIR/corpus/                       the block records as a `realm_blocks` dataset (row i = block i)
  DIR/index/                        `block_emb` published as index version 0
  DIR/tokenized/                    the blocks' wordpieces, cut once (memory-mapped at load)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath

from realm_jax import checkpoints, cli, defaults
from realm_jax.models.config import RealmModelConfig

SOURCES = ("hf_realm", "hf_bert", "minilm")
BLOCK_RECORDS = "block_records.npy"
# Hugging Face embeds the whole question; ORQA's question budget is 64 wordpieces.
OPENQA_QUERY_LEN = 64


def convert(
    kind: str, src: epath.PathLike, out: epath.PathLike, allow_pickle: bool = False,
    overwrite: bool = False,
) -> epath.Path:
    """Read `src` (safetensors, or pytorch_model.bin through torch) and write `out`; an HF
    open-QA source with its block records also gets a corpus and index (module docstring).

    Raises:
      FileExistsError: `out` is a file, or a non-empty directory and `overwrite` is False.
    """
    if kind not in SOURCES:
        raise ValueError(f"--from {kind!r}; accepted: {SOURCES}")
    src, out = epath.Path(src), epath.Path(out)
    check_out(out, overwrite)
    found = checkpoints.detect_format(src)
    if found != kind:
        raise ValueError(f"{src} looks like {found!r}, not {kind!r}")
    cfg, tensors = checkpoints.read_hf(src, kind, allow_torch_bin=True)
    params = checkpoints.params_from_hf(tensors, cfg, kind, where=str(src))
    checkpoints.save_converted(out, cfg, params, source=f"{kind}:{src}")
    logging.info("wrote %s (towers: %s)", out, sorted(params))
    if kind == "hf_realm" and "block_emb" in tensors:
        write_openqa(src, out, cfg, tensors["block_emb"], allow_pickle)
    return out


def check_out(out: epath.Path, overwrite: bool) -> None:
    """Refuse an `out` that is a file, or a non-empty directory without `overwrite`: writing
    there would break what it holds (a training workdir no longer loads)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty: choose a new directory, or pass "
                              "--overwrite to write the converted files into it")


def openqa_config(cfg: RealmModelConfig, hf: dict) -> ml_collections.ConfigDict:
    """The resolved config of a converted open-QA model (lengths and beams from HF's)."""
    c = defaults.base_config()
    c.task = "orqa"
    c.model = ml_collections.ConfigDict(cfg.to_dict())
    reader_len = int(hf.get("reader_seq_len", 320))
    c.data.update(corpus="corpus", vocab="vocab.txt", reader_len=reader_len,
                  query_len=min(OPENQA_QUERY_LEN, reader_len // 2))
    c.orqa.update(reader_beam_size=int(hf.get("reader_beam_size", c.orqa.reader_beam_size)),
                  searcher_beam_size=int(hf.get("searcher_beam_size",
                                                c.orqa.searcher_beam_size)))
    c.retrieval.engine = "exact"
    return c


def write_openqa(src: epath.Path, out: epath.Path, cfg: RealmModelConfig, block_emb: np.ndarray,
                 allow_pickle: bool) -> bool:
    """Corpus, index, vocabulary and config of an HF open-QA model into `out`; False (with a
    warning saying what to do) when its block records are missing or not allowed."""
    from realm_jax.data.blocks import build_corpus
    from realm_jax.data.joins import tokenize_corpus
    from realm_jax.data.tokenizer import WordPiece
    from realm_jax.retrieval.refresher import publish_index

    records = src / BLOCK_RECORDS
    if not records.exists():
        logging.warning("%s has block_emb but no %s: converted the weights only; Realm.load "
                        "needs the retriever's block records next to the weights", src,
                        BLOCK_RECORDS)
        return False
    if not allow_pickle:
        logging.warning("%s is a pickle: converted the weights only. To answer questions, "
                        "re-run with --allow_pickle --overwrite (only for a file you trust)",
                        records)
        return False
    if not (src / "vocab.txt").exists():
        raise FileNotFoundError(f"{src / 'vocab.txt'} is missing: the open-QA directory needs "
                                "its tokenizer's vocabulary")
    for stale in ("corpus", "index", "tokenized"):  # a re-run replaces what it wrote before
        if (out / stale).exists():
            shutil.rmtree(out / stale)
    shutil.copyfile(src / "vocab.txt", out / "vocab.txt")
    corpus, _ = build_corpus(out / "corpus", source="hf_block_records", path=str(records),
                             allow_pickle=True, name="hf_block_records")
    if len(corpus) != block_emb.shape[0]:
        raise ValueError(f"{records} holds {len(corpus)} blocks but block_emb has "
                         f"{block_emb.shape[0]} rows: not the same retriever")
    config = openqa_config(cfg, json.loads((src / "config.json").read_text()))
    defaults.save_resolved(config, out)
    publish_index(config, out, 0, np.asarray(block_emb, np.float32), corpus.fingerprint)
    tokenize_corpus(corpus, WordPiece(out / "vocab.txt"), cache_dir=out / "tokenized")
    logging.info("wrote %s: %d blocks, index v0, config.json", out, len(corpus))
    return True


_FROM = flags.DEFINE_enum("from", None, list(SOURCES), "Source checkpoint kind.")
_SRC = flags.DEFINE_string("src", None, "Source directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (orbax + realm_jax.json).")
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, f"Read an open-QA model's {BLOCK_RECORDS} (a pickle: trusted files "
    "only) so the output can answer questions.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Write into a non-empty --out (its converted files are replaced).")


def main(argv: Sequence[str]) -> None:
    del argv
    out = convert(_FROM.value, _SRC.value, _OUT.value, _ALLOW_PICKLE.value, _OVERWRITE.value)
    print(f"converted {_SRC.value} → {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["from", "src", "out"])
    cli.run(main)
