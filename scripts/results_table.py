#!/usr/bin/env python
"""Regenerate the README's results section from the DVC metrics in results/*.json (never typed by hand).
Usage: python scripts/results_table.py [--check]   (--check: exit 1 if README.md is out of date)"""
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"

# (file, title, [(key path, label)]) — a key missing from a file is shown as "–"
TABLES = [
    ("core.json", "Core (the machine and the packaged model)",
     [("hardware.cpu", "CPU"), ("hardware.cores", "cores"), ("llm_params_m", "LLM params (M)"), ("decode_tokens_per_s", "decode tokens/s")]),
    ("data.json", "Data (the warehouse holds every author; the twin's documents train it, the others only evaluate it)",
     [("twin", "twin"), ("documents", "documents"), ("words", "words"), ("duplicates_removed", "duplicates removed"), ("pii_masked.total", "PII masked")]),
    ("rag.json", "Retrieval (default configuration)",
     [("hit_at_5", "hit@5"), ("recall_at_5", "recall@5"), ("mrr_at_10", "MRR@10"), ("lexical_overlap_share", "questions with a rare-word giveaway"),
      ("no_lexical_overlap.hit_at_5", "hit@5 without one"), ("latency_ms_p50", "p50 ms"), ("latency_ms_p95", "p95 ms")]),
    ("sft.json", "SFT", [("train_examples", "train examples"), ("train_loss_first", "loss first"), ("train_loss_last", "loss last"),
                         ("eval_loss_base", "eval loss (base)"), ("eval_loss", "eval loss (SFT)"), ("seconds", "seconds")]),
    ("dpo.json", "DPO", [("train_pairs", "train pairs"), ("eval_reward_accuracy", "eval reward accuracy"), ("eval_reward_margin", "eval reward margin"), ("seconds", "seconds")]),
    ("inference.json", "Inference (CPU)", [("kv_cache_speedup", "KV-cache speed-up"), ("batch8_throughput_speedup", "batch-8 throughput speed-up (length bucket)"),
                                           ("batch8_throughput_speedup_arrival_order", "batch-8 speed-up (arrival order)"), ("roofline_bound.bound", "roofline bound"),
                                           ("memory_bandwidth_gbs", "memory bandwidth GB/s"), ("roofline_fraction_batch1", "roofline fraction, batch 1")]),
    ("mlops.json", "MLOps loop (simulated traffic through the real server)",
     [("feedback_records", "feedback records"), ("new_pairs", "new preference pairs"), ("new_sft_rows", "new SFT rows"),
      ("ab_max_abs_error", "A/B split max abs error"), ("drift_score", "drift score"), ("drift_flag", "drift flagged"), ("error_rate", "error rate")]),
    ("serve.json", "Serving", [("requests", "requests"), ("errors", "errors"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("requests_per_s", "requests/s"), ("batching_speedup", "batching speed-up"),
                               ("saturation_rate", "static saturates at (requests/s or burst)"),
                               ("continuous_vs_static_throughput", "continuous / static throughput there"), ("ttft_ms_p95", "TTFT p95 ms, continuous"),
                               ("static_ttft_ms_p95", "TTFT p95 ms, static")]),
]

def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d: return "–"
        d = d[k]
    return f"{d:.3g}" if isinstance(d, float) else str(d)

def ci_pos(t: dict) -> str: return f"{t['value']:.3g} [{t['lo']:.3g}, {t['hi']:.3g}]" if t.get("lo") is not None else f"{t['value']:.3g}"

def stale_stages() -> list[str]:
    "Pipeline stages whose dvc.lock entry no longer matches the code, params or inputs."
    try: r = subprocess.run(["dvc", "status", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired): return []
    try: status = json.loads(r.stdout or "{}")
    except json.JSONDecodeError: return []
    return [s for s in status if not s.endswith(".dvc")]

def commit():
    try: return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "uncommitted"
    except OSError: return "unknown"

def stage_time_rows() -> list[str]:
    "Where the time goes: each stage's wall time and its three longest phases (chapter sections), from its metrics file."
    import yaml
    rows, total = [], 0.0
    for name, st in yaml.safe_load((ROOT/"dvc.yaml").read_text())["stages"].items():
        if not st.get("metrics"): continue
        p = ROOT/next(iter(st["metrics"][0]))
        d = json.loads(p.read_text()) if p.exists() else {}
        if "stage_seconds" not in d: continue
        top = sorted(d.get("phases", {}).items(), key=lambda kv: -kv[1])[:3]
        rows.append(f"| {name} | {d['stage_seconds']:.0f} | " + "; ".join(f"{k} {v:.0f} s" for k, v in top) + " |")
        total += d["stage_seconds"]
    if not rows: return []
    return [f"**Where the time goes** (`stage_seconds` and `phases` in each stage's metrics file; {total / 60:.1f} min over the {len(rows)} stages listed, "
            f"on {get(json.loads((ROOT/'results'/'core.json').read_text()), 'hardware.cpu') if (ROOT/'results'/'core.json').exists() else 'this machine'})", "",
            "| stage | seconds | longest phases |", "|---|---|---|", *rows, ""]

def render() -> str:
    out = [START, "Generated from `results/*.json` by `python scripts/results_table.py` (never typed by hand); "
           "`dvc.lock` in the same commit pins the data, code and params behind every figure.", ""]
    for fname, title, cols in TABLES:
        p = ROOT/"results"/fname
        if not p.exists(): continue
        d = json.loads(p.read_text())
        out += [f"**{title}** (`results/{fname}`)", "", "| " + " | ".join(l for _, l in cols) + " |",
                "|" + "---|" * len(cols), "| " + " | ".join(get(d, k) for k, _ in cols) + " |", ""]
    if (ROOT/"results"/"data.json").exists() and (authors := json.loads((ROOT/"results"/"data.json").read_text()).get("authors")):
        out += ["Documents per author: " + ", ".join(f"{a} {n}" for a, n in authors.items()) + ".", ""]
    if (ROOT/"results"/"eval.json").exists():
        full = json.loads((ROOT/"results"/"eval.json").read_text())
        ev = full.get("models", {})
        js = full.get("judge_sanity")
        judge_valid = isinstance(js, dict) and js.get("valid", js.get("prefers_reference", 0) >= 0.7)   # older files lack `valid`
        jkeys = ["judge_accuracy", "judge_style"] if judge_valid else []
        keys = ["twin_position.value", "twin_score", "perplexity", *jkeys]
        extra = [("perplexity_chat", "perplexity (chat)"), ("lmeval.llmtwin_author_mc.acc", "author MC acc (lm-eval)"), ("ragas.rouge_l", "RAG ROUGE-L (ragas)"), ("repetition.repeated_4gram_share", "repeated 4-gram share")]
        out += ["**Evaluation** (`results/eval.json`)", "", "| model | " + " | ".join([k.split(".")[0] for k in keys] + [l for _, l in extra]) + " |", "|---|" + "---|" * (len(keys) + len(extra))]
        def gv(v, k): r = get(v, k); return "–" if r == "None" else r          # None: e.g. no judgement parsed
        out += [f"| {m} | " + (f"skipped: {v['skipped']} |" if "skipped" in v else " | ".join(gv(v, k) for k in keys + [k for k, _ in extra]) + " |") for m, v in ev.items()] + [""]
        diffs = full.get("differences", {})
        dkeys = ["twin_score", "twin_score_by_document", "perplexity", "perplexity_chat", *jkeys]
        def ci(d):
            if not isinstance(d, dict) or "lo" not in d: return "–"
            few = "†" if d.get("n", 0) < 30 else ""
            return f"{d['diff']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}] n={d.get('n', '?')}{few}"
        if diffs:
            out += ["Differences with 95% paired-bootstrap intervals (n = paired items; twin_score_by_document resamples whole "
                    "held-out documents, n = documents; † fewer than 30: an interval, not a claim):", "", "| pair | " + " | ".join(dkeys) + " |", "|---|" + "---|" * len(dkeys)]
            out += [f"| {p} | " + " | ".join(ci(d.get(k)) for k in dkeys) + " |" for p, d in diffs.items()] + [""]
        if isinstance(js, dict) and "prefers_reference" in js:
            out += [f"Judge: {full.get('judge')}; sanity check on {js['items']} items: it scores the author's own reference "
                    f"{js['reference_as_answer']} vs another item's {js['other_reference_as_answer']} (prefers the reference on "
                    f"{js['prefers_reference']:.0%} of items; 50% = cannot tell)."
                    + ("" if judge_valid else f" Below the {js.get('min_prefers_reference', 0.7):.0%} a judge must reach "
                       "(`judge_sanity.valid: false`), so its scores are left out of these tables; chapter 05 shows them."), ""]
        cal = full.get("calibration", {})
        if cal and "ceiling" not in cal:
            out += ["This `results/eval.json` predates the calibrated, author-agnostic twin metric (`dvc repro eval` regenerates it): "
                    "its twin_score comes from the earlier hand-tuned classifier.", ""]
        elif cal:
            out += [f"Twin metric, calibrated on held-out documents: the twin's own text scores {get(cal, 'ceiling')} (ceiling, "
                    f"twin_position 1), the other author's {get(cal, 'floor')} (floor, twin_position 0); the metric tells the two "
                    f"authors apart with AUC {get(cal, 'author_vs_other_auc')}."
                    + (f" The author's own held-out text, cut to the models' answer length, repeats "
                       f"{get(cal, 'author_repeated_4gram_share')} of its word 4-grams (the bar for the models' repeated 4-gram share)."
                       if "author_repeated_4gram_share" in cal else ""), ""]
            tp = [(m, v["twin_position"]) for m, v in ev.items() if isinstance(v.get("twin_position"), dict)]
            if tp: out += ["twin_position with 95% bootstrap intervals: " + ", ".join(f"{m} {ci_pos(t)}" for m, t in tp) + ".", ""]
    out += stage_time_rows()
    if stale := stale_stages():
        out += [f"Not yet re-run since the code or params changed (`dvc status`): {', '.join(stale)}. Their figures above come "
                "from the last run of those stages; `dvc repro` brings them up to date.", ""]
    out.append(END)
    return "\n".join(out)

def main():
    readme = ROOT/"README.md"; text = readme.read_text()
    if START not in text or END not in text: sys.exit(f"README.md lacks the {START} ... {END} markers")
    new = text[:text.index(START)] + render() + text[text.index(END) + len(END):]
    if "--check" in sys.argv:
        if new != text: sys.exit("README.md results are out of date: run python scripts/results_table.py")
        return
    readme.write_text(new); print("README.md results section updated")

if __name__ == "__main__": main()
