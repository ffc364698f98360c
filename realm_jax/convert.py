"""Convert a Hugging Face REALM / BERT or sentence-transformers checkpoint to realm_jax's
orbax format, once. This is the only place a PyTorch `.bin` (a pickle) is ever read.

    python -m realm_jax.convert --from hf_realm --src path/to/realm-orqa-nq-openqa --out DIR
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging
from etils import epath

from realm_jax import checkpoints

SOURCES = ("hf_realm", "hf_bert", "minilm")


def convert(kind: str, src: epath.PathLike, out: epath.PathLike) -> epath.Path:
    """Read `src` (safetensors, or pytorch_model.bin through torch) and write `out`."""
    if kind not in SOURCES:
        raise ValueError(f"--from {kind!r}; accepted: {SOURCES}")
    src, out = epath.Path(src), epath.Path(out)
    found = checkpoints.detect_format(src)
    if found != kind:
        raise ValueError(f"{src} looks like {found!r}, not {kind!r}")
    cfg, tensors = checkpoints.read_hf(src, kind, allow_torch_bin=True)
    params = checkpoints.params_from_hf(tensors, cfg, kind, where=str(src))
    checkpoints.save_converted(out, cfg, params, source=f"{kind}:{src}")
    logging.info("wrote %s (towers: %s)", out, sorted(params))
    return out


_FROM = flags.DEFINE_enum("from", None, list(SOURCES), "Source checkpoint kind.")
_SRC = flags.DEFINE_string("src", None, "Source directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (orbax + realm_jax.json).")


def main(argv: Sequence[str]) -> None:
    del argv
    out = convert(_FROM.value, _SRC.value, _OUT.value)
    print(f"converted {_SRC.value} → {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["from", "src", "out"])
    app.run(main)
