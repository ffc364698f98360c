#!/usr/bin/env bash
# Install realm_jax[test] into .venv and run the whole suite on 8 emulated CPU devices.
# Extra arguments go to pytest, e.g. ./launch/test.sh -k parity -x
set -euo pipefail
source "$(dirname "$0")/env.sh" test
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
set +e
python -m pytest -ra --durations=15 "$@"
rc=$?
set -e
exit $rc
