#!/usr/bin/env python
"""Make the pipeline's executed notebooks (results/nb/*.ipynb) fit to commit, and check that they are.

Scrub (the default; rewrites each notebook in place, idempotent):
- keeps every output a reader needs: text, tables, errors, and images inline (base64 in the notebook);
- removes what bloats or changes on every run without telling the reader anything: Jupyter's per-cell execution
  timestamps and papermill's (each cell keeps its `papermill.duration`, which scripts/stage_times.py reads), widget
  state (`metadata.widgets`, widget-view outputs; the text fallback stays);
- resolves carriage-return progress bars to their last state and merges consecutive stream outputs;
- cuts a stream output longer than STREAM_MAX_CHARS to its start and its end, with a line saying what was cut;
- replaces machine-specific absolute paths: the repository root -> `<repo>`, a site-packages folder ->
  `<site-packages>`, the Python library -> `<python>`, the home folder -> `~`, a temporary folder -> `<tmp>`.

Check (`--check`, and what tests/test_site.py asserts): exit 1 when a notebook still holds an absolute path of this
machine (one the scrub does not know how to name: fix the chapter so it prints a relative path), widget state, or
when the set is over budget: each notebook <= EACH_MAX_BYTES, the whole set <= TOTAL_MAX_BYTES.

    python scripts/nb_scrub.py [--check] [--root DIR] [NOTEBOOK ...]    (default: results/nb/*.ipynb)

A DVC stage runs it right after papermill (`papermill ... results/nb/X.ipynb && python scripts/nb_scrub.py
results/nb/X.ipynb && python scripts/stage_times.py ...`), so the notebook that dvc.lock records is the scrubbed one.
It never fails a stage: what it cannot fix it reports, and --check (run by the tests) refuses it."""
import argparse, json, re, sys, tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
TOTAL_MAX_BYTES = 3_000_000        # the whole results/nb/ set (the default run's is about 1.3 MB before scrubbing)
EACH_MAX_BYTES = 1_000_000         # any one executed notebook
STREAM_MAX_CHARS = 20_000          # one stream output (a log); longer ones keep their first and last 8,000 characters
KEEP_CHARS = 8_000
BINARY_MIME = re.compile(r"^(image/(png|jpeg|gif|webp)|application/pdf)$")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
CELL_META_DROP = ("execution", "collapsed", "scrolled", "ExecuteTime")   # papermill's is cut to the cell's duration
# absolute paths that name this machine: what the check refuses (a URL path such as http://host/tmp/x is not one)
LEAK = re.compile(r"(?<![\w.~<>+/:@-])(?:/(?:work|home|root|Users|tmp|var/folders|private|mnt|srv|scratch)/[^\s'\"<>]*"
                  r"|[A-Za-z]:\\\\?Users\\[^\s'\"<>]*)")

def _path_rules(roots: list[Path]) -> list[tuple[re.Pattern, str]]:
    "Replacement rules, most specific first."
    end = r"(?![\w.-])"
    rules = [(re.compile(r"(?<![\w.~<>+-])/[^\s'\"<>():,;=\[\]{}]*?/(?:site|dist)-packages/"), "<site-packages>/"),
             (re.compile(r"(?<![\w.~<>+-])/[^\s'\"<>():,;=\[\]{}]*?/lib/python3\.\d+/"), "<python>/")]
    seen = set()
    for r in sorted({str(p) for p in roots if str(p) not in ("/", "")}, key=len, reverse=True):
        if r not in seen: seen.add(r); rules.append((re.compile(r"(?<![\w.~<>+-])" + re.escape(r) + end), "<repo>"))
    tmp = {tempfile.gettempdir().rstrip("/"), "/tmp", "/var/tmp"}
    for t in sorted(tmp, key=len, reverse=True):   # /tmp/tmpab12cd/x.zip -> <tmp>/x.zip (the random folder says nothing)
        rules.append((re.compile(r"(?<![\w.~<>+-])" + re.escape(t) + r"/[^\s/'\"<>:,;()\[\]{}]+"), "<tmp>"))
        rules.append((re.compile(r"(?<![\w.~<>+-])" + re.escape(t) + end), "<tmp>"))
    rules.append((re.compile(r"(?<![\w.~<>+-])/var/folders/[^\s'\"<>]+?/T/[^\s/'\"<>:,;()\[\]{}]+"), "<tmp>"))
    home = str(Path.home())
    if home not in ("/", ""): rules.append((re.compile(r"(?<![\w.~<>+-])" + re.escape(home) + end), "~"))
    rules.append((re.compile(r"(?<![\w.~<>+-])/(?:root|home/[\w.-]+|Users/[\w.-]+)" + end), "~"))
    return rules

def scrub_text(s: str, rules) -> str:
    for rx, repl in rules: s = rx.sub(repl, s)
    return s

def _walk_strings(obj, fn, skip_binary=True):
    "Apply fn to every string inside a JSON-like value (image payloads untouched)."
    if isinstance(obj, str): return fn(obj)
    if isinstance(obj, list): return [_walk_strings(v, fn, skip_binary) for v in obj]
    if isinstance(obj, dict):
        return {k: (v if skip_binary and BINARY_MIME.match(k) else _walk_strings(v, fn, skip_binary)) for k, v in obj.items()}
    return obj

def _text(v) -> str: return "".join(v) if isinstance(v, list) else (v or "")

def resolve_cr(text: str) -> str:
    "What a terminal shows after carriage returns: each line keeps what was written after its last \\r."
    out = []
    for line in text.split("\n"):
        if "\r" in line:
            parts = [p for p in line.split("\r") if p]
            line = parts[-1] if parts else ""
        out.append(line)
    return "\n".join(out)

def cut_long(text: str) -> str:
    if len(text) <= STREAM_MAX_CHARS: return text
    head, tail = text[:KEEP_CHARS], text[-KEEP_CHARS:]
    head, tail = head[:head.rfind("\n") + 1] or head, tail[tail.find("\n") + 1:] or tail
    cut = text[len(head):len(text) - len(tail)]
    return (head + f"[... {cut.count(chr(10))} lines ({len(cut):,} characters) cut by scripts/nb_scrub.py to keep the "
            f"committed notebook small; the run's own log has them all ...]\n" + tail)

def scrub_outputs(outputs: list) -> list:
    merged = []
    for o in outputs:
        o = dict(o)
        if o.get("output_type") == "stream":
            o["text"] = _text(o.get("text"))
            if merged and merged[-1].get("output_type") == "stream" and merged[-1].get("name") == o.get("name"):
                merged[-1]["text"] += o["text"]; continue
        elif "data" in o:
            data = {k: v for k, v in o["data"].items() if k != WIDGET_MIME}
            if not data: continue                  # a widget with no text fallback: nothing to show without a kernel
            o["data"] = data
            if "metadata" in o: o["metadata"] = {k: v for k, v in o["metadata"].items() if k != WIDGET_MIME}
        merged.append(o)
    for o in merged:
        if o.get("output_type") == "stream": o["text"] = cut_long(resolve_cr(o["text"]))
    return merged

def scrub_notebook(nb: dict, roots: list[Path] | None = None) -> dict:
    "A scrubbed copy of a notebook (a dict as json.load gives it); scrub_notebook(scrub_notebook(nb)) == scrub_notebook(nb)."
    rules = _path_rules([ROOT, Path.cwd(), *(roots or [])])
    nb = json.loads(json.dumps(nb))
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        meta = {k: v for k, v in cell.get("metadata", {}).items() if k not in CELL_META_DROP}
        if isinstance(pm := meta.get("papermill"), dict):    # the duration stays: scripts/stage_times.py sums it per section
            meta["papermill"] = {k: v for k, v in pm.items() if k == "duration" or (k == "exception" and v)}
        cell["metadata"] = meta
        if "outputs" in cell: cell["outputs"] = scrub_outputs(cell["outputs"])
    return _walk_strings(nb, lambda s: scrub_text(s, rules))

def dumps(nb: dict) -> str:
    "nbformat's on-disk layout (indent 1, sorted keys, multi-line strings as lists), as Jupyter writes it."
    return nbformat.writes(nbformat.from_dict(nb)) + "\n"

def problems(paths: list[Path]) -> list[str]:
    "Everything that keeps these notebooks from being committed: leaks, widget state, size over budget."
    out, total = [], 0
    for p in paths:
        size = p.stat().st_size; total += size
        if size > EACH_MAX_BYTES:
            out.append(f"{p.name}: {size:,} bytes, over the {EACH_MAX_BYTES:,}-byte budget for one notebook "
                       "(print less: summaries instead of whole tables or logs, smaller figures)")
        nb = json.loads(p.read_text())
        if "widgets" in nb.get("metadata", {}): out.append(f"{p.name}: widget state in metadata.widgets (run nb_scrub.py)")
        for i, cell in enumerate(nb.get("cells", [])):
            found = []
            _walk_strings({"source": cell.get("source"), "outputs": cell.get("outputs", [])},
                          lambda s: found.extend(LEAK.findall(s)) or s)
            if found: out.append(f"{p.name} cell {i}: absolute path(s) of this machine {sorted(set(found))[:3]}: make the "
                                 "chapter print paths relative to the repository (or teach nb_scrub.py to name them)")
            if any(WIDGET_MIME in o.get("data", {}) for o in cell.get("outputs", [])):
                out.append(f"{p.name} cell {i}: a widget output (run nb_scrub.py)")
        meta = []; _walk_strings(nb.get("metadata", {}), lambda s: meta.extend(LEAK.findall(s)) or s)
        if meta: out.append(f"{p.name} metadata: absolute path(s) {sorted(set(meta))[:3]}")
    if total > TOTAL_MAX_BYTES:
        out.append(f"results/nb: {total:,} bytes in {len(paths)} notebooks, over the {TOTAL_MAX_BYTES:,}-byte budget for the set")
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: results/nb/*.ipynb")
    ap.add_argument("--check", action="store_true", help="only check; exit 1 on a leak or an over-budget notebook")
    ap.add_argument("--root", action="append", type=Path, default=[],
                    help="another repository root to name <repo> (e.g. the copy a notebook was executed in)")
    a = ap.parse_args(argv)
    paths = a.notebooks or sorted((ROOT/"results"/"nb").glob("*.ipynb"))
    if not paths: print("nb_scrub: no executed notebooks (results/nb/*.ipynb): nothing to do"); return 0
    if missing := [str(p) for p in paths if not p.is_file()]: sys.exit(f"nb_scrub: no such notebook: {', '.join(missing)}")
    if not a.check:
        for p in paths:
            before = p.read_text(); after = dumps(scrub_notebook(json.loads(before), a.root))
            if after != before: p.write_text(after)
            print(f"nb_scrub: {p} {len(before.encode()):,} -> {len(after.encode()):,} bytes")
    if found := problems(paths):
        print("nb_scrub: " + ("not fit to commit" if a.check else "warning, still not fit to commit") + ":\n  "
              + "\n  ".join(found), file=sys.stderr)
        return 1 if a.check else 0
    if a.check: print(f"nb_scrub: {len(paths)} notebooks, {sum(p.stat().st_size for p in paths):,} bytes: fit to commit")
    return 0

if __name__ == "__main__": sys.exit(main())
