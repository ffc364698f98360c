"""Build Hugging Face REALM reference models (transformers 4.46.3, torch) for parity tests and
side-by-side benchmarks. Test/benchmark only: torch is imported here and nowhere else at runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def realm_config(**overrides: Any):
    """A small `transformers.RealmConfig` (override any field)."""
    from transformers import RealmConfig

    kw = dict(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, retriever_proj_size=16,
        num_candidates=4, span_hidden_size=24, max_span_width=4, reader_beam_size=3,
        searcher_beam_size=6, reader_seq_len=24, num_block_records=10,
    )
    kw.update(overrides)
    return RealmConfig(**kw)


def build(cls_name: str, config, seed: int = 0, noise: float = 0.05):
    """A randomly initialised HF REALM model in eval mode.

    Every parameter (biases and LayerNorm included, which HF initialises to constants) gets
    Gaussian noise, so a parity test also checks that those tensors are mapped.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()


def random_inputs(
    rng: np.random.Generator, n: int, length: int, vocab: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ids, attention masks with trailing padding (length ≥ half) and segment ids
    (1 after a random split): int64 [n, length] each, ready for torch and for us."""
    ids = rng.integers(3, vocab, size=(n, length)).astype(np.int64)
    lengths = rng.integers(length // 2, length + 1, size=n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    split = rng.integers(2, length // 2, size=n)
    types = ((np.arange(length)[None] >= split[:, None]) & (mask == 1)).astype(np.int64)
    return ids * mask, mask, types


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def torch_tensor(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def save(model, directory, fmt: str = "safetensors") -> None:
    """Save like `save_pretrained`, as `model.safetensors` or `pytorch_model.bin`.

    transformers 4.46's REALM refuses safetensors because of its tied decoder bias; the tensors
    that share storage are written once, under the name that is not the tied `decoder` alias
    (what `save_pretrained` does for models whose ties it knows).
    """
    import os

    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    if fmt == "bin":
        model.save_pretrained(directory, safe_serialization=False)
        return
    state = model.state_dict()
    by_storage: dict[Any, list[str]] = {}
    for name, tensor in state.items():
        by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    keep = {}
    for names in by_storage.values():
        name = sorted(names, key=lambda n: ("decoder" in n, n))[0]
        keep[name] = state[name].detach().clone().contiguous()
    save_file(keep, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def save_openqa(model, block_texts, vocab_file, directory, block_emb: np.ndarray):
    """An HF open-QA directory as the released ones hold it: `RealmForOpenQA` weights with
    `block_emb`, its config, the tokenizer files and the retriever's `block_records.npy` (a
    pickled object array of UTF-8 byte strings). Attaches the retriever to `model` and returns
    (retriever, tokenizer)."""
    import torch
    from transformers import RealmRetriever, RealmTokenizerFast

    tokenizer = RealmTokenizerFast(vocab_file=str(vocab_file))
    records = np.array([t.encode("utf-8") for t in block_texts], dtype=object)
    with torch.no_grad():
        model.block_emb.copy_(torch.from_numpy(np.asarray(block_emb, np.float32)))
    model.retriever = RealmRetriever(records, tokenizer)
    save(model, directory)
    model.retriever.save_pretrained(str(directory))
    return model.retriever, tokenizer
