"""Where each ORQA arm of the pipeline takes its towers from (`stages.Pipeline.reader`)."""

import pytest

from realm_jax import stages


def origins(tmp_path, monkeypatch, reader: str) -> dict[str, dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}

    def record(self, name, config):
        seen[name] = dict(config.init)
        return self.dir(name)

    monkeypatch.setattr(stages.Pipeline, "_run", record)
    pipeline = stages.Pipeline("demo_cpu", tmp_path, train_retriever=True, reader=reader)
    init = pipeline.warm_starts()
    for arm in stages.ARMS:
        pipeline.orqa(arm, init)
    return {arm: seen[f"orqa_{arm}"] for arm in stages.ARMS}


def test_paper_reader_comes_from_the_pretrained_encoder(tmp_path, monkeypatch):
    got = origins(tmp_path, monkeypatch, "realm")
    d = str(tmp_path.resolve())
    assert got["start"] == {"path": "minilm", "embedder_path": "minilm"}
    assert got["none"] == {"path": f"{d}/mlm", "embedder_path": f"{d}/ict"}
    for arm in ("refresh", "norefresh"):
        assert got[arm] == {"path": f"{d}/realm_{arm}", "embedder_path": ""}


def test_start_reader_keeps_the_starts_encoder_and_the_pretrained_retriever(tmp_path,
                                                                           monkeypatch):
    got = origins(tmp_path, monkeypatch, "start")
    d = str(tmp_path.resolve())
    assert got["start"] == {"path": "minilm", "embedder_path": "minilm"}
    assert got["none"] == {"path": "minilm", "embedder_path": f"{d}/ict"}
    for arm in ("refresh", "norefresh"):
        assert got[arm] == {"path": "minilm", "embedder_path": f"{d}/realm_{arm}"}


def test_unknown_reader_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="reader"):
        origins(tmp_path, monkeypatch, "encoder")
