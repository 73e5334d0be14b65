#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Creates a Cloud TPU VM, or a queued resource whose single node has the same name.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: create.sh --name NAME --zone ZONE [--accelerator-type TYPE] [--runtime-version VERSION]
                 [--project PROJECT] [--spot] [--queued] [--poll-seconds N] [--dry-run]

Creates the TPU VM NAME:
  gcloud compute tpus tpu-vm create NAME --zone ZONE --accelerator-type TYPE --version VERSION [--spot]
which returns once the VM (every host of a multi-host slice) is READY. With --queued it asks
for a queued resource NAME whose node is also called NAME, then polls until it is ACTIVE:
  gcloud compute tpus queued-resources create NAME --zone ZONE --node-id NAME \\
      --accelerator-type TYPE --runtime-version VERSION [--spot]
  gcloud compute tpus queued-resources describe NAME --zone ZONE --format='value(state.state)'
Either way the VM is then NAME for setup.sh, launch.sh and watchdog.sh.

Software versions: v2-alpha-tpuv5-lite (v5e: v5litepod-1/4/8/16/...), v2-alpha-tpuv5
(v5p: v5p-8 is one host, v5p-32 four), v2-alpha-tpuv6e (v6e)."

parse_options "name zone project accelerator-type runtime-version spot queued poll-seconds" "$@"
require name zone

spot=()
if [[ $SPOT == 1 ]]; then spot=(--spot); fi

if [[ $QUEUED == 0 ]]; then
  tpu_vm create --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
  exit 0
fi

queued_resource create --node-id "$NAME" --accelerator-type "$ACCELERATOR_TYPE" \
  --runtime-version "$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
state_command
if [[ $DRY_RUN == 1 ]]; then
  run "${STATE_CMD[@]}"
  exit 0
fi
log "waiting for queued resource $NAME to become ACTIVE (polling every ${POLL_SECONDS}s)"
last=""
while true; do
  state=$(current_state)
  if [[ $state != "$last" ]]; then log "queued resource $NAME: $state"; fi
  last=$state
  case $state in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDING | SUSPENDED | MISSING)
      log "queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME $(quote_args "${LOC[@]}")"
      exit 1
      ;;
  esac
  sleep "$POLL_SECONDS"
done
