"""Reproducible from a fresh clone: the reproduction check's comparison (scripts/repro_check.py + repro-tolerances.yaml)
on the real committed results files, and the DVC remote round trip (push from one clone, pull into a second clone,
`dvc status` clean) on the pipeline outputs this copy's `dvc repro` made."""

import copy, json, os, shutil, subprocess, sys, time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import repro_check as rc  # noqa: E402

RESULTS = sorted((ROOT / "results").glob("*.json"))


@pytest.fixture(scope="module")
def tol():
    return rc.load_tolerances(ROOT / "repro-tolerances.yaml")


@pytest.fixture(scope="module")
def results():
    if not RESULTS: pytest.skip("no results/*.json in this checkout")
    return {p.name: json.loads(p.read_text()) for p in RESULTS}


def _set(obj, dotted, value):
    *head, last = dotted.split(".")
    for k in head: obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    if isinstance(obj, list): obj[int(last)] = value
    else: obj[last] = value


def test_identical_results_match_and_every_file_is_compared(results, tol):
    rows = rc.compare_files(results, copy.deepcopy(results), tol)
    assert {r.file for r in rows} == set(results)
    assert not [r for r in rows if r.status not in ("ok", "skip")]
    checked = [r for r in rows if r.status == "ok"]
    assert len(checked) > len([r for r in rows if r.status == "skip"])          # most values are compared, not skipped


def test_a_quality_metric_off_in_the_fifth_decimal_fails(results, tol):
    f, key = next((f, k) for f in ("eval.json", "rag.json", "sft.json") if f in results
                  for k, v in rc.flatten(results[f]).items() if rc._num(v) and rc.rule_for(f"{f}:{k}", tol)["check"] == "abs")
    rerun = copy.deepcopy(results)
    _set(rerun[f], key, rc.flatten(results[f])[key] + 2e-5)
    bad = [r for r in rc.compare_files(results, rerun, tol) if r.status == "MISMATCH"]
    assert [(r.file, r.key) for r in bad] == [(f, key)]
    assert f"{f}:{key}"[:58] in rc.table(rc.compare_files(results, rerun, tol))


def test_timings_are_skipped_and_speedups_compared_as_ratios(results, tol):
    rerun = copy.deepcopy(results)
    timing = [(f, k) for f in results for k, v in rc.flatten(results[f]).items()
              if rc._num(v) and (k.endswith("seconds") or k.endswith("_s") or "_ms" in k)]
    assert timing, "no timing in the results?"
    for f, k in timing: _set(rerun[f], k, rc.flatten(results[f])[k] * 3 + 1)     # a 3x slower machine
    rows = rc.compare_files(results, rerun, tol)
    assert not [r for r in rows if r.status == "MISMATCH"]
    assert {r.check for r in rows if (r.file, r.key) in set(timing)} == {"skip"}
    ratio = [(f, k) for f in results for k, v in rc.flatten(results[f]).items() if rc._num(v) and v and "speedup" in k]
    if ratio:
        f, k = ratio[0]; v = rc.flatten(results[f])[k]
        _set(rerun[f], k, v * 1.5)
        assert not [r for r in rc.compare_files(results, rerun, tol) if r.status == "MISMATCH"]
        _set(rerun[f], k, v * 3)
        assert [(r.file, r.key) for r in rc.compare_files(results, rerun, tol) if r.status == "MISMATCH"] == [(f, k)]


def test_missing_metric_string_change_and_new_keys(results, tol):
    f = "rag.json" if "rag.json" in results else next(iter(results))
    rerun = copy.deepcopy(results)
    flat = rc.flatten(results[f])
    key = next(k for k, v in flat.items() if rc._num(v) and rc.rule_for(f"{f}:{k}", tol)["check"] != "skip" and "." not in k)
    del rerun[f][key]
    skey = next((k for k, v in flat.items() if isinstance(v, str) and rc.rule_for(f"{f}:{k}", tol)["check"] != "skip"), None)
    if skey: _set(rerun[f], skey, flat[skey] + " (changed)")
    rerun[f]["a_metric_added_later"] = 1
    rows = {(r.file, r.key): r for r in rc.compare_files(results, rerun, tol)}
    assert rows[(f, key)].status == "MISSING"
    if skey: assert rows[(f, skey)].status == "MISMATCH" and rows[(f, skey)].check == "exact"
    assert rows[(f, "a_metric_added_later")].status == "new"
    other = next(n for n in results if n != f)
    del rerun[other]
    assert any(r.status == "MISSING" and r.file == other for r in rc.compare_files(results, rerun, tol))


def test_compare_value_rules():
    assert rc.compare_value(0.123456, 0.123459, {"check": "abs", "tol": 1e-5})[0]
    assert not rc.compare_value(0.12345, 0.12347, {"check": "abs", "tol": 1e-5})[0]
    assert rc.compare_value(100.0, 100.05, {"check": "rel", "tol": 1e-3})[0] and not rc.compare_value(100.0, 100.2, {"check": "rel", "tol": 1e-3})[0]
    assert rc.compare_value(3.0, 1.6, {"check": "ratio", "tol": 2})[0] and not rc.compare_value(3.0, 1.4, {"check": "ratio", "tol": 2})[0]
    assert not rc.compare_value(2.0, -2.0, {"check": "ratio", "tol": 2})[0]
    assert rc.compare_value(True, True, {"check": "abs", "tol": 1})[0] and not rc.compare_value(True, 1, {"check": "abs", "tol": 1})[0]
    assert not rc.compare_value(5, 6, {"check": "exact"})[0]
    assert rc.compare_value(5, 600, {"check": "skip", "why": "timing"}) == (True, "timing")


def test_bad_tolerance_files_are_refused_by_rule(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"rules": [{"match": "*:x", "check": "approx"}]}))
    with pytest.raises(ValueError, match=r"rule 1 \('\*:x'\): check must be one of"): rc.load_tolerances(p)
    p.write_text(yaml.safe_dump({"rules": [{"match": "*:x", "check": "rel"}]}))
    with pytest.raises(ValueError, match="needs a numeric tol"): rc.load_tolerances(p)
    p.write_text(yaml.safe_dump({"rules": [{"match": "*:x", "check": "ratio", "tol": 0.5}]}))
    with pytest.raises(ValueError, match="factor >= 1"): rc.load_tolerances(p)


def test_cli_compare_mode_exit_codes(tmp_path):
    "The command itself, on a copy of these results files: exit 0 when equal, 1 with one quality metric changed, naming it."
    if not RESULTS: pytest.skip("no results/*.json in this checkout")
    base, run = tmp_path / "base", tmp_path / "run"
    for d in (base, run): (d / "results").mkdir(parents=True); [shutil.copy2(p, d / "results" / p.name) for p in RESULTS]
    args = [sys.executable, str(ROOT / "scripts" / "repro_check.py"), "--compare", str(run), "--committed", str(base)]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "metrics match, 0 do not" in p.stdout, p.stdout + p.stderr
    tol = rc.load_tolerances()
    f = "eval.json" if (base / "results" / "eval.json").exists() else RESULTS[0].name
    d = json.loads((base / "results" / f).read_text())
    key = next(k for k, v in rc.flatten(d).items() if rc._num(v) and rc.rule_for(f"{f}:{k}", tol)["check"] == "abs")
    _set(d, key, rc.flatten(d)[key] + 0.01)
    (run / "results" / f).write_text(json.dumps(d))
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "MISMATCH" in p.stdout and f"{f}:{key}"[:58] in p.stdout, p.stdout


# ---------------------------------------------------------------- DVC remote: push, clone, pull, status
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])   # every stage: data, index, datasets, models, LLM caches


def _sh(*cmd, cwd, env=None, timeout=300):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} in {cwd} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p.stdout


def test_default_remote_is_a_local_folder_outside_the_repository():
    cfg = (ROOT / ".dvc" / "config").read_text()
    out = _sh("dvc", "remote", "list", cwd=ROOT)
    name, url = out.split()[0], out.split()[1]
    assert "(default)" in out and "~" in cfg and not Path(url).resolve().is_relative_to(ROOT.resolve()), out
    assert not any(s in cfg for s in ("/root/", "/home/", "/work/", "/tmp/")), "an absolute machine path in .dvc/config"


def test_push_then_pull_into_a_second_clone_leaves_nothing_to_reproduce(tmp_path):
    """Commit this pipeline copy's dvc.lock and results in a clone (what a citing commit holds), `dvc push` the data and rag
    stages to a fresh remote, `git clone` that commit again, `dvc pull`, and `dvc status` must report nothing to reproduce."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    if not (ROOT / "dvc.lock").exists(): pytest.skip("no dvc.lock: run inside the pipeline copy (scripts/test.sh)")
    clean = lambda s: (lambda p: p.returncode == 0 and "up to date" in p.stdout.lower())(
        subprocess.run(["dvc", "status", f"dvc.yaml:{s}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300))
    stages = [s for s in STAGES if clean(s)]          # in the pipeline copy of scripts/test.sh: all of them
    if "data" not in stages: pytest.skip("the data stage's outputs here do not match dvc.lock: run inside the pipeline copy (scripts/test.sh)")
    # in the test command's pipeline copy every stage the smoke pipeline runs is up to date: nbdev_test leaves every stage's
    # outputs alone (they are written in `#| slow` cells only)
    if os.environ.get("LLMTWIN_SMOKE_COPY") == "1":
        need = {"core", "data", "rag", "sft", "dpo", "eval", "mlops", "export"}
        assert need <= set(stages), f"stages not up to date after the smoke pipeline: {need - set(stages)}"
    print("stages pushed and pulled:", stages)
    targets = [f"dvc.yaml:{s}" for s in stages] + ["data.dvc"]
    remote, a, b = tmp_path / "remote", tmp_path / "a", tmp_path / "b"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    _sh("git", "clone", "-q", str(ROOT), str(a), cwd=tmp_path)
    # the citing commit: dvc.lock plus the stages' git-tracked (cache: false) outputs, as `dvc repro` left them
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    shutil.copy2(ROOT / "dvc.lock", a / "dvc.lock")
    tracked = []
    for s in stages:
        for o in lock["stages"][s].get("outs", []):
            src = ROOT / o["path"]
            if "md5" in o and o["path"].startswith("results/") and src.exists():       # git-tracked (cache: false) files and folders
                (a / o["path"]).parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir(): shutil.rmtree(a / o["path"], ignore_errors=True); shutil.copytree(src, a / o["path"])
                else: shutil.copy2(src, a / o["path"])
                tracked.append(o["path"])
    _sh(*git, "add", "-f", "dvc.lock", *tracked, cwd=a)
    _sh(*git, "commit", "-qm", "cite: dvc.lock + results", "--allow-empty", cwd=a)
    # a's DVC cache is this copy's (read only); its remote a fresh folder, set the way the README says (one command, --local)
    _sh("dvc", "cache", "dir", "--local", str(ROOT / ".dvc" / "cache"), cwd=a, env=env)
    _sh("dvc", "remote", "modify", "--local", "store", "url", str(remote), cwd=a, env=env)
    t0 = time.time(); out = _sh("dvc", "push", *targets, cwd=a, env=env); t_push = time.time() - t0
    pushed = sum(f.stat().st_size for f in remote.rglob("*") if f.is_file())
    # the second clone: git only, then dvc pull from the same remote
    _sh("git", "clone", "-q", str(a), str(b), cwd=tmp_path)
    assert not (b / "artifacts").exists()
    _sh("dvc", "remote", "modify", "--local", "store", "url", str(remote), cwd=b, env=env)
    t0 = time.time(); _sh("dvc", "pull", *targets, cwd=b, env=env); t_pull = time.time() - t0
    status = _sh("dvc", "status", *targets, cwd=b, env=env)
    print(f"pushed {pushed / 2**20:.1f} MB in {t_push:.1f}s, pulled in {t_pull:.1f}s; dvc status: {status.strip()}")
    assert "up to date" in status.lower() and "changed" not in status.lower(), status
    assert (b / "artifacts" / "warehouse" / "documents.parquet").is_file() and (b / "data").is_dir()
    if "rag" in stages: assert (b / "artifacts" / "qdrant" / "collection").is_dir() and (b / "models" / "reranker").is_dir()
    for s, path in [("sft", "models/sft/merged"), ("dpo", "models/dpo/merged"), ("eval", "artifacts/llm_cache/eval"), ("export", "models/gguf")]:
        if s in stages: assert (b / path).exists(), f"{path} ({s} stage) not pulled"
    assert pushed > 100_000, out
