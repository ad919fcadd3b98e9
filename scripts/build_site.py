#!/usr/bin/env python
"""Build the course as a static HTML site from the pipeline's executed notebooks: read every chapter without running.

    python scripts/build_site.py [--nbs results/nb] [--out site]

site/index.html    the chapter list (titles from the notebooks; a chapter with no executed notebook is listed as not run
                   yet, with no link) and the results table (scripts/results_table.py renders it, as for the README);
site/NAME.html     one page per executed chapter (nbconvert's lab template: outputs and plots inline), linked to the
                   index and to the previous and next chapters;
site/assets/       the one shared stylesheet. Nothing is loaded from the network: no require.js, MathJax, mermaid or
                   widget scripts, no web fonts (tests/test_site.py opens the site offline in headless Chromium and fails
                   on any request that is not a local file).
Notebooks are scrubbed in memory on the way (scripts/nb_scrub.py), so the site never shows a path of the machine that
ran them. Open site/index.html in a browser, or serve it: python -m http.server -d site."""
import argparse, datetime as dt, html, json, logging, re, shutil, sys
from pathlib import Path

import mistune, nbformat, yaml
from jinja2 import DictLoader
from nbconvert import HTMLExporter

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
import nb_scrub, results_table  # noqa: E402  (scripts of this folder)

CHAPTER_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block notebook_css %}<link rel="stylesheet" href="assets/lab.css">{% endblock notebook_css %}
{%- block body_header -%}{{ super() }}{{ resources.site_nav }}{%- endblock body_header -%}
{% block body_footer %}{{ resources.site_nav }}{{ super() }}{% endblock body_footer %}
"""

SITE_CSS = """
a.anchor-link { display: none; }
.jp-InputArea, .jp-InputArea-editor { overflow: hidden; }
.jp-OutputArea-output pre { line-height: inherit; font-family: inherit; }
.jp-RenderedText pre { color: var(--jp-content-font-color1); font-size: var(--jp-code-font-size); }
.jp-Collapser { display: none; }
nav.site-nav { display: flex; gap: 1.5em; padding: 0.6em 1em; margin: 0 0 1em 0; background: #f3f4f6;
  border-radius: 6px; font: 14px/1.4 system-ui, sans-serif; }
nav.site-nav a { color: #1d4ed8; text-decoration: none; }
nav.site-nav .spacer { flex: 1; }
"""

INDEX_CSS = """
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
  color: #1f2937; }
h1 { margin-bottom: 0.2em; } .lead { color: #4b5563; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em 0; font-size: 14px; }
th, td { border: 1px solid #d1d5db; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
ol.chapters { padding-left: 0; list-style: none; }
ol.chapters li { margin: 0 0 0.9em 0; }
ol.chapters .name { font-family: ui-monospace, monospace; color: #6b7280; margin-right: 0.6em; }
ol.chapters a { font-weight: 600; color: #1d4ed8; text-decoration: none; font-size: 1.05em; }
ol.chapters .status { font-size: 13px; color: #6b7280; margin-left: 0.5em; }
ol.chapters .notrun { font-weight: 600; color: #9ca3af; }
ol.chapters .failed { color: #b91c1c; font-weight: 600; }
ol.chapters .summary { color: #374151; margin: 0.15em 0 0 0; font-size: 14px; }
ol.chapters .summary code { font-size: 13px; }
code { background: #f3f4f6; padding: 0 0.25em; border-radius: 3px; }
footer { color: #6b7280; font-size: 13px; margin-top: 3em; }
"""

def pipeline_notebooks() -> dict[str, str]:
    "name -> DVC stage, for every executed notebook (results/nb/NAME.ipynb) that a dvc.yaml stage writes."
    p = ROOT/"dvc.yaml"
    if not p.exists(): return {}
    out = {}
    for stage, st in (yaml.safe_load(p.read_text()) or {}).get("stages", {}).items():
        for o in st.get("outs", []):
            for path in (o if isinstance(o, dict) else {o: None}):
                if str(path).startswith("results/nb/") and str(path).endswith(".ipynb"): out[Path(path).stem] = stage
    return out

def title_and_summary(nb: dict, name: str) -> tuple[str, str]:
    "The first '# ' heading of the notebook and the quoted summary under it (the chapters open this way)."
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown": continue
        lines = "".join(cell.get("source", "")).splitlines()
        for i, line in enumerate(lines):
            if line.startswith("# "):
                summary = []
                for rest in lines[i + 1:]:
                    if rest.startswith(">"): summary.append(rest.lstrip("> ").strip())
                    elif summary or rest.strip(): break
                return line[2:].strip(), " ".join(summary)
    return name, ""

def run_info(nb: dict) -> tuple[str, bool]:
    "When papermill ran it and for how long, and whether it stopped on an error."
    pm = nb.get("metadata", {}).get("papermill", {}) or {}
    bits = []
    if start := pm.get("start_time"):
        try: bits.append("ran " + dt.datetime.fromisoformat(start).strftime("%Y-%m-%d %H:%M UTC"))
        except ValueError: pass
    if isinstance(pm.get("duration"), (int, float)): bits.append(f"{pm['duration'] / 60:.1f} min")
    failed = bool(pm.get("exception")) or any(o.get("output_type") == "error" for c in nb.get("cells", [])
                                                if "raises-exception" not in c.get("metadata", {}).get("tags", [])
                                                for o in c.get("outputs", []))
    return ", ".join(bits), failed

def lab_css() -> str:
    "nbconvert's lab stylesheet and light theme, once for the whole site (not inlined into every page)."
    for d in HTMLExporter(template_name="lab").template_paths:
        static = Path(d)/"static"
        if (static/"index.css").exists() and (static/"theme-light.css").exists():
            return (static/"index.css").read_text() + "\n" + (static/"theme-light.css").read_text() + SITE_CSS
    raise SystemExit("build_site: nbconvert's lab template (static/index.css) was not found; reinstall nbconvert")

def nav(prev: tuple | None, nxt: tuple | None) -> str:
    a = lambda c, label: f'<a href="{c[0]}.html">{label}</a>'
    return ('<nav class="site-nav"><a href="index.html">Course index</a><span class="spacer"></span>'
            + (a(prev, f"&larr; {html.escape(prev[1])}") if prev else "")
            + (a(nxt, f"{html.escape(nxt[1])} &rarr;") if nxt else "") + "</nav>")

def inline_md(text: str) -> str:
    "A chapter's one-paragraph summary as HTML (backticks become code), escaped like any markdown."
    return mistune.create_markdown(escape=True)(text).strip().removeprefix("<p>").removesuffix("</p>")

def results_html() -> str:
    md = results_table.render().replace(results_table.START, "").replace(results_table.END, "")
    return mistune.create_markdown(plugins=["table"])(md)

def build(nb_dir: Path, out: Path, roots: list[Path] = ()) -> dict:
    "Build the site; returns {'chapters': [...], 'pages': [...]} for the caller (and the test)."
    nb_dir, out = Path(nb_dir), Path(out)
    executed = {p.stem: p for p in sorted(nb_dir.glob("*.ipynb"))}
    sources = {p.stem: p for p in sorted((ROOT/"nbs").glob("[0-9]*.ipynb"))}
    stages = pipeline_notebooks()
    chapters = []
    for name in sorted(set(executed) | set(sources)):
        nb = json.loads((executed.get(name) or sources[name]).read_text())
        title, summary = title_and_summary(nb, name)
        info, failed = run_info(nb) if name in executed else ("", False)
        chapters.append(dict(name=name, title=title, summary=summary, executed=name in executed, info=info,
                             failed=failed, stage=stages.get(name)))
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.html"), out/"index.png"]: old.unlink(missing_ok=True)
    shutil.rmtree(out/"assets", ignore_errors=True); (out/"assets").mkdir()
    (out/"assets"/"lab.css").write_text(lab_css())

    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"llmtwin_chapter.html.j2": CHAPTER_TEMPLATE})],
                            template_file="llmtwin_chapter.html.j2", embed_images=True)
    exporter.log.setLevel(logging.ERROR)           # not a warning per plot that its alt text is nbconvert's default
    run = [c for c in chapters if c["executed"]]
    names = {c["name"] for c in run}
    pages = []
    for i, c in enumerate(run):
        nb = nb_scrub.scrub_notebook(json.loads(executed[c["name"]].read_text()), list(roots))
        nb.setdefault("metadata", {})["title"] = f'{c["title"]} · llmtwin_nb'
        prev = (run[i - 1]["name"], run[i - 1]["title"]) if i else None
        nxt = (run[i + 1]["name"], run[i + 1]["title"]) if i + 1 < len(run) else None
        body, _ = exporter.from_notebook_node(nbformat.reads(json.dumps(nb), as_version=4), resources={
            "metadata": {"name": c["name"], "path": str(ROOT/"nbs")}, "site_nav": nav(prev, nxt)})
        # a link to another chapter's notebook goes to its page when it has one
        body = re.sub(r'href="(?:\./)?([\w.-]+)\.ipynb(#[^"]*)?"',
                      lambda m: f'href="{m[1]}.html{m[2] or ""}"' if m[1] in names else m[0], body)
        (out/f'{c["name"]}.html').write_text(body); pages.append(f'{c["name"]}.html')

    items = []
    for c in chapters:
        name = f'<span class="name">{html.escape(c["name"])}</span>'
        if c["executed"]:
            head = f'{name}<a class="chapter" href="{c["name"]}.html">{html.escape(c["title"])}</a>'
            status = (f'<span class="status">{html.escape(c["info"])}</span>' if c["info"] else "") + \
                     ('<span class="status failed">stopped on an error</span>' if c["failed"] else "")
        else:
            how = (f'<code>dvc repro {html.escape(c["stage"])}</code> runs it' if c["stage"] else
                   f'no pipeline stage runs it: read <code>nbs/{html.escape(c["name"])}.ipynb</code>')
            head = f'{name}<span class="notrun">{html.escape(c["title"])}</span>'
            status = f'<span class="status notrun-status">not run yet ({how})</span>'
        summary = f'<div class="summary">{inline_md(c["summary"])}</div>' if c["summary"] else ""
        items.append(f"<li>{head}{status}{summary}</li>")
    commit = results_table.commit()
    index = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmtwin_nb: the course, as run</title><style>{INDEX_CSS}</style></head>
<body><main>
<h1>llmtwin_nb: the course, as run</h1>
<p class="lead">An LLM Twin built chapter by chapter (<em>LLM Engineer's Handbook</em>, local-first). Each chapter below is the
notebook as the pipeline executed it, with its outputs and plots; nothing here needs a kernel.</p>
<h2>Chapters</h2>
<ol class="chapters">
{chr(10).join(items)}
</ol>
<h2>Results</h2>
{results_html()}
<footer>Built by <code>python scripts/build_site.py</code> from <code>results/nb/*.ipynb</code> and <code>results/*.json</code>
at commit <code>{html.escape(commit)}</code>; {len(run)} of {len(chapters)} chapters executed.</footer>
</main></body></html>
"""
    (out/"index.html").write_text(index)
    return {"chapters": chapters, "pages": pages}

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nbs", type=Path, default=ROOT/"results"/"nb", help="executed notebooks (default results/nb)")
    ap.add_argument("--out", type=Path, default=ROOT/"site", help="output folder (default site/, ignored by git)")
    ap.add_argument("--root", action="append", type=Path, default=[],
                    help="the repository copy the notebooks ran in, if not this one (its paths show as <repo>)")
    a = ap.parse_args(argv)
    r = build(a.nbs, a.out, a.root)
    size = sum(p.stat().st_size for p in a.out.rglob("*") if p.is_file())
    print(f"site: {a.out/'index.html'} ({len(r['pages'])} of {len(r['chapters'])} chapters executed, {size / 1e6:.2f} MB)")
    return 0

if __name__ == "__main__": sys.exit(main())
