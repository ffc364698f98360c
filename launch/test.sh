#!/usr/bin/env bash
# Install realm_jax[test] into .venv and run the whole test suite on 8 emulated CPU devices:
# first the suite proper (-m "not slow"), then the slow end-to-end tests (-m slow: kill -9,
# two-process training, the demo, ...), each group's wall time printed. Both always run (CI
# too); the suite alone is the one to keep fast (README "Tests").
# Extra arguments go to pytest in both groups, e.g. ./launch/test.sh -k parity -x; an
# argument -m (your own marker selection) runs one group with it instead.
# Two pytest workers (REALM_TEST_WORKERS; 0 = one process): XLA compiles on one thread, so a
# second worker uses the second core while the first compiles. Whole files go to one worker
# (--dist loadfile) so module fixtures (a trained tiny run) are made once per group.
set -euo pipefail
source "$(dirname "$0")/env.sh" test
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
workers="${REALM_TEST_WORKERS:-2}"
parallel=()
[ "$workers" = "0" ] || parallel=(-n "$workers" --dist loadfile)

run_group() {  # name, marker expression ("" = none), pytest arguments...
  local name="$1" marker="$2" start rc
  shift 2
  start=$(date +%s)
  set +e
  if [ -n "$marker" ]; then
    python -m pytest -ra --durations=15 ${parallel[@]+"${parallel[@]}"} -m "$marker" "$@"
  else
    python -m pytest -ra --durations=15 ${parallel[@]+"${parallel[@]}"} "$@"
  fi
  rc=$?
  set -e
  [ "$rc" = "5" ] && rc=0  # no test selected in this group (e.g. -k matched only the other)
  echo "[realm_jax] $name: $(( $(date +%s) - start )) s (exit $rc)"
  return "$rc"
}

for arg in "$@"; do
  if [ "$arg" = "-m" ]; then
    run_group "tests" "" "$@"
    exit $?
  fi
done
suite_rc=0
run_group "suite (not slow)" "not slow" "$@" || suite_rc=$?
slow_rc=0
run_group "slow end-to-end tests" "slow" "$@" || slow_rc=$?
[ "$suite_rc" = "0" ] && exit "$slow_rc"
exit "$suite_rc"
