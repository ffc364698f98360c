"""The generated knowledge base: deterministic, answers only in their entity's block."""

import json

import numpy as np
import pytest

from realm_jax import checkpoints
from realm_jax.data import blocks, examples, qa, synthetic
from realm_jax.data.tokenizer import WordPiece

N = 200


@pytest.fixture(scope="module")
def tok():
    return WordPiece(checkpoints.minilm_path() / "vocab.txt")


@pytest.fixture(scope="module")
def kb():
    return synthetic.generate(N, seed=7)


@pytest.fixture(scope="module")
def data(kb, tok):
    return kb.build(tok, 64)


def test_deterministic_from_seed(kb):
    again = synthetic.generate(N, seed=7)
    assert again.documents == kb.documents and again.questions == kb.questions
    assert synthetic.generate(N, seed=8).documents != kb.documents


def test_split_by_entity(kb):
    assert {q.split for q in kb.questions} == set(synthetic.SPLITS)
    for e in range(N):
        assert {q.split for q in kb.questions if q.entity == e} == {kb.splits[e]}
    sizes = {s: sum(x == s for x in kb.splits) for s in synthetic.SPLITS}
    assert sizes == {"train": N - 40, "dev": 20, "test": 20}


def test_every_answer_is_in_its_entity_block_and_no_one_elses(kb, data):
    corpus, gold = data.corpus, data.fact_blocks
    titles = [corpus[i]["title"] for i in range(len(corpus))]
    owner = {}
    for q in kb.questions:
        block = corpus[int(gold[q.fact])]
        assert block["title"] == kb.names[q.entity]  # the gold block is on its entity's page
        assert any(qa.normalize_answer(a) in qa.normalize_answer(block["text"])
                   for a in q.answers)
        for a in q.answers:
            assert owner.setdefault(qa.normalize_answer(a), q.entity) == q.entity
    # ...and the answer text appears in no other block of the corpus (nor in a question).
    texts = [corpus[i]["text"].lower() for i in range(len(corpus))]
    for q in kb.questions[:250]:
        hits = [i for i, t in enumerate(texts) if q.answers[-1].lower() in t]
        assert hits == [int(gold[q.fact])], (q, [titles[h] for h in hits])
    assert (gold >= 0).all()


def test_questions_need_the_corpus(kb):
    # The answer never appears in its own question (no copying), names are fictional.
    for q in kb.questions:
        assert all(a.lower() not in q.question.lower() for a in q.answers)
    assert len(set(kb.names)) == N


def test_pretraining_sentences_mask_the_fact(kb, data):
    sents = data.sentences()
    assert len(sents) == len(kb.pretraining)
    for i in range(0, len(sents), 37):
        s = sents[i]
        (a, b), = s["spans"]
        value = s["text"][a:b]
        block = data.corpus[s["gold_block"]]["text"]
        assert value.lower() in block.lower() and s["text"] not in block
    train = data.sentences(splits=("train",))
    assert 0 < len(train) < len(sents)


def test_pretraining_sentences_of_chosen_facts(kb, data):
    """data.synthetic.pretrain_attributes: only the named facts' sentences, each masking that
    fact's value; a name that is no fact is refused, not silently empty."""
    chosen = ("birthplace", "spouse")
    sents = data.sentences(attributes=chosen)
    chosen_values = {kb.attributes[e][k].lower() for e in range(N) for k in chosen}
    assert len(sents) == N * len(chosen)  # one sentence per fact and entity
    for i in range(len(sents)):
        (a, b), = sents[i]["spans"]
        assert sents[i]["text"][a:b].lower() in chosen_values
    assert len(data.sentences(attributes=synthetic.PRETRAIN_ATTRIBUTES)) == len(kb.pretraining)
    with pytest.raises(ValueError, match="occupaton"):
        data.sentences(attributes=("occupaton",))


def test_the_config_chooses_the_pretraining_facts():
    """REALM's training sentences and its held-out ones both follow the config's choice."""
    from realm_jax import defaults
    from realm_jax.data import loaders

    config = defaults.tiny_config()
    everything = len(loaders.load_pretrain_sentences(config))
    config.data.synthetic.pretrain_attributes = ("work",)
    assert len(loaders.load_pretrain_sentences(config)) == everything // 7
    held_out = loaders.synthetic_sentences(config, (config.eval.split,))
    assert len(held_out) == sum(kb_split == config.eval.split for kb_split in
                                loaders.load_synthetic(config).kb.splits)


def test_jsonl_round_trip_through_tfds_builders(kb, data, tok, tmp_path):
    paths = kb.write_jsonl(tmp_path / "kb", tok, 64)
    vocab = checkpoints.minilm_path() / "vocab.txt"
    corpus, stats = blocks.build_corpus(tmp_path / "tfds", source="jsonl",
                                        path=str(paths["documents"]), vocab_file=vocab,
                                        max_block_wordpieces=64, name="kb")
    assert corpus.fingerprint == data.corpus.fingerprint  # same blocks, same order
    np.testing.assert_array_equal(kb.attach(corpus).fact_blocks, data.fact_blocks)
    dev = qa.build_qa(tmp_path / "tfds", name="kb", fmt="synthetic",
                      splits={"dev": paths["qa_dev"]})["dev"]
    want = data.qa("dev")
    assert len(dev) == len(want) and all(dev[i] == want[i] for i in range(len(dev)))
    sents = examples.build_sentences(tmp_path / "tfds", source="jsonl",
                                     path=str(paths["pretrain"]), name="kb")
    mem = data.sentences()
    for i in (0, 5, len(mem) - 1):
        assert sents[i]["text"] == mem[i]["text"]
        assert sents[i]["gold_block"] == mem[i]["gold_block"]
        np.testing.assert_array_equal(sents[i]["spans"], mem[i]["spans"])
    first = json.loads(paths["qa_test"].read_text().splitlines()[0])
    assert set(first) == {"question", "answer", "gold_block", "entity"}


def test_entities_for_blocks(tok):
    assert synthetic.entities_for_blocks(1000, 288) == 1000
    n = synthetic.entities_for_blocks(3000, 64, tok)
    got = len(synthetic.generate(n, seed=1).chunk(tok, 64))
    assert abs(got - 3000) < 150
