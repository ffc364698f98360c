#!/usr/bin/env bash
# Install realm_jax[test] into .venv and run the whole suite on 8 emulated CPU devices.
# Extra arguments go to pytest, e.g. ./launch/test.sh -k parity -x
# Two pytest workers (REALM_TEST_WORKERS; 0 = one process): XLA compiles on one thread, so a
# second worker uses the second core while the first compiles. Whole files go to one worker
# (--dist loadfile) so module fixtures (a trained tiny run) are made once.
set -euo pipefail
source "$(dirname "$0")/env.sh" test
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
set +e
workers="${REALM_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  python -m pytest -ra --durations=15 "$@"
else
  python -m pytest -ra --durations=15 -n "$workers" --dist loadfile "$@"
fi
rc=$?
set -e
exit $rc
