#!/usr/bin/env bash
# Quickstart 1: set up and run the main job, the whole DVC pipeline on the default CPU profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
source .venv/bin/activate
dvc repro "$@"
# keep the outputs pinned by dvc.lock in the DVC remote (default: ~/.cache/llmtwin_nb/dvc-remote; see the README),
# so another clone can `dvc pull` them instead of rebuilding; LLMTWIN_PUSH=0 skips it
if [ "${LLMTWIN_PUSH:-1}" != 0 ]; then
  dvc push || { echo "dvc push to remote '$(dvc config core.remote)' failed: the results are here, but not in the remote (fix the remote, then run dvc push)" >&2; exit 1; }
fi
dvc metrics show
