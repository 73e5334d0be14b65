#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deletes a TPU VM, or a queued resource together with its node.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: teardown.sh --name NAME --zone ZONE [--project PROJECT] [--queued] [--dry-run]

Deletes the TPU VM NAME without asking:
  gcloud compute tpus tpu-vm delete NAME --zone ZONE --quiet
or, with --queued, the queued resource NAME and its node:
  gcloud compute tpus queued-resources delete NAME --zone ZONE --force --quiet
Its disks go with it: runs and data on gs:// stay. Fetch logs first (launch.sh --fetch-logs)."

parse_options "name zone project queued" "$@"
require name zone

if [[ $QUEUED == 1 ]]; then
  queued_resource delete --force --quiet
else
  tpu_vm delete --quiet
fi
