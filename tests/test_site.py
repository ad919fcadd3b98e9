"""Readable without running: the executed notebooks (results/nb/) are fit to commit, and the static course site built
from them by one command works in a real headless browser (Debian's Chromium, offline): every chapter link from the
index opens its page, every image decodes, nothing logs a console error or asks the network for anything.
The browser test needs executed notebooks; the test command runs pytest inside a smoke-pipeline copy, which has them."""
import base64, json, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"scripts"))
import build_site, nb_scrub  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
EXECUTED = sorted((ROOT/"results"/"nb").glob("*.ipynb"))
needs_executed = pytest.mark.skipif(not EXECUTED, reason="no executed notebook in results/nb/: run the pipeline first "
                                    "(dvc repro, or python scripts/smoke.py DIR and pytest there, as scripts/test.sh does)")
PNG_1x1 = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360f8cfc0f01f0005000201"
    "a5d5f5a30000000049454e44ae426082")).decode()

def _cell(outputs, **meta):
    return {"cell_type": "code", "execution_count": 1, "id": "c1", "source": "print(1)", "outputs": outputs,
            "metadata": {"tags": ["parameters"], **meta}}

def _notebook(cells, **meta):
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}, **meta}}

def _write(path: Path, nb: dict) -> Path:
    path.write_text(json.dumps(nb)); return path

def test_scrub_removes_machine_paths_widgets_and_bloat(tmp_path):
    home = Path.home()
    png = PNG_1x1 + "/tmp/abc/"                      # base64 may hold '/tmp/': image payloads are never rewritten
    nb = _notebook([
        _cell([{"output_type": "stream", "name": "stdout", "text": ["loading\n", "  5%\r 50%\r100%\n"]},
               {"output_type": "stream", "name": "stdout",
                "text": f"wrote {ROOT}/results/data.json\nfrom /tmp/tmpab12cd/evil.zip\n{home}/.cache/llmtwin_nb\n"},
               {"output_type": "stream", "name": "stderr",
                "text": "/opt/venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning\n" + "log line\n" * 4000},
               {"output_type": "display_data", "metadata": {},
                "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "progress"}},
               {"output_type": "display_data", "metadata": {}, "data": {"image/png": png, "text/plain": "<Figure>"}}],
              execution={"iopub.status.busy": "2026-01-01T00:00:00Z"},
              papermill={"duration": 1.0, "start_time": "2026-01-01T00:00:00Z", "exception": False, "status": "completed"})],
        widgets={"application/vnd.jupyter.widget-state+json": {"state": {}}})
    raw = _write(tmp_path/"raw.ipynb", nb)
    found = nb_scrub.problems([raw])
    assert any("absolute path" in p for p in found) and any("widget" in p for p in found), found

    clean = nb_scrub.scrub_notebook(nb)
    assert nb_scrub.scrub_notebook(clean) == clean, "scrubbing twice must change nothing"
    out = _write(tmp_path/"clean.ipynb", clean)
    assert nb_scrub.problems([out]) == []
    outs = clean["cells"][0]["outputs"]
    assert clean["cells"][0]["metadata"] == {"tags": ["parameters"], "papermill": {"duration": 1.0}}
    assert "widgets" not in clean["metadata"]
    stdout, stderr = outs[0]["text"], outs[1]["text"]
    assert stdout == ("loading\n100%\nwrote <repo>/results/data.json\nfrom <tmp>/evil.zip\n~/.cache/llmtwin_nb\n")
    assert stderr.startswith("<site-packages>/tqdm/auto.py:21") and "cut by scripts/nb_scrub.py" in stderr
    assert len(stderr) < nb_scrub.STREAM_MAX_CHARS
    assert outs[2]["data"] == {"text/plain": "progress"}           # the widget's text fallback stays
    assert outs[3]["data"]["image/png"] == png                     # images stay inline, untouched

def test_check_refuses_an_unknown_machine_path_and_an_over_budget_set(tmp_path, monkeypatch, capsys):
    nb = _notebook([_cell([{"output_type": "stream", "name": "stdout", "text": "data in /mnt/disk1/corpus\n"}])])
    p = _write(tmp_path/"a.ipynb", nb_scrub.scrub_notebook(nb))
    assert any("/mnt/disk1/corpus" in x for x in nb_scrub.problems([p]))
    assert nb_scrub.main(["--check", str(p)]) == 1 and "not fit to commit" in capsys.readouterr().err
    q = _write(tmp_path/"b.ipynb", _notebook([_cell([{"output_type": "stream", "name": "stdout", "text": "x" * 5000}])]))
    monkeypatch.setattr(nb_scrub, "EACH_MAX_BYTES", 4000); monkeypatch.setattr(nb_scrub, "TOTAL_MAX_BYTES", 6000)
    found = nb_scrub.problems([q, q])
    assert sum("one notebook" in x for x in found) == 2 and any("for the set" in x for x in found), found

@needs_executed
def test_executed_notebooks_are_fit_to_commit():
    "What the pipeline wrote to results/nb/ (and what is committed there): no machine paths, no widget state, in budget."
    found = nb_scrub.problems(EXECUTED)
    total = sum(p.stat().st_size for p in EXECUTED)
    assert not found, (f"results/nb ({len(EXECUTED)} notebooks, {total:,} bytes) is not fit to commit; the stage must run "
                       "`python scripts/nb_scrub.py results/nb/NAME.ipynb` after papermill:\n  " + "\n  ".join(found))

def test_a_chapter_without_an_executed_notebook_is_listed_as_not_run_yet(tmp_path, monkeypatch):
    monkeypatch.setattr(build_site.results_table, "stale_stages", lambda: [])     # no `dvc status` needed here
    nb_dir = tmp_path/"nb"; nb_dir.mkdir()
    sources = sorted((ROOT/"nbs").glob("[0-9]*.ipynb"))
    first = next((p for p in EXECUTED if (ROOT/"nbs"/p.name).exists()), None)
    if first: (nb_dir/first.name).write_bytes(first.read_bytes())
    r = build_site.build(nb_dir, tmp_path/"site")
    index = (tmp_path/"site"/"index.html").read_text()
    not_run = [c for c in r["chapters"] if not c["executed"]]
    assert len(not_run) == len(sources) - (1 if first else 0) and index.count("not run yet") == len(not_run)
    for c in not_run:
        assert f'href="{c["name"]}.html"' not in index and not (tmp_path/"site"/f'{c["name"]}.html').exists()
    assert r["pages"] == ([f"{first.stem}.html"] if first else [])
    assert "<table>" in index, "the results table (scripts/results_table.py) is on the index"

@needs_executed
def test_site_opens_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright
    assert CHROMIUM.exists(), "no /usr/bin/chromium: bash scripts/setup.sh installs Debian's chromium package"
    site = ROOT/"site"
    t0 = time.time()
    build = subprocess.run([sys.executable, "scripts/build_site.py"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    print(build.stdout.strip(), f"({time.time() - t0:.1f} s)")
    errors, external = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            def route(r):
                if r.request.url.startswith(("file:", "data:")): r.continue_()
                else: external.append(r.request.url); r.abort()
            page.route("**/*", route)
            page.on("console", lambda m: m.type == "error" and errors.append(f"{page.url}: console: {m.text}"))
            page.on("pageerror", lambda e: errors.append(f"{page.url}: page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"{page.url}: request failed: {r.url[:120]} {r.failure}"))
            index_url = (site/"index.html").as_uri()
            page.goto(index_url, wait_until="load")
            page.screenshot(path=str(site/"index.png"), full_page=True)
            links = page.eval_on_selector_all("a.chapter", "as => as.map(a => [a.getAttribute('href'), a.textContent])")
            assert sorted(h for h, _ in links) == sorted(f"{p.stem}.html" for p in EXECUTED), \
                f"the index must link every executed chapter once: {links}"
            for href, title in links:
                page.goto(index_url, wait_until="load")
                page.click(f'a.chapter[href="{href}"]'); page.wait_for_load_state("load")
                assert (site/href).is_file() and page.url == (site/href).as_uri(), f"{href}: missing page (at {page.url})"
                assert page.title().startswith(title.strip()), f"{href}: the page of another chapter ({page.title()})"
                imgs = page.evaluate("Array.from(document.images).map(i => [i.src.slice(0, 40), i.complete, i.naturalWidth])")
                broken = [i for i in imgs if not i[1] or i[2] == 0]
                assert not broken, f"{href}: broken images {broken}"
                nb = json.loads((ROOT/"results"/"nb"/href.replace(".html", ".ipynb")).read_text())
                plots = sum(any(k.startswith("image/") for k in o.get("data", {}))
                            for c in nb["cells"] for o in c.get("outputs", []))
                assert len(imgs) >= plots, f"{href}: {plots} plots in the notebook, {len(imgs)} images on the page"
                local = page.eval_on_selector_all("a[href$='.html']", "as => as.map(a => a.getAttribute('href'))")
                assert "index.html" in local, f"{href}: no link back to the index"
                dead = [h for h in local if "://" not in h and not (site/h.split("#")[0]).is_file()]
                assert not dead, f"{href}: links to missing pages {dead}"
        finally:
            browser.close()
    assert not external, f"the site asked the network for {sorted(set(external))[:5]} (it must work offline)"
    assert not errors, "\n".join(errors[:20])
    assert (site/"index.png").stat().st_size > 10_000
