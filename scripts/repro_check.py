"""Reproduce a cited result: re-run the pipeline (or named stages) in a throwaway copy and compare every metric in
results/*.json with the committed one, within the tolerances stated per metric in repro-tolerances.yaml.

    python scripts/repro_check.py                   # the whole pipeline of HEAD (a fresh copy runs every stage)
    python scripts/repro_check.py rag               # only the rag stage: its inputs are pulled from the DVC remote
    python scripts/repro_check.py --rev 0a6d165 eval   # the commit a paper cites
    python scripts/repro_check.py --worktree rag    # the working tree (uncommitted edits too) against HEAD's results
    python scripts/repro_check.py --compare DIR     # no run: compare DIR/results (an earlier run) with the committed ones
    python scripts/repro_check.py --compare A --committed B   # no run: compare two runs' results/ folders

The copy is `git archive REV` (or the working tree), so the run uses exactly the cited code, params and dvc.lock.
With stage names, the copy first pulls the committed outputs they need (`dvc pull --with-deps`) and re-runs only those stages
(`dvc repro --force --single-item`); without a reachable remote it runs them with everything upstream.
Prints a table (mismatches, or every compared metric with --all) and exits 0 when all metrics match, 1 on a
mismatch or a missing metric, 2 when the run itself failed.
"""
from __future__ import annotations

import argparse, fnmatch, json, math, os, shutil, subprocess, sys, tarfile, tempfile, time, io
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOLERANCES = ROOT/"repro-tolerances.yaml"
CHECKS = ("exact", "abs", "rel", "ratio", "skip")


# ---------------------------------------------------------------- comparison (pure: tested in tests/test_repro.py)
def flatten(obj, prefix: str = "") -> dict[str, object]:
    "Nested JSON as {'a.b.0.c': leaf}; an empty dict/list is a leaf of its own."
    if isinstance(obj, dict) and obj:
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(obj, list) and obj:
        return {k: v for i, val in enumerate(obj) for k, v in flatten(val, f"{prefix}.{i}" if prefix else str(i)).items()}
    return {prefix: obj}


def load_tolerances(path: str | Path = TOLERANCES) -> dict:
    "The tolerance rules, validated: a wrong check name or a missing tol is refused with the rule it is in."
    spec = yaml.safe_load(Path(path).read_text()) or {}
    rules = [spec.get("default") or {"check": "abs", "tol": 1e-5}] + list(spec.get("rules") or [])
    for i, r in enumerate(rules):
        where = "default" if i == 0 else f"rule {i} ({r.get('match')!r})"
        if r.get("check") not in CHECKS: raise ValueError(f"{path}: {where}: check must be one of {', '.join(CHECKS)}, got {r.get('check')!r}")
        if r["check"] in ("abs", "rel", "ratio") and not isinstance(r.get("tol"), (int, float)):
            raise ValueError(f"{path}: {where}: check {r['check']} needs a numeric tol")
        if r["check"] == "ratio" and r["tol"] < 1: raise ValueError(f"{path}: {where}: a ratio tol is a factor >= 1, got {r['tol']}")
        if i and not isinstance(r.get("match"), str): raise ValueError(f"{path}: {where}: every rule needs a `match` glob")
    return dict(default=rules[0], rules=rules[1:])


def rule_for(key: str, tol: dict) -> dict:
    "The first rule whose glob matches 'FILE:KEY.PATH', else the default."
    return next((r for r in tol["rules"] if fnmatch.fnmatchcase(key, r["match"])), tol["default"])


def _num(v) -> bool: return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare_value(committed, rerun, rule: dict) -> tuple[bool, str]:
    "(ok, detail) for one metric under one rule."
    check, tol = rule["check"], rule.get("tol")
    if check == "skip": return True, rule.get("why", "skipped")
    if not (_num(committed) and _num(rerun)) or check == "exact":
        same = committed == rerun and isinstance(committed, bool) == isinstance(rerun, bool)   # True is not 1
        return same, "equal" if same else "differs"
    if math.isnan(committed) or math.isnan(rerun): return math.isnan(committed) and math.isnan(rerun), "nan"
    diff = rerun - committed
    if check == "abs": return abs(diff) <= tol, f"|d|={abs(diff):.3g} (tol {tol:g})"
    if check == "rel":
        rel = abs(diff) / abs(committed) if committed else (0.0 if diff == 0 else math.inf)
        return rel <= tol, f"rel={rel:.3g} (tol {tol:g})"
    if committed == 0 or rerun == 0 or (committed > 0) != (rerun > 0): return committed == rerun, "ratio undefined"
    r = rerun / committed
    return 1 / tol <= r <= tol, f"x{r:.3g} (within x{tol:g})"


@dataclass
class Row:
    file: str
    key: str
    committed: object
    rerun: object
    check: str
    status: str          # ok | MISMATCH | MISSING | new | skip
    detail: str


def compare_files(committed: dict[str, dict], rerun: dict[str, dict], tol: dict) -> list[Row]:
    "Every metric of every committed file against the re-run's; keys only in the re-run are listed as `new`."
    rows = []
    for fname in sorted(committed):
        old, new = flatten(committed[fname]), flatten(rerun.get(fname, {})) if fname in rerun else None
        if new is None:
            rows.append(Row(fname, "", "(file)", None, "exact", "MISSING", "the re-run wrote no such file")); continue
        for key, cv in old.items():
            rule = rule_for(f"{fname}:{key}", tol)
            if rule["check"] == "skip": rows.append(Row(fname, key, cv, new.get(key), "skip", "skip", rule.get("why", ""))); continue
            if key not in new: rows.append(Row(fname, key, cv, None, rule["check"], "MISSING", "not in the re-run")); continue
            ok, detail = compare_value(cv, new[key], rule)
            rows.append(Row(fname, key, cv, new[key], rule["check"] if _num(cv) else "exact", "ok" if ok else "MISMATCH", detail))
        rows += [Row(fname, k, None, v, "-", "new", "only in the re-run") for k, v in new.items() if k not in old]
    return rows


def _fmt(v, width=14) -> str:
    s = "-" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    return s if len(s) <= width else s[: width - 1] + "…"


def table(rows: list[Row], show_all: bool = False) -> str:
    "Per-file counts, then the rows that failed (or every compared row with show_all)."
    out = [f"{'file':16s} {'checked':>7s} {'ok':>6s} {'mismatch':>8s} {'missing':>7s} {'skipped':>7s} {'new':>5s}"]
    for f in sorted({r.file for r in rows}):
        rs = [r for r in rows if r.file == f]; c = lambda s: sum(r.status == s for r in rs)
        out.append(f"{f:16s} {c('ok') + c('MISMATCH') + c('MISSING'):7d} {c('ok'):6d} {c('MISMATCH'):8d} {c('MISSING'):7d} {c('skip'):7d} {c('new'):5d}")
    shown = [r for r in rows if r.status in (("ok", "MISMATCH", "MISSING") if show_all else ("MISMATCH", "MISSING"))]
    if shown:
        out += ["", f"{'status':8s} {'metric':58s} {'committed':>14s} {'re-run':>14s}  check"]
        out += [f"{r.status:8s} {(r.file + ':' + r.key)[:58]:58s} {_fmt(r.committed):>14s} {_fmt(r.rerun):>14s}  {r.check}: {r.detail}" for r in shown]
    return "\n".join(out)


# ---------------------------------------------------------------- committed results, stages, the run
def git(*args, cwd=ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, **kw)


def committed_results(rev: str | None, names: list[str] | None = None) -> dict[str, dict]:
    "results/*.json at `rev` (None: the working tree), optionally only `names`."
    if rev is None:
        files = {p.name: json.loads(p.read_text()) for p in sorted((ROOT/"results").glob("*.json"))}
    else:
        listed = git("ls-tree", "--name-only", f"{rev}:results").stdout.decode().split()
        files = {n: json.loads(git("show", f"{rev}:results/{n}").stdout) for n in listed if n.endswith(".json")}
    return {k: v for k, v in files.items() if names is None or k in names}


def stage_metrics(dvc_yaml: dict, stages: list[str]) -> list[str]:
    "The results/*.json metric files the named stages write (dvc.yaml `metrics`)."
    known = dvc_yaml.get("stages", {})
    bad = [s for s in stages if s not in known]
    if bad: raise SystemExit(f"unknown stage(s) {', '.join(bad)}; dvc.yaml has: {', '.join(known)}")
    out = []
    for s in stages:
        for m in known[s].get("metrics", []):
            path = next(iter(m)) if isinstance(m, dict) else m
            if path.startswith("results/") and path.endswith(".json"): out.append(Path(path).name)
    return out


def make_copy(dest: Path, rev: str | None):
    "`git archive rev` (or the working tree's files, as scripts/smoke.py copies them) into dest, as a fresh git repo."
    dest.mkdir(parents=True)
    if rev is None:
        sys.path.insert(0, str(ROOT/"scripts"))
        from smoke import copy_worktree
        copy_worktree(dest)
    else:
        tarfile.open(fileobj=io.BytesIO(git("archive", rev).stdout)).extractall(dest)
    g = ["git", "-c", "user.name=repro", "-c", "user.email=repro@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", f"repro copy of {rev or 'the working tree'}"]):
        subprocess.run(g + cmd, cwd=dest, check=True)


def run_pipeline(dest: Path, stages: list[str], pull: bool) -> int:
    env = {**os.environ, "PYTHONPATH": f"{dest}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = lambda *cmd: (print("$", " ".join(cmd), flush=True), subprocess.run(cmd, cwd=dest, env=env).returncode)[1]
    if stages and pull and run("dvc", "pull", "--with-deps", *stages) == 0:       # the stages' inputs (and persisted outputs)
        return run("dvc", "repro", "--force", "--single-item", *stages)
    if stages and pull: print("dvc pull failed (no remote, or outputs not pushed): running the stages with everything upstream", flush=True)
    return run("dvc", "repro", *stages)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("stages", nargs="*", help="stages to re-run (default: the whole pipeline)")
    ap.add_argument("--rev", default="HEAD", help="the commit to reproduce and compare with (default HEAD)")
    ap.add_argument("--worktree", action="store_true", help="run the working tree (uncommitted edits too) and compare with --rev's results")
    ap.add_argument("--compare", metavar="DIR", help="no run: compare DIR/results with the committed results")
    ap.add_argument("--committed", metavar="DIR", help="compare with DIR/results instead of the commit's results (e.g. another run)")
    ap.add_argument("--dest", metavar="DIR", help="where to make the copy (default: a temporary folder, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the copy")
    ap.add_argument("--no-pull", action="store_true", help="do not pull upstream outputs: re-run everything the stages need")
    ap.add_argument("--tolerances", default=str(TOLERANCES), help="the tolerance rules (default repro-tolerances.yaml)")
    ap.add_argument("--all", action="store_true", help="print every compared metric, not only the mismatches")
    a = ap.parse_args(argv)
    tol = load_tolerances(a.tolerances)
    rev = git("rev-parse", a.rev).stdout.decode().strip()
    names = stage_metrics(yaml.safe_load((ROOT/"dvc.yaml").read_text()), a.stages) if a.stages else None
    committed = committed_results(rev, names) if not a.committed else \
        {p.name: json.loads(p.read_text()) for p in sorted((Path(a.committed)/"results").glob("*.json")) if names is None or p.name in names}
    lock = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=ROOT, capture_output=True).stdout
    print(f"checking commit {rev[:12]} (dvc.lock sha1 {__import__('hashlib').sha1(lock).hexdigest()[:12]}), "
          f"stages: {' '.join(a.stages) or 'all'}, {len(committed)} metrics files", flush=True)
    if a.compare:
        run_dir, rc, tmp = Path(a.compare), 0, None
    else:
        tmp = None if a.dest else Path(tempfile.mkdtemp(prefix="llmtwin-repro-"))
        run_dir = Path(a.dest).resolve() if a.dest else tmp/"copy"
        if run_dir.exists(): shutil.rmtree(run_dir)
        make_copy(run_dir, None if a.worktree else rev)
        t0 = time.time(); rc = run_pipeline(run_dir, a.stages, not a.no_pull)
        print(f"re-run in {run_dir}: exit {rc} in {time.time() - t0:.0f}s", flush=True)
    rerun = {n: json.loads((run_dir/"results"/n).read_text()) for n in committed if (run_dir/"results"/n).exists()}
    rows = compare_files(committed, rerun, tol)
    print(table(rows, a.all))
    bad = [r for r in rows if r.status in ("MISMATCH", "MISSING")]
    print(f"\n{sum(r.status == 'ok' for r in rows)} metrics match, {len(bad)} do not, "
          f"{sum(r.status == 'skip' for r in rows)} skipped by {Path(a.tolerances).name}, {sum(r.status == 'new' for r in rows)} new")
    if tmp is not None and not a.keep: shutil.rmtree(tmp, ignore_errors=True)
    if rc: print(f"the re-run failed (exit {rc})"); return 2
    return 1 if bad else 0


if __name__ == "__main__": sys.exit(main())
