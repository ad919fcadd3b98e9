#!/usr/bin/env bash
# Rebuild .dvc/plots/offline.html: an HTML template for `dvc plots show` with
# vega, vega-lite and vega-embed inlined, so plots render without internet.
#
# Versions default to the ones DVC's own default template loads from the CDN
# (dvc_render/vega.py, VegaRenderer.SCRIPTS). Override with env vars, e.g.
#   VEGA_VERSION=5 VEGA_LITE_VERSION=5 VEGA_EMBED_VERSION=6 scripts/build_plots_template.sh
# Needs: npm (registry access), tar, python3.
set -euo pipefail

VEGA_VERSION="${VEGA_VERSION:-5.20.2}"
VEGA_LITE_VERSION="${VEGA_LITE_VERSION:-5.2.0}"
VEGA_EMBED_VERSION="${VEGA_EMBED_VERSION:-6.18.2}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo_root/.dvc/plots/offline.html}"
python="${PYTHON:-python3}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent \
    "vega@$VEGA_VERSION" "vega-lite@$VEGA_LITE_VERSION" "vega-embed@$VEGA_EMBED_VERSION" >/dev/null
for tgz in *.tgz; do
    d="${tgz%.tgz}"
    mkdir -p "$d"
    tar -xzf "$tgz" -C "$d"
done

"$python" "$repo_root/scripts/build_plots_template.py" --pack-dir "$work" -o "$out"
