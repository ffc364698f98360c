"""The embedded default (`./launch/demo.sh`): REALM on the generated knowledge base, from
MiniLM, on a 2-core CPU.

    ./launch/demo.sh                 # = python -m realm_jax.demo --workdir runs/demo
    python -m realm_jax.train --config configs/demo_cpu.py:ict --workdir runs/demo/ict
    python -m realm_jax.train --config configs/demo_cpu.py:mlm --workdir runs/demo/mlm
    python -m realm_jax.train --config configs/demo_cpu.py --workdir runs/demo/realm_refresh \\
        --config.init.path=runs/demo/mlm --config.init.embedder_path=runs/demo/ict
    python -m realm_jax.train --config configs/demo_cpu.py:orqa --workdir runs/demo/orqa_refresh \\
        --config.init.path=minilm --config.init.embedder_path=runs/demo/realm_refresh

Args: `[quick,|reading,|small,|scratch,]STAGE` — the stages of `realm_jax.stages`, from
MiniLM (default; with "quick," the shorter stages `./launch/demo.sh` runs, `_quick_steps`; with
"reading," the paper's recipe with which REALM teaches the retriever, `_reading_steps`; with
"small," the same recipe from MiniLM's first 2 layers, `_small`) or, with "scratch,", from a
2-layer, 128-wide BERT with random init (the paper's setting in miniature):
  ""          REALM pre-training, the refresher re-embedding the corpus as a subprocess;
  "norefresh" the paper's ablation: the same pre-training with the index never refreshed;
  "ict"       the retriever's warm start (Inverse Cloze Task);
  "mlm"       the encoder's warm start: masked LM on a corpus sentence joined with its own block
              (`mlm.source="reading"`), so the knowledge-augmented encoder gets an MLM head
              (MiniLM ships none) and learns to read a joined block;
  "orqa"      fine-tuning on the train people's questions (init.path: a REALM workdir, or the
              warm starts' for ORQA without REALM pre-training).

Why these choices (README "REALM that learns" has the measurements, one seed):
  * blocks of 48 wordpieces (two sentences on average): with 32 (mostly one sentence) ICT
    could only match a sentence to its page's title, and lowered fresh recall@5 from 0.693 to
    0.603 in 50 steps; with 48 it raises it from 0.770 to 0.953 in 100;
  * the retriever is frozen for the first `train.freeze_steps` steps: until the encoder reads
    the retrieved blocks, p(y|z,x) hardly depends on z and the retriever's gradient is noise
    that Adam turns into full-size steps (Guu et al. §3.4's cold start; Atlas freezes too);
  * `realm.retriever_loss="marginal"`, REALM's own: measured over 3 seeds (README "three
    seeds"), with an encoder that does not yet read it keeps fresh recall@5 at 0.940
    [0.920, 0.980] after REALM where pdist (the encoder's per-block likelihood as a
    distillation target) falls to 0.827 [0.820, 0.960], and ORQA EM ranges 0.420–0.447 vs
    0.360–0.440: its gradient (posterior − prior) vanishes when the blocks' likelihoods are
    equal, while pdist fits the retriever to that flat teacher. From scratch the same
    (recall@5 0.85 vs 0.03 after 600 steps). pdist stays a switch for an encoder that reads;
  * MiniLM's mean pooling without a projection keeps its pretrained retrieval at step 0, and
    p(z|x) over MiniLM's unnormalised mean-pooled vectors is not one-hot (p_top ≈ 0.5), so
    no score scaling is needed here (`realm.score_scale` is there for 128-d LayerNorm'd ones:
    the scratch start uses it);
  * the reading warm start is short (50 steps at lr 3e-4) and does not make the encoder read:
    at REALM's start the gold block gains it ~0 nats/token and the pdist teacher ranks it
    first at about chance. 300 steps at lr 1e-3 do (1.28 nats/token, 0.77), but cost ~9.5
    minutes and, measured, did not make REALM's retriever better (README "an encoder that
    reads");
  * ORQA's reader is MiniLM's own encoder, the retriever the pre-trained one
    (`stages.Pipeline.reader="start"`, Table 2's "REALM retriever + baseline encoder"): the
    reading warm start cost the reader ~0.1 EM (0.427 vs 0.523 on 600 people, 60 ORQA steps);
  * 300 people (1,456 blocks, 150 dev questions), stages of 50 / 60 / 30 / 40 steps and a reader
    beam of 2: the budget below. A person has ~5 blocks, so recall@5 only says the retriever
    found the person; recall@1 (also logged) whether it found the block with the fact, and
    with a beam of 2 that is what the reader's answers depend on.

Budget of the default (longer) stages (MiniLM-L6: ~21 MFLOP per token forward, ~64 with the
backward): mlm 50 × 32 × 72
tokens ≈ 9 TFLOP; ict 60 × 16 × 72 ≈ 4; REALM 30 steps × 16 × (24 + 4 × 48 + 4 × 72) tokens
≈ 16, plus 2 refreshes and 3 evaluations of 1,456 × 48 tokens ≈ 7; two ORQA runs of
40 × 16 × (24 + 2 × 80) ≈ 15, each with its frozen index ≈ 3: about 55 TFLOP, ~12 minutes at
the ~75 GFLOP/s these 2 cores reach (README "REALM that learns" has the measured time): over
the 15-minute budget on a machine 2.3× slower.
"""

from realm_jax import defaults

STAGES = ("", "pretrain", "norefresh", "mlm", "ict", "orqa")
STARTS = ("minilm", "quick", "reading", "small", "scratch")
# Every arg, for tests/test_configs.py: the stages of each start ("scratch," is its REALM).
ARGS = ("", "norefresh", "mlm", "ict", "orqa", "scratch,", "scratch,norefresh", "scratch,mlm",
        "scratch,ict", "scratch,orqa", "quick,", "quick,norefresh", "quick,mlm", "quick,ict",
        "quick,orqa", "reading,", "reading,norefresh", "reading,mlm", "reading,ict",
        "reading,orqa", "small,", "small,norefresh", "small,mlm", "small,ict", "small,orqa")


def get_config(arg: str | None = None):
    start, _, stage = (arg or "").rpartition(",")
    start = start or "minilm"
    if stage not in STAGES or start not in STARTS:
        raise ValueError(f"configs/demo_cpu.py: unknown arg {arg!r}; accepted: "
                         f"[quick,|reading,|small,|scratch,]STAGE with STAGE in '' (pretrain), "
                         f"norefresh, mlm, ict, orqa")
    c = defaults.base_config()
    c.mesh = dict(data=-1, fsdp=1, model=1)
    c.data.corpus = "synthetic"
    c.data.synthetic.update(num_entities=300, seed=0, pretrain_splits=("train",))
    # max_masks 10: a fact's value is a made-up name of up to ~10 wordpieces; with 6, 17 % of
    # the pre-training sentences had no salient span that fit and masked a random span instead
    # (words like "into the", which no block helps to predict: noise for the retriever).
    c.data.update(query_len=24, block_len=48, reader_len=80, max_masks=10)
    if start in ("minilm", "quick", "reading", "small"):
        c.model.bert = dict(preset="minilm_l6_h384")
        c.model.update(pooling="mean", proj_size=0, normalize=False, span_hidden_size=128,
                       max_span_width=8)
        # The encoder comes from the mlm stage (init.path, set by the demo), the retriever
        # from MiniLM itself.
        c.init.update(path="minilm", embedder_path="minilm")
    else:
        _scratch(c)

    c.retrieval.update(k=4, extra=1, engine="exact")
    c.refresh.update(mode="subprocess", keep=3, batch_size=256, poll_interval_s=2.0,
                     wait_timeout_s=600.0)
    c.realm.update(retriever_loss="marginal")
    # checkpoint_every: the refresher re-embeds from each checkpoint (2 refreshes in 30 steps).
    c.train.update(batch_size=16, steps=30, lr=1e-4, warmup_steps=10, checkpoint_every=10,
                   keep_checkpoints=5, log_every=5, freeze_steps={"embedder": 10},
                   lr_scale={"embedder": 0.3})
    c.eval.update(every_steps=15, split="dev", recall_k=5, batch_size=64, at_start=True,
                  fresh_index=True, heldout_sentences=64)
    # The reader reads 2 blocks: cheap, and retrieval decides what it can answer.
    c.orqa.update(searcher_beam_size=20, reader_beam_size=2)

    if stage == "norefresh":
        # Ablation: the index built from the initial embedder stays in use for the whole run.
        c.refresh.update(mode="sync", every_steps=0)
    elif stage == "mlm":
        c.task = "mlm"
        c.init.embedder_path = ""
        # Half of each sentence masked (every masked wordpiece is in the joined body): BERT's
        # 15 % gives ~2 per sentence, too few for the encoder to start reading in 100 steps.
        c.mlm.update(source="reading", masking="random_token", mask_rate=0.5,
                     max_len=c.data.query_len + c.data.block_len, max_masks=12,
                     eval_examples=128)
        c.train.update(batch_size=32, steps=50, lr=3e-4, warmup_steps=10, checkpoint_every=50)
        c.eval.update(every_steps=0, at_start=False, fresh_index=False)
    elif stage == "orqa":
        c.task = "orqa"
        c.init.path = ""  # a REALM workdir, or the mlm one (ORQA without pre-training)
        c.train.update(batch_size=16, steps=40, lr=5e-5, warmup_steps=4, checkpoint_every=40)
        c.eval.update(every_steps=0, at_start=False, fresh_index=False)  # dev EM at the end
    elif stage == "ict":
        c.task = "ict"
        c.init.path = c.init.embedder_path
        if start in ("minilm", "quick"):  # "reading" and "small" keep ORQA's 0.9 (_reading_steps)
            # The sentence stays in its block: a person's ~5 blocks share the name, so with it
            # removed (ORQA's 0.9) ICT only learns to find the person (recall@1 0.267 → 0.167
            # in 60 steps); kept, it also learns which block says what (→ 0.393).
            c.ict.mask_rate = 0.0
        c.train.update(batch_size=16, steps=60, lr=5e-5, warmup_steps=10, checkpoint_every=60)
        c.eval.update(every_steps=0, at_start=True, fresh_index=False)
    if c.task != "realm_mlm":
        c.train.freeze_steps = {}  # the retriever-freeze belongs to REALM pre-training
        c.train.lr_scale = {}
    if start == "scratch":
        _scratch_steps(c, stage)
    elif start == "quick":
        _quick_steps(c, stage)
    elif start in ("reading", "small"):
        _reading_steps(c, stage)
        if start == "small":
            _small(c, stage)
    return c


def _reading_steps(c, stage: str) -> None:
    """The paper's recipe from MiniLM, with an encoder that reads before REALM starts:
    the reading warm start long enough that the gold block helps the encoder (300 steps at
    lr 1e-3: +1.3 nats/token, the teacher right 0.88 of the time), ICT as ORQA's (the
    sentence removed from its block, 0.9: it finds the person, not the block: recall@5 0.99,
    @1 0.17), and REALM's retriever trained from step 0 by distillation (pdist) at 3× the
    base rate, with the other rows' blocks as negatives (`realm.inbatch_negatives`).

    Why the negatives, measured on seed 0 (README "REALM that learns"): with the same teacher
    and rate but only its own 3 candidates (all blocks of one person), fresh recall@5 of the
    questions fell 0.99 → 0.25 in 20 steps; at 0.3× the rate and frozen for 10 it held, but
    recall@1 moved only 0.17 → 0.19 in 30. With the negatives: 0.17 → 0.27 in 20 steps,
    recall@5 0.99 kept. Three seeds, each with its own warm start
    (`benchmarks/realm_learning.py --starts reading`): after 60 REALM steps recall@1 0.500
    [0.307, 0.553] vs ICT's 0.167 (0.447 never refreshed), ORQA EM 0.567 [0.267, 0.580] vs
    ICT alone's 0.267 and MiniLM's 0.407 (0.500 never refreshed).

    Why 120 REALM steps, not 60: every seed was still learning at 60, and run to 120 each
    ends far higher (README "120 REALM steps"): recall@1 0.847 / 0.753 / 0.700 for seeds
    0 / 1 / 2 (0.500 / 0.553 / 0.307 at 60), ORQA EM 0.627 / 0.620 / 0.647 (0.567 / 0.580 /
    0.267), and the never-refreshed index falls further behind (recall@1 0.533 / 0.673 /
    0.620). An arm of 120 steps took 11–13 minutes here, 6–7 more than 60. Not a head start
    that longer fine-tuning buys back: with ORQA run 80 steps EM is 0.713 [0.667, 0.713] vs
    MiniLM's 0.520 and ICT alone's 0.413, and at 160 (seed 0) every arm has levelled off,
    REALM 0.15 ahead (README "ORQA fine-tuned twice as long")."""
    if stage == "mlm":
        c.train.update(lr=1e-3, steps=300, warmup_steps=20, checkpoint_every=300)
    elif stage in ("", "pretrain", "norefresh"):
        c.realm.update(retriever_loss="pdist", inbatch_negatives=True)
        c.train.update(steps=120, lr_scale={"embedder": 3.0}, freeze_steps={"embedder": 0})
        c.eval.every_steps = 20


def _quick_steps(c, stage: str) -> None:
    """The demo's budget (`./launch/demo.sh`: 15 minutes on 2 cores without AVX-512, ~6.5 on
    AVX-512): MiniLM's stages cut to what the budget holds. What learning they show is in
    README "REALM that learns"; `benchmarks/realm_learning.py --starts minilm` measures the
    longer stages above over seeds.

    Measured with mlm 20 × 16, ICT 30, REALM 20 × 16 and ORQA 25: 9.7 minutes here (REALM
    255 s of it: a step of 16 sentences is ~0.5 TFLOP through MiniLM, ~7 s), ~22 on AVX2;
    hence REALM's batch of 8 and the shorter warm starts and ORQA below: 7.0 minutes here
    (REALM 157 s), ~16 estimated on AVX2."""
    if stage == "mlm":
        c.train.update(batch_size=8, steps=20, warmup_steps=4, checkpoint_every=20)
    elif stage == "ict":
        c.train.update(steps=20, warmup_steps=4, checkpoint_every=20)
    elif stage == "orqa":
        c.train.update(steps=20, warmup_steps=3, checkpoint_every=20)
    else:  # REALM: frozen 6 steps, index refreshed at step 10, evaluated at 0 and 20
        c.train.update(batch_size=8, steps=20, warmup_steps=6, checkpoint_every=10,
                       freeze_steps={"embedder": 6})
        c.eval.update(every_steps=20, heldout_sentences=32)


def _small(c, stage: str) -> None:
    """A small BERT that brings reading from pre-training, as the paper's BERT does: MiniLM's
    first 2 of 6 layers (384 wide; the checkpoint's other layers are not loaded), every tower
    (encoder, retriever, ORQA's reader) from them, then the `reading` recipe. The 2-layer,
    128-wide BERT from random init ("scratch,") never learned to read on a CPU budget (README
    "the paper's setting in miniature"); this start asks whether REALM teaches the retriever
    when the encoder can learn to read and the ICT retriever is weaker than MiniLM-L6's.

    Measured (README "a small BERT that reads", seeds 0 and 1): the encoder reads and REALM
    raises held-out utility (0.2–1.0 → 1.5–1.7 nats/token) and fresh recall@5 (0.91 → 0.98),
    but recall@1 of the questions falls (0.29–0.30 → 0.16–0.18) and ORQA EM does not rise.
    Why (seed 0, `benchmarks/retrieval_by_fact.py`): REALM teaches the retriever its own
    queries (held-out sentences' recall@1 0.21 → 0.57), but 92 % of the questions then go to
    their person's first block, the gold block of the birth-year and occupation sentences;
    without those sentences (`data.synthetic.pretrain_attributes`) they do not, and REALM
    raises question recall@1 0.29 → 0.51 (never refreshed 0.40) and ORQA EM to 0.407 (ICT
    alone 0.320; one seed). The default keeps all seven facts, because the paper masks dates
    too and one seed is not enough to change it."""
    c.model.bert.num_layers = 2
    if stage == "mlm":
        # 2 layers learn to read later than 6 (README "a small BERT"): at 300 steps the gold
        # block gains the encoder -0.01 nats/token at REALM's start; 600 of 1,200: 1.25;
        # 1,200: 1.70 (MiniLM-L6 after 300: 1.3).
        c.train.update(steps=1200, checkpoint_every=1200)


def _scratch(c) -> None:
    """The paper's setting in miniature: a 2-layer, 128-wide BERT, every tower from random
    init: the encoder MLM-trained on the corpus, the retriever ICT-trained (blocks of 64
    wordpieces hold ~3 sentences, so ICT has a sentence to take out).

    The retriever head is mean pooling → Dense(128) → LayerNorm, not the released [CLS]
    pooler: from random init the [CLS] pooler's ICT stayed at chance (in-batch accuracy 1/64,
    loss log 64, fresh recall@5 0.00 after 400 steps, with or without score scaling), while
    mean pooling reaches recall@5 0.98 in 100 steps with realm.score_scale=inv_sqrt_d (0.08
    without: raw LayerNorm'd scores of ±tens of nats). Seed 0, 150 dev questions."""
    c.model.bert = dict(preset="tiny", vocab_size=30522, hidden_size=128, num_layers=2,
                        num_heads=2, intermediate_size=512, max_position_embeddings=128)
    c.model.update(pooling="mean", proj_size=128, span_hidden_size=64, max_span_width=8)
    c.init.update(path="", embedder_path="")
    c.data.update(block_len=64, reader_len=96)
    c.realm.score_scale = "inv_sqrt_d"  # LayerNorm'd 128-d vectors: raw scores of ~±128 (ICT too)


def _scratch_steps(c, stage: str) -> None:
    """A small model is cheap per step but learns from nothing: more, larger steps."""
    if stage == "ict":
        c.train.update(batch_size=64, steps=400, lr=1e-3, warmup_steps=40, checkpoint_every=400)
        c.eval.every_steps = 100
    elif stage == "mlm":
        c.mlm.update(max_len=c.data.query_len + c.data.block_len)
        c.train.update(batch_size=64, steps=1500, lr=1e-3, warmup_steps=100,
                       checkpoint_every=1500)
    elif stage == "orqa":
        c.train.update(batch_size=32, steps=300, lr=3e-4, warmup_steps=30, checkpoint_every=300)
    else:
        c.train.update(batch_size=32, steps=600, lr=1e-3, warmup_steps=30, checkpoint_every=50,
                       freeze_steps={"embedder": 200})
        c.refresh.update(mode="sync", every_steps=50)
        c.eval.update(every_steps=100)
        if stage == "norefresh":
            c.refresh.every_steps = 0
