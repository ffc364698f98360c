#!/usr/bin/env bash
# Install realm_jax into .venv and run the embedded default end to end (configs/demo_cpu.py):
# warm-start the retriever (ICT) and the encoder (reading MLM) from MiniLM, pre-train REALM on
# the generated knowledge base with the index refresher as a subprocess, fine-tune ORQA from it
# and from MiniLM alone, evaluate on held-out people, answer a question with evidence.
# About 7 minutes on 2 cores with AVX-512, ~16 without (README "REALM that learns"; --full:
# the longer stages, ~14 and ~30).
# Extra arguments go to `python -m realm_jax.demo` (--workdir DIR, --ablation, --question "...").
set -euo pipefail
source "$(dirname "$0")/env.sh" ""  # no extras (not this script's arguments)
# One CPU device using every core: emulating 8 devices only adds overhead on a laptop.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python -m realm_jax.demo "$@"
