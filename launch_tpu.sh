#!/usr/bin/env bash
# Train on a Cloud TPU slice: create it, install lmstack on every worker, run
# `python -m lmstack.main` on all workers at once, tail the log, stop, delete.
#
#   ./launch_tpu.sh all --name=lm7b --zone=us-east5-a --accelerator_type=v5p-64 \
#       --config=configs/pretrain.py:size=7b --workdir=gs://my-bucket/runs/7b -- --config.train.steps=20000
#   ./launch_tpu.sh logs --name=lm7b --zone=us-east5-a            # worker 0's log; --worker=all for every one
#   ./launch_tpu.sh stop --name=lm7b --zone=us-east5-a            # SIGTERM: the trainer saves, then exits
#   ./launch_tpu.sh delete --name=lm7b --zone=us-east5-a
#   ./launch_tpu.sh all ... --dry-run                               # print every command instead of running it
#
# Actions (first argument, or --action=):
#   create  a TPU VM slice (`gcloud compute tpus tpu-vm create`), or with --queued a queued resource
#           (`gcloud compute tpus queued-resources create`, waits until ACTIVE; --num_slices=N: multi-slice)
#   setup   copy the code to every worker (--repo: a tarball of this working tree, or a git URL to clone),
#           make a Python 3.11 venv (uv) and `pip install -e '.[tpu]'`
#   run     on every worker at once: nohup python -m lmstack.main --config=... --workdir=gs://... [args after --],
#           each worker logging to ~/lmstack-run.log
#   logs    tail -F ~/lmstack-run.log on --worker (default 0; --nofollow prints the last lines)
#   stop    SIGTERM the run on every worker (the trainer saves a checkpoint and exits) and wait for it
#   delete  delete the slice (or the queued resource and its nodes)
#   all     create, setup, run, logs
#
# Flags (absl style: --flag=value or --flag value; --flag / --noflag for booleans; - and _ alike):
#   --name (required), --zone (required), --project, --accelerator_type (create: v4-32, v5p-64, v5e-16 or
#   v5litepod-16, v6e-64), --version (runtime; default by TPU generation), --queued, --spot, --preemptible,
#   --num_slices (queued only), --config and --workdir (run: a gs:// path every worker can reach),
#   --repo (default: this script's working tree), --ref (git branch or tag with a git URL), --python (3.11),
#   --worker and --follow (logs), --dry_run.
# Every error is one line on stderr and exit status 1.
set -euo pipefail

die() { echo "launch_tpu.sh: error: $*" >&2; exit 1; }
info() { echo "launch_tpu.sh: $*" >&2; }

ACTION="" NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" CONFIG="" WORKDIR="" REF="" PYVER="3.11"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
QUEUED=false SPOT=false PREEMPTIBLE=false DRY_RUN=false FOLLOW=true NUM_SLICES=1 WORKER=0
EXTRA=()
ACTIONS="create setup run logs stop delete all"

set_bool() {  # set_bool FLAG VALUE: FLAG (upper-cased) = true | false
  case ${2,,} in
    true | 1 | yes) printf -v "${1^^}" '%s' true ;;
    false | 0 | no) printf -v "${1^^}" '%s' false ;;
    *) die "--$1=$2: expected true or false" ;;
  esac
}

parse_flags() {
  while (($#)); do
    case $1 in
      --) shift; EXTRA=("$@"); return ;;
      --*)
        local key=${1#--} value="" has_value=false
        if [[ $key == *=* ]]; then value=${key#*=}; key=${key%%=*}; has_value=true; fi
        key=${key//-/_}
        case $key in
          queued | spot | preemptible | dry_run | follow)
            $has_value || value=true
            set_bool "$key" "$value" ;;
          noqueued | nospot | nopreemptible | nodry_run | nofollow)
            ! $has_value || die "--$key takes no value"
            set_bool "${key#no}" false ;;
          action | name | zone | project | accelerator_type | version | config | workdir | repo | ref | python \
            | num_slices | worker)
            if ! $has_value; then
              (($# >= 2)) || die "--$key needs a value"
              value=$2; shift
            fi
            case $key in
              action) ACTION=$value ;; name) NAME=$value ;; zone) ZONE=$value ;; project) PROJECT=$value ;;
              accelerator_type) ACCEL=$value ;; version) VERSION=$value ;; config) CONFIG=$value ;;
              workdir) WORKDIR=$value ;; repo) REPO=$value ;; ref) REF=$value ;; python) PYVER=$value ;;
              num_slices) NUM_SLICES=$value ;; worker) WORKER=$value ;;
            esac ;;
          help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
          *) die "unknown flag --$key (see --help)" ;;
        esac ;;
      *)
        [[ -z $ACTION ]] || die "unexpected argument '$1' (flags for lmstack.main go after --)"
        ACTION=$1 ;;
    esac
    shift
  done
}

# Chips and workers (hosts) of an accelerator type: v2/v3/v4/v5p-N count TensorCores (2 per chip, 4 chips
# a host); v5e (v5litepod) and v6e count chips (up to 8 on one host, else 4 a host).
chips_of() {
  local n=${1##*-}
  case $1 in v2-* | v3-* | v4-* | v5p-*) echo $((n / 2)) ;; *) echo "$n" ;; esac
}
workers_of() {
  local chips
  chips=$(chips_of "$1")
  case $1 in
    v2-* | v3-* | v4-* | v5p-*) echo $(((chips + 3) / 4)) ;;
    *) if ((chips <= 8)); then echo 1; else echo $((chips / 4)); fi ;;
  esac
}
default_version() {
  case $1 in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

quote() {  # one word for a shell: as is when safe, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

run() {  # run CMD...: the command, or with --dry-run its shell-quoted line on stdout
  if $DRY_RUN; then
    local line="" word
    for word in "$@"; do line+="$(quote "$word") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

# ---- flags ----
parse_flags "$@"
[[ -n $ACTION ]] || die "no action; expected one of: $ACTIONS"
[[ " $ACTIONS " == *" $ACTION "* ]] || die "unknown action '$ACTION'; expected one of: $ACTIONS"
[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$NUM_SLICES: expected a positive integer"
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker=$WORKER: expected a worker number or all"
((NUM_SLICES == 1)) || $QUEUED || die "--num_slices=$NUM_SLICES needs --queued (multi-slice is a queued resource)"
if [[ $ACTION == create || $ACTION == all ]]; then
  [[ -n $ACCEL ]] || die "--accelerator_type is required to create a slice (e.g. v5p-64, v5e-16)"
  ACCEL=${ACCEL/#v5e-/v5litepod-}  # gcloud's name for v5e
  [[ $ACCEL =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]] \
    || die "--accelerator_type=$ACCEL: expected e.g. v4-32, v5p-64, v5e-16, v6e-8"
  [[ -n $VERSION ]] || VERSION=$(default_version "$ACCEL")
  $PREEMPTIBLE && $QUEUED && die "--preemptible is not for queued resources; use --spot"
  $PREEMPTIBLE && $SPOT && die "--preemptible and --spot exclude each other"
  info "$ACCEL x $NUM_SLICES: $(chips_of "$ACCEL") chips, $(workers_of "$ACCEL") workers per slice; runtime $VERSION"
fi
if [[ $ACTION == run || $ACTION == all ]]; then
  [[ -n $CONFIG ]] || die "--config is required to run (e.g. configs/pretrain.py:size=7b)"
  [[ -n $WORKDIR ]] || die "--workdir is required to run"
  [[ $WORKDIR == gs://* ]] \
    || die "--workdir=$WORKDIR must be a gs:// path: every worker writes to it and it outlives the slice"
fi
$DRY_RUN || command -v gcloud > /dev/null || die "gcloud not found; install the Google Cloud CLI (or use --dry-run)"

WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")

# Every worker of every slice: one queued resource's nodes, or one TPU VM.
on_workers() {  # on_workers COMMAND [WORKER]
  if ((NUM_SLICES > 1)); then
    run gcloud compute tpus queued-resources ssh "$NAME" "${WHERE[@]}" --node=all --worker="${2:-all}" --command="$1"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="${2:-all}" --command="$1"
  fi
}

# ---- actions ----
create() {
  if ! $QUEUED; then
    local kind=()
    $SPOT && kind=(--spot)
    $PREEMPTIBLE && kind=(--preemptible)
    run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$VERSION" \
      "${kind[@]}"
    return
  fi
  local nodes=(--node-id="$NAME")
  ((NUM_SLICES == 1)) || nodes=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
  local kind=()
  $SPOT && kind=(--spot)
  run gcloud compute tpus queued-resources create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" \
    --runtime-version="$VERSION" "${nodes[@]}" "${kind[@]}"
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format='value(state.state)')
  if $DRY_RUN; then
    run "${describe[@]}"
    return
  fi
  local state=""
  while [[ $state != ACTIVE ]]; do
    state=$("${describe[@]}")
    case $state in
      FAILED | SUSPENDED) die "queued resource $NAME is $state" ;;
      ACTIVE) ;;
      *) info "queued resource $NAME is ${state:-unknown}; waiting"; sleep 30 ;;
    esac
  done
}

setup() {
  local fetch
  if [[ $REPO =~ ^(https?://|git@|ssh://) ]]; then
    local branch=""
    [[ -z $REF ]] || printf -v branch -- '--branch=%q ' "$REF"
    printf -v fetch 'rm -rf ~/lmstack && git clone --depth=1 %s%q ~/lmstack' "$branch" "$REPO"
  else
    [[ -d $REPO ]] || die "--repo=$REPO is neither a directory nor a git URL"
    local tarball="${TMPDIR:-/tmp}/lmstack-$NAME.tar.gz"
    # The working tree as git sees it: tracked and untracked files, not the ignored ones (runs, venvs).
    if $DRY_RUN; then
      echo "git -C $(quote "$REPO") ls-files -z --cached --others --exclude-standard" \
        "| tar -C $(quote "$REPO") --null -T - -czf $(quote "$tarball")"
    else
      git -C "$REPO" ls-files -z --cached --others --exclude-standard | tar -C "$REPO" --null -T - -czf "$tarball"
    fi
    if ((NUM_SLICES > 1)); then
      run gcloud compute tpus queued-resources scp "$tarball" "$NAME:lmstack.tar.gz" "${WHERE[@]}" --node=all \
        --worker=all
    else
      run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:lmstack.tar.gz" "${WHERE[@]}" --worker=all
    fi
    fetch='rm -rf ~/lmstack && mkdir -p ~/lmstack && tar -xzf ~/lmstack.tar.gz -C ~/lmstack'
  fi
  # Python 3.11 from uv: the TPU VM images ship an older python3.
  local install
  # shellcheck disable=SC2016  # $HOME expands on the worker
  printf -v install '%s && python3 -m pip install --user --quiet --upgrade uv && '\
'{ [ -x ~/lmstack-venv/bin/python ] || ~/.local/bin/uv venv --python %q ~/lmstack-venv; } && '\
'~/.local/bin/uv pip install --python ~/lmstack-venv/bin/python -e "$HOME/lmstack[tpu]"' "$fetch" "$PYVER"
  on_workers "set -euo pipefail; $install"
}

start() {
  local args
  printf -v args '%q ' --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}"
  # shellcheck disable=SC2016  # $! and $(cat ...) expand on the worker
  on_workers 'if [ -f ~/lmstack-run.pid ] && kill -0 "$(cat ~/lmstack-run.pid)" 2>/dev/null; then '\
'echo "$(hostname): a run is going (pid $(cat ~/lmstack-run.pid)); ./launch_tpu.sh stop first" >&2; exit 1; fi; '\
"cd ~/lmstack && nohup ~/lmstack-venv/bin/python -m lmstack.main ${args% } > ~/lmstack-run.log 2>&1 < /dev/null & "\
'echo $! > ~/lmstack-run.pid; echo "$(hostname): started pid $!, log ~/lmstack-run.log"'
}

logs() {
  local tail_cmd='tail -n 200 ~/lmstack-run.log'
  $FOLLOW && tail_cmd='tail -n 100 -F ~/lmstack-run.log'
  on_workers "$tail_cmd" "$WORKER"
}

stop() {
  # shellcheck disable=SC2016  # expands on the worker
  on_workers 'if [ -f ~/lmstack-run.pid ] && kill -TERM "$(cat ~/lmstack-run.pid)" 2>/dev/null; then '\
'for _ in $(seq 120); do kill -0 "$(cat ~/lmstack-run.pid)" 2>/dev/null || break; sleep 5; done; '\
'echo "$(hostname): stopped"; else echo "$(hostname): no run going"; fi'
}

delete() {
  if $QUEUED; then
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

case $ACTION in
  create) create ;;
  setup) setup ;;
  run) start ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  all) create; setup; start; logs ;;
esac
