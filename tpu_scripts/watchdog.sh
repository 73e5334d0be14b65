#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Keeps one sae-jax command running on a (Spot) TPU VM until it succeeds: recreates the VM
# when it is preempted, sets it up again and relaunches the command, which resumes.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: watchdog.sh --name NAME --zone ZONE [create.sh options] [--repo URL] [--run RUN]
                   [--poll-seconds N] [--max-restarts N] [--dry-run] -- SAE_JAX_ARGS...

Every --poll-seconds it reads the TPU's state:
  gcloud compute tpus tpu-vm describe NAME --zone ZONE --format='value(state)'
(with --queued: gcloud compute tpus queued-resources describe NAME --zone ZONE
--format='value(state.state)'), and
  * PREEMPTED, TERMINATED, STOPPED, FAILED, SUSPENDED or missing: deletes it (teardown.sh),
    recreates it with the same options (create.sh), installs sae_jax (setup.sh) and starts
    the command again (launch.sh --detach). \`sae-jax train DATA RUN_DIR ...\` on an existing
    RUN_DIR resumes from its latest checkpoint, so RUN_DIR (and DATA) must be on gs://.
  * READY (ACTIVE): asks worker 0 for the command's status (the exit status file launch.sh
    writes). Not set up yet: runs setup.sh. Not started yet: launches it. Exit status 0:
    done, exits 0. Status 2 (bad arguments): exits 2. Any other status, or gone without
    one: launches it again.
  * anything else (CREATING, WAITING_FOR_RESOURCES, ...): waits.
Each recovery or relaunch counts against --max-restarts. The watchdog may be started right
after create.sh, on a run already launched (it attaches) or finished (it exits 0). With
--dry-run it prints the commands of one recovery of a preempted TPU (describe, delete,
create, setup, launch) and exits. Options go before --; what follows is the sae-jax command."

TAKES_COMMAND=1
parse_options "name zone project accelerator-type runtime-version spot queued repo run poll-seconds max-restarts" "$@"
require name zone
[[ ${#CMD[@]} -gt 0 ]] ||
  die "no sae-jax command: put it after --, e.g. -- train gs://bucket/data gs://bucket/runs/r1 key=value ..."
resolve_run_name
if [[ ${CMD[0]} == train && ${#CMD[@]} -ge 3 ]]; then
  for dir in "${CMD[1]}" "${CMD[2]}"; do
    [[ $dir == gs://* ]] ||
      log "warning: $dir is not on gs://; a recreated VM starts with an empty disk without it"
  done
fi

recover() { # STATE: delete (unless missing), create, set up, launch. Returns 1 on failure.
  if [[ $1 != MISSING ]]; then
    forward name zone project queued
    "$SCRIPTS_DIR/teardown.sh" "${FWD[@]}" || return 1
  fi
  forward name zone project accelerator-type runtime-version spot queued poll-seconds
  "$SCRIPTS_DIR/create.sh" "${FWD[@]}" || return 1
  forward name zone project repo
  "$SCRIPTS_DIR/setup.sh" "${FWD[@]}" || return 1
  relaunch
}

relaunch() {
  forward name zone project run
  "$SCRIPTS_DIR/launch.sh" "${FWD[@]}" --detach -- "${CMD[@]}" || return 1
  launched=1
}

restarts=0
count_restart() { # REASON
  restarts=$((restarts + 1))
  if ((restarts > MAX_RESTARTS)); then
    log "$1; giving up after $MAX_RESTARTS restarts (--max-restarts)"
    exit 1
  fi
  log "$1; restart $restarts/$MAX_RESTARTS"
}

if [[ $DRY_RUN == 1 ]]; then
  state_command
  run "${STATE_CMD[@]}"
  log "--dry-run: what one check does when the TPU is PREEMPTED"
  recover PREEMPTED
  exit 0
fi

launched=0
last=""
while true; do
  state=$(current_state)
  if [[ $state != "$last" ]]; then log "TPU $NAME: $state"; fi
  last=$state
  case $state in
    READY | ACTIVE)
      status=$(gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=0 \
        --command "$(remote_status)" 2>/dev/null | tail -n 1) || status=""
      case $status in
        "exit 0")
          log "$RUN finished successfully"
          exit 0
          ;;
        "exit 2")
          log "$RUN failed with status 2 (bad arguments or data): not retrying; see launch.sh --fetch-logs"
          exit 2
          ;;
        "exit "*)
          count_restart "$RUN exited with status ${status#exit }"
          relaunch || count_restart "launch failed"
          ;;
        none)
          if [[ $launched == 1 ]]; then count_restart "$RUN is gone without an exit status"; fi
          relaunch || count_restart "launch failed"
          ;;
        no-setup)
          forward name zone project repo
          { "$SCRIPTS_DIR/setup.sh" "${FWD[@]}" && relaunch; } || count_restart "setup or launch failed"
          ;;
        running) ;;
        *) log "worker 0 did not answer; retrying" ;;
      esac
      ;;
    PREEMPTED | TERMINATED | STOPPED | FAILED | SUSPENDING | SUSPENDED | MISSING)
      count_restart "TPU $NAME is $state"
      recover "$state" || log "recovery failed; retrying"
      last=""
      ;;
    UNKNOWN) log "could not read the TPU's state; retrying" ;;
  esac
  sleep "$POLL_SECONDS"
done
