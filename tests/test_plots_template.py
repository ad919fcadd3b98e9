"""The offline `dvc plots show` template (.dvc/plots/offline.html).

DVC's default plots page loads vega / vega-lite / vega-embed from a CDN and
is blank offline; the committed template inlines them instead.
Rebuild it with scripts/build_plots_template.sh.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / ".dvc" / "plots" / "offline.html"

CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", re.I)

# Distinctive strings from each library's UMD build (global it defines).
LIB_MARKERS = {
    "vega": "||self).vega=",
    "vega-lite": "||self).vegaLite=",
    "vega-embed": "||self).vegaEmbed=",
}


@pytest.fixture(scope="module")
def template_text():
    assert TEMPLATE.is_file(), f"{TEMPLATE} missing; run scripts/build_plots_template.sh"
    return TEMPLATE.read_text(encoding="utf8")


def test_template_has_dvc_placeholders(template_text):
    # dvc_render.html.HTML refuses templates without {plot_divs}
    assert "{plot_divs}" in template_text
    # {scripts} would be filled with DVC's CDN <script src=...> tags
    assert "{scripts}" not in template_text


def test_template_has_no_remote_scripts(template_text):
    assert "<script src=\"http" not in template_text
    assert not CDN_SCRIPT.search(template_text)
    assert not re.search(r"<script[^>]*\bsrc\s*=", template_text, re.I)


@pytest.mark.parametrize("lib", sorted(LIB_MARKERS))
def test_template_inlines_library(template_text, lib):
    assert LIB_MARKERS[lib] in template_text, f"{lib} code not inlined"


def _dvc_exe():
    exe = Path(sys.executable).parent / ("dvc.exe" if os.name == "nt" else "dvc")
    return str(exe) if exe.exists() else shutil.which("dvc")


requires_dvc = pytest.mark.skipif(
    importlib.util.find_spec("dvc") is None or _dvc_exe() is None,
    reason="dvc not installed",
)


@pytest.fixture()
def plots_repo(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = _dvc_exe()

    def run(*args):
        return subprocess.run(
            [dvc, *args], cwd=tmp_path, env=env, check=True,
            capture_output=True, text=True, timeout=60,
        )

    run("init", "--no-scm", "-q")
    run("config", "core.analytics", "false")
    (tmp_path / "metrics.json").write_text(
        json.dumps([{"epoch": i, "loss": 1 / (i + 1)} for i in range(5)])
    )
    (tmp_path / "dvc.yaml").write_text("plots:\n  - metrics.json:\n      x: epoch\n      y: loss\n")
    return tmp_path, run


def _check_output_html(html):
    assert "cdn.jsdelivr" not in html
    assert not CDN_SCRIPT.search(html)
    assert "vegaEmbed('#metrics_json'" in html  # the plot div
    for marker in LIB_MARKERS.values():  # libraries came from the template
        assert marker in html


@requires_dvc
def test_dvc_plots_show_with_html_template_flag(plots_repo):
    repo, run = plots_repo
    run("plots", "show", "--html-template", str(TEMPLATE), "-o", "out")
    _check_output_html((repo / "out" / "index.html").read_text(encoding="utf8"))


@requires_dvc
def test_dvc_plots_show_with_config_option(plots_repo):
    # same setting the project uses: plots.html_template, relative to .dvc/
    repo, run = plots_repo
    (repo / ".dvc" / "plots").mkdir(exist_ok=True)
    shutil.copy(TEMPLATE, repo / ".dvc" / "plots" / "offline.html")
    run("config", "plots.html_template", "plots/offline.html")
    run("plots", "show", "-o", "out")
    _check_output_html((repo / "out" / "index.html").read_text(encoding="utf8"))
