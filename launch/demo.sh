#!/usr/bin/env bash
# Install realm_jax into .venv and run the embedded default end to end.
# (Today: MiniLM embedder → embed blocks and questions → rank by relevance score.)
set -euo pipefail
source "$(dirname "$0")/env.sh"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
python -m realm_jax.demo "$@"
