#!/usr/bin/env bash
# Quickstart 2: set up and pass the tests. The pipeline first, on the smoke profile (the smoke test of the main job;
# it produces what the notebooks' fast paths read), then every notebook under nbdev_test, then pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
source scripts/env.sh
source .venv/bin/activate
passed=0; failed=0; failures=()
step() { local name=$1; shift; echo "=== $name"; local t0=$SECONDS
  if "$@"; then passed=$((passed+1)); echo "--- ok: $name ($((SECONDS-t0))s)"
  else failed=$((failed+1)); failures+=("$name"); echo "--- FAILED: $name ($((SECONDS-t0))s)"; fi; }

step "llmtwin-check-params" llmtwin-check-params params.yaml
# the pipeline on the smoke profile (params-smoke.yaml: same stages, smaller sizes), then params.yaml restored
smoke() { local rc=0; dvc exp run $(llmtwin-profile params-smoke.yaml) || rc=$?; git checkout -- params.yaml; return $rc; }
step "dvc exp run (smoke profile)" smoke
for nb in nbs/[0-9]*.ipynb; do step "nbdev_test $nb" nbdev_test --path "$nb" --do_print; done
pytest_log=$(mktemp)
python -m pytest -q 2>&1 | tee "$pytest_log"; rc=${PIPESTATUS[0]}
p=$(grep -Eo '[0-9]+ passed' "$pytest_log" | tail -1 | grep -Eo '[0-9]+' || echo 0)
f=$(grep -Eo '[0-9]+ (failed|errors?)' "$pytest_log" | awk '{s+=$1} END {print s+0}')
[ "$rc" -ne 0 ] && [ "${f:-0}" -eq 0 ] && f=1 && failures+=("pytest exit $rc")
[ "${f:-0}" -gt 0 ] && failures+=("pytest")
passed=$((passed+p)); failed=$((failed+${f:-0}))
[ ${#failures[@]} -gt 0 ] && printf 'failed: %s\n' "${failures[@]}"
echo "total: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
