#!/usr/bin/env bash
# Quickstart 1: set up and run the main job, the whole DVC pipeline on the default CPU profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
source .venv/bin/activate
dvc repro "$@"
dvc metrics show
