"""The DVC pipeline's integrity: each papermill stage runs its chapter notebook with no per-key flags, the notebook
reads its own sections of params.yaml, the stage tracks those sections and depends on exactly the package modules the
notebook imports (so code deps cannot drift), schema defaults equal params.yaml, and DVC accepts the graph."""
import ast, importlib, json, os, re, subprocess, sys
from pathlib import Path

import pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT/"dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT/"params.yaml").read_text())
NOTEBOOK_OF = {"core": "nbs/00_core.ipynb", "data": "nbs/01b_data.ipynb", "rag": "nbs/02_rag.ipynb", "sft": "nbs/03_sft.ipynb",
               "dpo": "nbs/04_dpo.ipynb", "eval": "nbs/05_eval.ipynb", "inference": "nbs/06_inference.ipynb",
               "serve": "nbs/07_serving.ipynb", "mlops": "nbs/08_mlops.ipynb", "export": "nbs/09_export.ipynb"}
MODULE_OF = {"feedback": "mlops"}   # stages that run a module's CLI instead of a notebook
CHAPTER_ORDER = ["core", "data", "rag", "sft", "dpo", "eval", "inference", "serve", "mlops", "feedback", "export"]

def notebook_code(nb: str) -> str:
    cells = json.loads((ROOT/nb).read_text())["cells"]
    src = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))

def imported_modules(code: str) -> set[str]:
    "llmtwin_nb modules that `code` imports (any import form)."
    out = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.level:                  # `from .serve import x` inside the package
            mod = "llmtwin_nb" + (f".{node.module}" if node.module else "")
            out |= {f"{mod}.{a.name}" for a in node.names} if not node.module else {mod}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmtwin_nb"):
            out |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "llmtwin_nb" else {node.module}
        elif isinstance(node, ast.Import): out |= {a.name for a in node.names if a.name.startswith("llmtwin_nb.")}
    return {m.split(".")[1] for m in out if m.count(".") >= 1 and (ROOT/"llmtwin_nb"/f"{m.split('.')[1]}.py").exists()}

def module_closure(mods: set[str]) -> set[str]:
    seen, todo = set(), list(mods)
    while todo:
        m = todo.pop()
        if m in seen: continue
        seen.add(m); todo += imported_modules((ROOT/"llmtwin_nb"/f"{m}.py").read_text())
    return seen

def code_deps(stage: str) -> list[str]:
    "The package files a stage's code reads: its notebook's (or module's) imports, transitively."
    mods = imported_modules(notebook_code(NOTEBOOK_OF[stage])) if stage in NOTEBOOK_OF else {MODULE_OF[stage]}
    return [f"llmtwin_nb/{m}.py" for m in sorted(module_closure(mods))]

def parameters_cell(nb: str) -> dict:
    cells = [c for c in json.loads((ROOT/nb).read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{nb}: needs exactly one cell tagged `parameters` (nbdev_clean must keep tags)"
    tree = ast.parse("".join(cells[0]["source"]))
    return {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}

def test_stages_in_chapter_order():
    assert list(DVC["stages"]) == CHAPTER_ORDER

@pytest.mark.parametrize("stage", CHAPTER_ORDER)
def test_stage_runs_its_notebook_without_per_key_flags(stage):
    st = DVC["stages"][stage]
    papermill_args = st["cmd"].split("papermill", 1)[-1] if "papermill" in st["cmd"] else ""
    assert not re.search(r"\s(-p|--parameters)\s", papermill_args), f"stage {stage}: notebooks read params.yaml themselves; drop the -p flags"
    if stage in NOTEBOOK_OF:
        nb = NOTEBOOK_OF[stage]
        assert f"papermill --cwd nbs {nb} results/nb/{Path(nb).name}" in st["cmd"] and nb in st["deps"]
        assert parameters_cell(nb) == {"params_file": "params.yaml"}, f"{nb}: the parameters cell holds only params_file"

@pytest.mark.parametrize("stage", CHAPTER_ORDER)
def test_code_deps_are_the_import_closure(stage):
    listed = sorted(d for d in DVC["stages"][stage]["deps"] if d.startswith("llmtwin_nb/"))
    assert listed == code_deps(stage), f"stage {stage}: list exactly these package deps in dvc.yaml: {code_deps(stage)}"

@pytest.mark.parametrize("stage", [s for s in CHAPTER_ORDER if s in NOTEBOOK_OF])
def test_stage_tracks_the_sections_its_notebook_reads(stage):
    tracked = DVC["stages"][stage]["params"]
    read = set(re.findall(r"""params\[["'](\w+)["']\]""", notebook_code(NOTEBOOK_OF[stage])))
    read_keys = set(re.findall(r"""params\[["'](\w+)["']\]\[["'](\w+)["']\]""", notebook_code(NOTEBOOK_OF[stage])))
    for sec in read:
        keys = {k for s, k in read_keys if s == sec}
        whole = sec in tracked
        assert whole or (keys and all(f"{sec}.{k}" in tracked for k in keys)), \
            f"stage {stage}: its notebook reads params[{sec!r}] but dvc.yaml tracks only {tracked}"
    for p in tracked:
        sec = p.split(".")[0]
        assert sec in PARAMS and (p == sec or p.split(".", 1)[1] in PARAMS[sec]), f"stage {stage}: tracks {p}, not in params.yaml"

def test_schema_defaults_equal_params_yaml():
    "The default profile's values are the schema defaults (in a smoke copy, scripts/smoke.py keeps them in params.default.yaml)."
    from llmtwin_nb.core import PARAM_SECTIONS, package_modules, section_params
    default = ROOT/"params.default.yaml"
    params = yaml.safe_load(default.read_text()) if default.exists() else PARAMS
    for m in package_modules(): importlib.import_module(f"llmtwin_nb.{m}")
    drift = []
    for sec, raw in params.items():
        cls = PARAM_SECTIONS[sec]; validated = section_params(sec, raw).model_dump()
        for k, f in cls.model_fields.items():
            if f.is_required(): assert k in raw, f"params.yaml: `{sec}.{k}` has no default and must be set"; continue
            dflt = section_params(sec, {**raw, k: f.get_default(call_default_factory=True)}).model_dump()[k]
            if dflt != validated[k]: drift.append(f"{sec}.{k}: schema default {dflt!r} != params.yaml {validated[k]!r}")
    assert not drift, "schema defaults drifted from params.yaml:\n  " + "\n  ".join(drift)

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

def module_notebooks() -> dict[str, str]:
    "`{module: notebook file name}` from each notebook's `#| default_exp`."
    out = {}
    for nb in sorted((ROOT/"nbs").glob("[0-9]*.ipynb")):
        m = re.search(r"#\|\s*default_exp\s+(\w+)", nb.read_text())
        if m: out[m.group(1)] = nb.name
    return out

def test_notebook_numbering_follows_the_import_order():
    "A chapter's module imports only modules whose notebooks sort before its own, so reading in file order never jumps ahead."
    nbs = module_notebooks()
    for mod, nb in nbs.items():
        later = sorted(m for m in imported_modules((ROOT/"llmtwin_nb"/f"{mod}.py").read_text()) if m in nbs and nbs[m] > nb)
        assert not later, f"{nb} (module {mod}) imports {later}, whose notebooks come later: {[nbs[m] for m in later]}"

@pytest.mark.parametrize("stage", [s for s in CHAPTER_ORDER if s in NOTEBOOK_OF])
def test_stage_scrubs_its_notebook_and_records_where_its_time_goes(stage):
    """Each notebook stage scrubs its executed notebook (scripts/nb_scrub.py) and adds stage_seconds and per-section phases
    to its first metrics file (scripts/stage_times.py)."""
    st = DVC["stages"][stage]; metrics = next(iter(st["metrics"][0])); executed = f"results/nb/{Path(NOTEBOOK_OF[stage]).name}"
    assert st["cmd"].endswith(f"python scripts/nb_scrub.py {executed} && python scripts/stage_times.py {executed} {metrics}"), \
        f"stage {stage}: papermill, then scrub the executed notebook (it is committed), then record its times"
    assert {"scripts/stage_times.py", "scripts/nb_scrub.py"} <= set(st["deps"])

def test_stage_times_reads_papermill_durations(tmp_path):
    sys.path.insert(0, str(ROOT/"scripts"))
    from stage_times import stage_times
    md = lambda s: dict(cell_type="markdown", source=[s], metadata={})
    code = lambda d: dict(cell_type="code", source=["x = 1"], metadata={"papermill": {"duration": d}}, outputs=[])
    nb = dict(cells=[code(0.5), md("## Load\nwhy"), code(1.0), code(2.0), md("### detail"), code(0.25), md("## Train"), code(3.0)],
              metadata={"papermill": {"duration": 7.9}})
    (tmp_path/"x.ipynb").write_text(json.dumps(nb))
    assert stage_times(tmp_path/"x.ipynb") == dict(stage_seconds=7.9, phases={"setup": 0.5, "Load": 3.2, "Train": 3.0})
    (tmp_path/"y.ipynb").write_text(json.dumps(dict(cells=[], metadata={})))
    with pytest.raises(SystemExit, match="no papermill timing"): stage_times(tmp_path/"y.ipynb")
