#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Runs one sae-jax command on every worker of a TPU VM, or fetches the workers' logs.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch.sh --name NAME --zone ZONE [--project PROJECT] [--run RUN] [--detach] [--dry-run] \\
           -- SAE_JAX_ARGS...
       launch.sh --name NAME --zone ZONE [--project PROJECT] --fetch-logs DIR [--dry-run]

Runs \`sae-jax SAE_JAX_ARGS...\` (everything after --, passed through verbatim; options such
as --dry-run go before --) on every worker at once, in ~/$REMOTE_DIR with its .venv (see
setup.sh) and SAE_JAX_DISTRIBUTED=1, so that on a multi-host slice the processes join one
JAX job (jax.distributed.initialize()):
  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command '... sae-jax ...'
Each worker appends the command's output to ~/$LOG_DIR/RUN.<hostname>.log and, when it
ends, writes its exit status to ~/$LOG_DIR/RUN.<hostname>.exit. Without --detach the
output is also streamed here and launch.sh exits with the command's status (Ctrl-C here
does not reliably stop the workers: use --detach for long runs); with --detach the command
runs under nohup and launch.sh returns at once (watchdog.sh uses this).
A run whose command is still running on a worker is not started twice there.

Data and run directories may be gs:// paths: tensorstore reads the store and Orbax writes the
checkpoints there directly, with the VM's service account. Use gs:// for anything that must
outlive the VM. Re-running the same \`train DATA RUN_DIR ...\` resumes from RUN_DIR's latest
checkpoint.

Example:
  launch.sh --name my-tpu --zone us-west4-a -- train gs://bucket/data gs://bucket/runs/r1 \\
      arch=topk width=16384 compute_dtype=bfloat16
  launch.sh --name my-tpu --zone us-west4-a --fetch-logs logs/r1"

TAKES_COMMAND=1
parse_options "name zone project run detach fetch-logs" "$@"
require name zone

if [[ -n $FETCH_LOGS ]]; then
  [[ ${#CMD[@]} == 0 ]] || die "--fetch-logs takes no sae-jax command"
  run mkdir -p "$FETCH_LOGS"
  run gcloud compute tpus tpu-vm scp "$NAME:$LOG_DIR/*.log" "$FETCH_LOGS" "${LOC[@]}" --worker=all
  exit 0
fi

[[ ${#CMD[@]} -gt 0 ]] ||
  die "no sae-jax command: put it after --, e.g. -- train gs://bucket/data gs://bucket/runs/r1 key=value ..."
resolve_run_name

# The remote script, in POSIX sh (it runs in the worker's login shell).
job="SAE_JAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 .venv/bin/sae-jax $(quote_args "${CMD[@]}")"
body="{ $job; echo \$? > \"\$L.exit\"; }"
start="mkdir -p ~/$LOG_DIR && cd ~/$REMOTE_DIR || exit 1; $(remote_log_prefix); export L"
start="$start; if [ -f \"\$L.pid\" ] && kill -0 \"\$(cat \"\$L.pid\")\" 2>/dev/null; then echo \"$RUN is already running on \$(hostname) (pid \$(cat \"\$L.pid\"))\" >&2; exit 3; fi"
start="$start; rm -f \"\$L.exit\"; printf '%s %s: %s\\n' \"\$(date -u)\" \"\$(hostname)\" $(quote_word "sae-jax $(quote_args "${CMD[@]}")") >> \"\$L.log\""
if [[ $DETACH == 1 ]]; then
  detached=$(quote_word "$body >> \"\$L.log\" 2>&1")
  script="$start; nohup sh -c $detached > /dev/null 2>&1 < /dev/null & echo \$! > \"\$L.pid\"; echo \"started $RUN on \$(hostname): ~/$LOG_DIR/$RUN.\$(hostname).log\""
else
  script="$start; echo \$\$ > \"\$L.pid\"; $body 2>&1 | tee -a \"\$L.log\"; exit \"\$(cat \"\$L.exit\" 2>/dev/null || echo 1)\""
fi
on_workers all "$script"
