"""No absolute machine paths in committed files: results, notebooks, params, prompts and dvc.yaml must read the same on
any clone. A path like /work/main/models/dpo/merged or C:\\Users\\me\\llmtwin works only on the machine that wrote it;
write paths relative to the repository root (core.get_paths() resolves them) instead."""

import re, subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["results", "nbs", "prompts", "dvc.yaml", "params*.yaml"]
ABSOLUTE = re.compile(
    r"(?<![\w.:/~%-])/(?:work|tmp|home|root|Users|mnt|private/var|var/folders|opt/conda)/[^\s\"'`)]*"   # POSIX roots of machines
    r"|file:///[^\s\"'`)]+"                                                                           # file URLs
    r"|(?<![A-Za-z])[A-Za-z]:\\{1,2}(?:Users|Windows|Program Files|Documents and Settings|[\w.-]+\\)[^\s\"']*")   # C:\Users\...


def scanned_files() -> list[Path]:
    "The files git tracks (or would: untracked, not ignored) under the scanned paths."
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z", "--", *SCANNED], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode().split("\0")
    return [ROOT / f for f in out if f and (ROOT / f).is_file()]


def offenders(path: Path) -> list[tuple[int, str]]:
    "(line number, the absolute path) for every absolute machine path in a text file; nothing for binary files."
    data = path.read_bytes()
    if b"\0" in data[:8192]: return []
    text = data.decode("utf-8", errors="replace")
    return [(i, m.group(0)[:120]) for i, line in enumerate(text.splitlines(), 1) for m in ABSOLUTE.finditer(line)]


def test_the_pattern_catches_machine_paths_and_spares_urls_and_relative_paths():
    hits = lambda s: [m.group(0) for m in ABSOLUTE.finditer(s)]
    assert hits('"model": "/work/main/models/dpo/merged"') == ["/work/main/models/dpo/merged"]
    assert hits("data_files: {test: /tmp/pytest-1/items.jsonl}") == ["/tmp/pytest-1/items.jsonl}"]
    assert hits('"path": "/home/ilse/llmtwin/artifacts"') and hits("cwd=/root/.cache/x") and hits("see file:///srv/x.html")
    assert hits(r'"C:\\Users\\me\\llmtwin\\results"') and hits(r"D:\work\llmtwin")
    assert not hits("https://example.org/home/about and https://x.io/tmp/a, models/dpo/merged, ../tmp/x, ~/.cache/llmtwin_nb")
    assert not hits(r'regex "(?:\\s+)" and a ratio 3:\\d')


def test_committed_files_hold_no_absolute_machine_paths():
    files = scanned_files()
    assert any(f.suffix == ".ipynb" for f in files), f"nothing scanned under {SCANNED}?"
    bad = [f"{f.relative_to(ROOT)}:{line}: {p}" for f in files for line, p in offenders(f)]
    assert not bad, (f"{len(bad)} absolute machine path(s) in committed files (a clone elsewhere cannot use them; write paths "
                     "relative to the repository root, or fix the code that wrote them and rerun its stage):\n  " + "\n  ".join(bad[:40]))
