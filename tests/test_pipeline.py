"""The DVC pipeline's integrity: every papermill stage passes exactly the params it declares, each into a
variable of the notebook's `parameters` cell whose default equals params.yaml, and DVC accepts the graph."""
import ast, json, os, re, subprocess, sys
from pathlib import Path

import pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT/"dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT/"params.yaml").read_text())
PAPERMILL = {name: st for name, st in DVC["stages"].items() if "papermill" in st["cmd"]}

def get_param(key):
    d = PARAMS
    for part in key.split("."): d = d[part]
    return d

def parameters_cell(nb_path: Path) -> dict:
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: needs exactly one cell tagged `parameters` (nbdev_clean must keep tags)"
    tree = ast.parse("".join(cells[0]["source"]))
    return {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}

def passed_params(cmd: str) -> dict:
    return dict(re.findall(r"-p\s+(\w+)\s+'?\$\{([\w.]+)\}'?", cmd))

@pytest.mark.parametrize("stage", sorted(PAPERMILL))
def test_stage_params_match_notebook_and_params_yaml(stage):
    st = PAPERMILL[stage]
    nb = re.search(r"papermill\s+(?:--\S+\s+\S+\s+)*(nbs/\S+\.ipynb)", st["cmd"]).group(1)
    assert nb in st["deps"], f"stage {stage}: its notebook {nb} must be a dependency"
    passed = passed_params(st["cmd"])
    declared = {p if isinstance(p, str) else next(iter(p)) for p in st.get("params", [])}
    assert set(passed.values()) == declared, f"stage {stage}: passes {sorted(passed.values())} but declares {sorted(declared)}"
    for var, key in passed.items():
        assert var == key.replace(".", "_"), f"stage {stage}: `-p {var} ${{{key}}}` must be named {key.replace('.', '_')}"
    cell = parameters_cell(ROOT/nb)
    assert set(cell) == set(passed), f"{nb}: parameters cell has {sorted(cell)}, stage passes {sorted(passed)}"
    for var, key in passed.items():
        assert cell[var] == get_param(key), f"{nb}: default {var} = {cell[var]!r} differs from params.yaml {key} = {get_param(key)!r}"

def test_every_chapter_notebook_with_parameters_has_a_stage():
    staged = {re.search(r"(nbs/\S+\.ipynb)", st["cmd"]).group(1) for st in PAPERMILL.values()}
    for nb in sorted((ROOT/"nbs").glob("[0-9]*.ipynb")):
        src = nb.read_text()
        if '"parameters"' in src: assert f"nbs/{nb.name}" in staged, f"{nb.name} has a parameters cell but no DVC stage"

def test_metrics_are_not_cached_and_outputs_avoid_data():
    for name, st in DVC["stages"].items():
        for m in st.get("metrics", []):
            path, opts = next(iter(m.items())) if isinstance(m, dict) else (m, {})
            assert opts.get("cache") is False, f"stage {name}: metric {path} must have cache: false (committed to git)"
        for o in st.get("outs", []):
            path = next(iter(o)) if isinstance(o, dict) else o
            assert not path.startswith("data/"), f"stage {name}: output {path} overlaps the DVC-tracked data/ folder"

def test_dvc_accepts_the_pipeline():
    dvc = Path(sys.executable).with_name("dvc")
    r = subprocess.run([str(dvc), "dag", "--md"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert r.returncode == 0, r.stderr
    for stage in DVC["stages"]: assert stage in r.stdout

def test_dvc_config_is_offline():
    cfg = (ROOT/".dvc"/"config").read_text()
    assert re.search(r"analytics\s*=\s*false", cfg) and re.search(r"check_update\s*=\s*false", cfg)
    assert "html_template" in cfg
