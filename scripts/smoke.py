"""Run the pipeline on the smoke profile in a throwaway copy of the working tree.

The copy holds the files git tracks plus the untracked ones it does not ignore (so uncommitted work is tested too),
its params.yaml is params.yaml + params-smoke.yaml + the overrides given here, and `dvc repro` runs there: the
workspace's results/, dvc.lock, params.yaml and artifacts stay exactly as they were.

    python scripts/smoke.py DEST [section.key=value ...]     e.g.  python scripts/smoke.py /tmp/mv "data.author=Marisol Vega"
    python scripts/smoke.py --default DEST [overrides ...]   the same on the default profile (a full run, ~25+ min)
    python scripts/smoke.py --until STAGE DEST [overrides ...] only STAGE and the stages it needs (`dvc repro STAGE`), e.g. eval
"""
import os, shutil, subprocess, sys, time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

def copy_worktree(dest: Path):
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT/f
        if not src.is_file(): continue            # deleted in the working tree, or a submodule folder
        (dest/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, dest/f)

def smoke_params(overrides: list[str], profile: str = "smoke") -> dict:
    "params.yaml + params-smoke.yaml (unless the default profile is asked for) + `section.key=value` overrides, validated."
    from llmtwin_nb.core import load_params, parse_override
    smoke = (yaml.safe_load((ROOT/"params-smoke.yaml").read_text()) or {}) if profile == "smoke" else {}
    flat = {f"{section}.{k}": v for section, values in smoke.items() for k, v in values.items()}
    return load_params(ROOT/"params.yaml", {**flat, **dict(map(parse_override, overrides))})

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    profile = "default" if argv[:1] == ["--default"] else "smoke"
    argv = argv[1:] if profile == "default" else argv
    until, argv = (argv[1:2], argv[2:]) if argv[:1] == ["--until"] else ([], argv)
    if not argv or argv[0].startswith("-"): sys.exit(__doc__)
    dest, overrides = Path(argv[0]).resolve(), argv[1:]
    params = smoke_params(overrides, profile)
    if dest.exists(): shutil.rmtree(dest)
    dest.mkdir(parents=True); copy_worktree(dest)
    # the copy runs on the smoke values; the default profile stays beside it for tests that check schema defaults
    shutil.copy2(ROOT/"params.yaml", dest/"params.default.yaml")
    (dest/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    git = ["git", "-c", "user.name=smoke", "-c", "user.email=smoke@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "smoke copy"]): subprocess.run(git + cmd, cwd=dest, check=True)
    env = {**os.environ, "PYTHONPATH": f"{dest}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(f"{profile} pipeline{' up to ' + until[0] if until else ''} in {dest} ({' '.join(overrides) or 'no overrides'})", flush=True)
    t0 = time.time(); rc = subprocess.run(["dvc", "repro", *until], cwd=dest, env=env).returncode
    print(f"{profile} pipeline: exit {rc} in {time.time() - t0:.0f}s", flush=True)
    return rc

if __name__ == "__main__": sys.exit(main())
