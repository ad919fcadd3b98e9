#!/usr/bin/env bash
# Quickstart 2: set up and pass the tests. The pipeline on the smoke profile once per sample author, each in a throwaway
# copy of the working tree (scripts/smoke.py): the demo author as the twin through every stage, then the second author as
# the twin with the demo as the other author through evaluation (the stages where the author's export, documents and
# voice matter; the later ones take the twin's model and held-out documents through the same code as the first run);
# then every notebook under nbdev_test and pytest, inside the first copy (they read its pipeline outputs). Finally the
# workspace must be exactly as it was: tests never touch results/, dvc.lock or params.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
source scripts/env.sh
source .venv/bin/activate
passed=0; failed=0; failures=()
step() { local name=$1; shift; echo "=== $name"; local t0=$SECONDS
  if "$@"; then passed=$((passed+1)); echo "--- ok: $name ($((SECONDS-t0))s)"
  else failed=$((failed+1)); failures+=("$name"); echo "--- FAILED: $name ($((SECONDS-t0))s)"; fi; }
workspace_state() { git status --porcelain -uall; git diff; }
before=$(workspace_state | sha1sum)
work=${LLMTWIN_TEST_DIR:-$(mktemp -d)}

step "llmtwin-check-params" llmtwin-check-params params.yaml
step "smoke pipeline, twin = Ilse Marchetti" python scripts/smoke.py "$work/ilse"
step "smoke pipeline through eval, twin = Marisol Vega" python scripts/smoke.py --until eval "$work/marisol" "data.author=Marisol Vega"
if [ -d "$work/ilse" ]; then
  pushd "$work/ilse" >/dev/null; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  for nb in nbs/[0-9]*.ipynb; do step "nbdev_test $nb" nbdev_test --path "$nb" --do_print; done
  pytest_log=$(mktemp)
  LLMTWIN_SMOKE_COPY=1 python -m pytest -q --durations=15 2>&1 | tee "$pytest_log"; rc=${PIPESTATUS[0]}
  p=$(grep -Eo '[0-9]+ passed' "$pytest_log" | tail -1 | grep -Eo '[0-9]+' || echo 0)
  f=$(grep -Eo '[0-9]+ (failed|errors?)' "$pytest_log" | awk '{s+=$1} END {print s+0}')
  [ "$rc" -ne 0 ] && [ "${f:-0}" -eq 0 ] && f=1 && failures+=("pytest exit $rc")
  [ "${f:-0}" -gt 0 ] && failures+=("pytest")
  passed=$((passed+p)); failed=$((failed+${f:-0}))
  popd >/dev/null
fi
step "the test command left the workspace as it was (git status, git diff)" test "$(workspace_state | sha1sum)" = "$before"
[ -z "${LLMTWIN_TEST_DIR:-}" ] && rm -rf "$work"
[ ${#failures[@]} -gt 0 ] && printf 'failed: %s\n' "${failures[@]}"
echo "total: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
