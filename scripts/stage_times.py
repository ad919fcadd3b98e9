#!/usr/bin/env python
"""Where a stage's time goes: add `stage_seconds` and `phases` to its metrics file, read from the executed notebook.

papermill records every cell's duration in the executed notebook; a phase is a `##` section of the chapter (its cells
until the next `##` heading), so the timing follows the chapter's own outline and needs no code in the notebook.
Each DVC stage runs this after papermill:

    python scripts/stage_times.py results/nb/02_rag.ipynb results/rag.json
"""
import json, re, sys
from pathlib import Path

def phase_seconds(nb: dict) -> dict[str, float]:
    "`{section heading: seconds}` summed over the code cells under each `##` heading (cells before the first: `setup`)."
    phases, current = {}, "setup"
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown" and (m := re.search(r"^##\s+(.+)$", src, re.M)): current = m.group(1).strip()
        dur = (c.get("metadata", {}).get("papermill") or {}).get("duration")
        if c["cell_type"] == "code" and dur is not None: phases[current] = phases.get(current, 0.0) + float(dur)
    return {k: round(v, 1) for k, v in phases.items() if v >= 0.05}

def stage_times(executed: str | Path) -> dict:
    "`{stage_seconds, phases}` of a notebook papermill executed: the run's wall time (kernel start included) and its sections."
    nb = json.loads(Path(executed).read_text())
    total = (nb.get("metadata", {}).get("papermill") or {}).get("duration")
    if total is None: raise SystemExit(f"{executed}: no papermill timing in it; is it a notebook papermill executed?")
    return dict(stage_seconds=round(float(total), 1), phases=phase_seconds(nb))

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2: sys.exit(__doc__)
    executed, metrics = map(Path, argv)
    if not metrics.exists(): sys.exit(f"{metrics}: the stage's metrics file is missing; the notebook should have written it")
    from llmtwin_nb.core import write_json
    t = stage_times(executed)
    write_json(metrics, {**json.loads(metrics.read_text()), **t})
    print(f"{metrics}: stage_seconds {t['stage_seconds']}; " + ", ".join(f"{k} {v}" for k, v in sorted(t["phases"].items(), key=lambda kv: -kv[1])[:5]))

if __name__ == "__main__": main()
