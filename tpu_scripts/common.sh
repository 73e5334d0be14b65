# shellcheck shell=bash disable=SC2034
# Shared by tpu_scripts/*.sh (sourced, never run): defaults, option parsing and --help, shell
# quoting, the run-or-print helper, and the gcloud/remote snippets more than one script needs.
# (SC2034 is off: the option variables set here are read by the scripts that source this.)
# Written for bash >= 3.2 (macOS's /bin/bash): no associative arrays, no ${x,,}, and no
# "${empty_array[@]}" under `set -u`.

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPTS_DIR")
PROG=$(basename "$0")

# On every worker, relative to $HOME: the checkout (with its .venv) and the per-run logs.
REMOTE_DIR=sae_jax
LOG_DIR=sae_jax_logs

# Every option of every script, with its default. Initialised here so that environment
# variables of the same names never leak in.
NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE=v5litepod-8
RUNTIME_VERSION=v2-alpha-tpuv5-lite
SPOT=0
QUEUED=0
POLL_SECONDS=60
REPO=""
RUN=""
DETACH=0
FETCH_LOGS=""
MAX_RESTARTS=20
DRY_RUN=0
CMD=()      # the sae-jax command (launch.sh, watchdog.sh): everything after `--`
LOC=()      # --zone ZONE [--project PROJECT], appended to every gcloud command

# option_info NAME sets VAR (the variable holding the option), META (its value's name in
# --help; empty for a flag) and DOC (its help line): the one place options are described.
# parse_options, require and forward read VAR and META; usage prints META and DOC.
option_info() {
  case $1 in
    name) _opt NAME NAME "TPU VM name, lowercase (required)" ;;
    zone) _opt ZONE ZONE "zone, e.g. us-west4-a (v5e) or us-east5-a (v5p) (required)" ;;
    project) _opt PROJECT PROJECT "Google Cloud project (default: gcloud's core/project)" ;;
    accelerator-type) _opt ACCELERATOR_TYPE TYPE \
      "v5litepod-8 (v5e, 1 host), v5p-32 (4 hosts), ... (default: $ACCELERATOR_TYPE)" ;;
    runtime-version) _opt RUNTIME_VERSION VERSION \
      "TPU software: v2-alpha-tpuv5-lite (v5e, the default), v2-alpha-tpuv5 (v5p)" ;;
    spot) _opt SPOT "" "Spot capacity: much cheaper, preemptible any time (see watchdog.sh)" ;;
    queued) _opt QUEUED "" "a queued resource (waits in line for capacity), not a direct create" ;;
    poll-seconds) _opt POLL_SECONDS N "seconds between state checks (default: $POLL_SECONDS)" ;;
    repo) _opt REPO URL "git clone URL on the workers instead of copying this checkout" ;;
    run) _opt RUN RUN "log name (default: RUN_DIR's last part for train, else the subcommand)" ;;
    detach) _opt DETACH "" "start the command in the background (nohup) and return at once" ;;
    fetch-logs) _opt FETCH_LOGS DIR "copy every worker's ~/$LOG_DIR/*.log into DIR (no launch)" ;;
    max-restarts) _opt MAX_RESTARTS N "give up after N recoveries/relaunches (default: $MAX_RESTARTS)" ;;
    dry-run) _opt DRY_RUN "" "print the commands, one per line after '+ ', instead of running them" ;;
    help) _opt "" "" "show this help" ;;
    *) return 1 ;;
  esac
}

_opt() {
  VAR=$1 META=$2 DOC=$3
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

log() {
  printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" "$*" >&2
}

usage() {
  local opt
  printf '%s\n\nOptions:\n' "$USAGE"
  for opt in $OPTIONS dry-run help; do
    option_info "$opt"
    printf '  %-26s %s\n' "--$opt${META:+ $META}" "$DOC"
  done
}

# parse_options "ALLOWED OPTION NAMES" "$@": sets the option variables, and CMD to what
# follows `--` (or the first non-option word) when the script sets TAKES_COMMAND=1.
# Reads USAGE (the script's synopsis and description). Unknown options exit with status 2.
parse_options() {
  OPTIONS="$1 "
  shift
  local arg opt value
  while [[ $# -gt 0 ]]; do
    arg=$1
    shift
    case $arg in
      -h | --help) usage; exit 0 ;;
      --) CMD=("$@"); break ;;
      --?*) ;;
      -*) die "unknown option $arg (see --help)" ;;
      *)
        [[ ${TAKES_COMMAND:-0} == 1 ]] || die "unexpected argument '$arg' (see --help)"
        CMD=("$arg" "$@")
        break
        ;;
    esac
    opt=${arg#--}
    opt=${opt%%=*}
    [[ " $OPTIONS dry-run " == *" $opt "* ]] || die "unknown option --$opt (see --help)"
    option_info "$opt"
    if [[ -z $META ]]; then
      [[ $arg != *=* ]] || die "--$opt takes no value"
      printf -v "$VAR" '%s' 1
      continue
    fi
    if [[ $arg == *=* ]]; then
      value=${arg#*=}
    elif [[ $# -gt 0 && $1 != --* ]]; then
      value=$1
      shift
    else
      die "--$opt needs a value"
    fi
    [[ -n $value ]] || die "--$opt needs a non-empty value"
    printf -v "$VAR" '%s' "$value"
  done
  [[ -z $NAME || $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name must be lowercase letters, digits and hyphens, starting with a letter: '$NAME'"
  [[ $POLL_SECONDS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--poll-seconds must be a number: '$POLL_SECONDS'"
  [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a whole number: '$MAX_RESTARTS'"
  LOC=(--zone "$ZONE")
  if [[ -n $PROJECT ]]; then LOC+=(--project "$PROJECT"); fi
}

# require NAME...: each option must have been given (and gcloud be there, unless --dry-run).
require() {
  local opt
  for opt in "$@"; do
    option_info "$opt"
    [[ -n ${!VAR} ]] || die "--$opt is required (see --help)"
  done
  [[ $DRY_RUN == 1 ]] || command -v gcloud >/dev/null ||
    die "gcloud not found: install the Google Cloud CLI (or look with --dry-run)"
}

# forward NAME...: sets FWD to the given options as they were parsed (flags only when set,
# plus --dry-run when it is on), to pass them on to another of these scripts.
forward() {
  local opt
  FWD=()
  for opt in "$@"; do
    option_info "$opt"
    if [[ -z $META ]]; then
      if [[ ${!VAR} == 1 ]]; then FWD+=("--$opt"); fi
    elif [[ -n ${!VAR} ]]; then
      FWD+=("--$opt" "${!VAR}")
    fi
  done
  if [[ $DRY_RUN == 1 ]]; then FWD+=(--dry-run); fi
}

# One word, quoted for bash only where needed: safe words as they are, `--opt=value` with
# just the value quoted, everything else in single quotes.
quote_word() {
  local word=$1 out="'" head
  if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
  else
    while [[ $word == *\'* ]]; do
      head=${word%%\'*}
      out="$out$head'\\''"
      word=${word#*\'}
    done
    printf '%s' "$out$word'"
  fi
}

# The arguments as one line that bash (and any POSIX shell) splits back into them.
quote_args() {
  local sep="" word
  for word in "$@"; do
    printf '%s' "$sep"
    quote_word "$word"
    sep=" "
  done
}

# The run-or-print helper: with --dry-run prints `+ COMMAND` on stdout; otherwise prints it
# on stderr (a trace) and runs it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(quote_args "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_args "$@")" >&2
  "$@"
}

# Like run, for a pipeline written as one shell string.
run_shell() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$1"
    return 0
  fi
  printf '+ %s\n' "$1" >&2
  eval "$1"
}

# gcloud compute tpus tpu-vm VERB NAME --zone ZONE [--project P] ARGS...
tpu_vm() {
  local verb=$1
  shift
  run gcloud compute tpus tpu-vm "$verb" "$NAME" "${LOC[@]}" "$@"
}

# gcloud compute tpus queued-resources VERB NAME --zone ZONE [--project P] ARGS...
queued_resource() {
  local verb=$1
  shift
  run gcloud compute tpus queued-resources "$verb" "$NAME" "${LOC[@]}" "$@"
}

# on_workers WORKER COMMAND: runs a shell command on worker WORKER (a number, or all).
on_workers() {
  tpu_vm ssh --worker="$1" --command "$2"
}

# The command that prints the TPU's state: the queued resource's with --queued (ACTIVE when
# its node is up), else the VM's (READY when up). Sets STATE_CMD.
state_command() {
  if [[ $QUEUED == 1 ]]; then
    STATE_CMD=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)')
  else
    STATE_CMD=(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format='value(state)')
  fi
}

# Prints the TPU's state; MISSING when it does not exist, UNKNOWN when gcloud failed otherwise.
current_state() {
  local out err rc=0
  state_command
  err=$(mktemp)
  out=$("${STATE_CMD[@]}" 2>"$err") || rc=$?
  if [[ $rc == 0 && -n $out ]]; then
    printf '%s\n' "$out"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    echo MISSING
  else
    sed 's/^/  gcloud: /' "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

# The run's name for log files: --run, else RUN_DIR's last component for `train DATA RUN_DIR`,
# else the subcommand. Sets RUN.
resolve_run_name() {
  if [[ -z $RUN && ${#CMD[@]} -ge 3 && ${CMD[0]} == train ]]; then
    RUN=${CMD[2]%/}
    RUN=${RUN##*/}
  fi
  if [[ -z $RUN && ${#CMD[@]} -ge 1 ]]; then RUN=${CMD[0]}; fi
  [[ $RUN =~ ^[A-Za-z0-9._-]+$ ]] || die "--run must be letters, digits, '.', '_' or '-': '$RUN'"
}

# Remote shell snippet: L is the run's log path prefix on this worker (one file per host, so
# fetched logs of different workers never collide).
remote_log_prefix() {
  printf '%s' "L=~/$LOG_DIR/$RUN.\$(hostname)"
}

# Remote shell snippet printing the run's status on a worker: `exit N` once it has finished
# with status N, `running`, `no-setup` (no ~/sae_jax/.venv/bin/sae-jax yet), or `none` (never
# started here, or killed without leaving a status).
remote_status() {
  # shellcheck disable=SC2016  # expanded on the worker
  printf '%s; %s' "$(remote_log_prefix)" \
    'if [ -f "$L.exit" ]; then echo "exit $(cat "$L.exit")"; elif [ -f "$L.pid" ] && kill -0 "$(cat "$L.pid")" 2>/dev/null; then echo running; elif [ ! -x ~/'"$REMOTE_DIR"'/.venv/bin/sae-jax ]; then echo no-setup; else echo none; fi'
}
