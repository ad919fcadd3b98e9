"""The MLOps loop (chapter 08): the feedback log under concurrent writers (threads and processes) and a torn write,
the A/B split, prompt templates, feedback -> training rows, drift, the loop end to end (simulated users through
chapter 07's real service on loopback -> the feedback stage -> the SFT and DPO data loaders), and DVC rerunning the
feedback stage and only the training stage whose file changed when the logs change.
(The feedback endpoint and the in-app A/B split on the real app are tested in test_serve.py.)"""
import json, os, shutil, subprocess, sys, textwrap, threading
from pathlib import Path
from types import SimpleNamespace

import pytest, yaml

from llmtwin_nb.instruct import append_feedback_sft
from llmtwin_nb.mlops import (FEEDBACK_STAGE_PARAMS, OFF_TOPIC_QUESTIONS, build_feedback_data, cost_per_variant, drift_check,
                              feedback_to_data, run_simulation, sim_requests, topic_questions, training_reference)
from llmtwin_nb.prompts import PromptRegistry
from llmtwin_nb.core import parse_weights
from llmtwin_nb.routing import ABRouter, assign_variant
from llmtwin_nb.traces import FeedbackLog, read_traces

ROOT = Path(__file__).resolve().parents[1]
PAD = "x" * 6000          # records larger than PIPE_BUF (4096): without the lock and one write they could interleave


def _writer_script(path, tag, threads, n):
    return textwrap.dedent(f"""
        import threading
        from llmtwin_nb.traces import FeedbackLog
        log = FeedbackLog({str(path)!r})
        def w(t):
            for j in range({n}): log.append({{"tag": {tag!r}, "t": t, "j": j, "pad": {PAD!r}}})
        ts = [threading.Thread(target=w, args=(t,)) for t in range({threads})]
        [t.start() for t in ts]; [t.join() for t in ts]
    """)


def test_concurrent_appends_from_threads_and_processes_stay_intact(tmp_path):
    path = tmp_path/"fb.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", _writer_script(path, f"p{i}", 4, 40)]) for i in range(2)]
    log = FeedbackLog(path)
    ts = [threading.Thread(target=lambda t=t: [log.append({"tag": "main", "t": t, "j": j, "pad": PAD}) for j in range(40)]) for t in range(6)]
    [t.start() for t in ts]; [t.join() for t in ts]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    r = log.read()
    assert r.corrupt == []
    assert len(r.records) == 2 * 4 * 40 + 6 * 40
    assert len({(x["tag"], x["t"], x["j"]) for x in r.records}) == len(r.records)
    assert all(x["pad"] == PAD for x in r.records)
    assert len(path.read_bytes().splitlines()) == len(r.records)      # one record per line, no interleaving


def test_torn_write_is_detected_and_loses_nothing_else(tmp_path):
    log = FeedbackLog(tmp_path/"fb.jsonl")
    for i in range(20): log.append({"i": i, "pad": PAD})
    # a crash in the middle of a write: the process died after writing part of its record
    half = FeedbackLog.encode({"i": 20, "pad": PAD})[:3000]
    fd = os.open(log.path, os.O_WRONLY | os.O_APPEND); os.write(fd, half); os.close(fd)
    r = log.read()
    assert [x["i"] for x in r.records] == list(range(20))
    assert len(r.corrupt) == 1 and r.corrupt[0]["reason"].startswith("torn") and r.corrupt[0]["line"] == 21
    log.append({"i": 21})                             # the next append starts on a new line
    r = log.read()
    assert [x["i"] for x in r.records] == list(range(20)) + [21] and len(r.corrupt) == 1
    # a flipped byte inside an otherwise well-formed line fails the checksum
    lines = log.path.read_bytes().split(b"\n"); lines[5] = lines[5].replace(b"xxxx", b"xxxz", 1)
    log.path.write_bytes(b"\n".join(lines))
    r = log.read()
    assert len(r.records) == 20 and sorted(c["reason"] for c in r.corrupt)[0] == "checksum mismatch"


def test_ab_split_holds_its_ratio_and_is_stable_across_processes():
    keys = [f"user-{i}" for i in range(2000)]
    for spec in ("a=0.5,b=0.5", "a=0.9,b=0.1", "control=0.7,candidate=0.3"):
        w = parse_weights(spec)
        obs = ABRouter({k: k for k in w}, spec, "salt-1").observed_split(keys)
        for k in w: assert abs(obs[k] - w[k]) < 0.03, (spec, obs)
    here = [assign_variant(k, "a=0.7,b=0.3", "salt-1") for k in keys[:300]]
    code = ("import json; from llmtwin_nb.routing import assign_variant; "
            f"print(json.dumps([assign_variant(f'user-{{i}}', 'b=0.3,a=0.7', 'salt-1') for i in range(300)]))")
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                                      env={**os.environ, "PYTHONHASHSEED": "123"}).stdout)
    assert here == other
    ab = ABRouter({"a": "backend-a", "b": "backend-b"}, "a=0.7,b=0.3", "salt-1")
    assert ab.route("user-1") == (here[1], f"backend-{here[1]}") and ab.served[here[1]] == 1
    with pytest.raises(ValueError, match="must match"): ABRouter({"a": 1}, "a=0.5,b=0.5")


def test_prompt_templates_match_what_the_twin_was_trained_with():
    from llmtwin_nb.instruct import SYSTEM_PROMPT
    reg = PromptRegistry(ROOT/"prompts")
    msgs, tid = reg.render("rag_answer", question="Q?", context="[1] c")
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == "Sources:\n[1] c\n\nQuestion: Q?"
    assert tid.startswith("rag_answer@v1#") and reg.get("rag_answer@v1").template_id == tid
    assert reg.get("twin_chat").render(author="A", question="hi")[0]["content"] == SYSTEM_PROMPT.format(author="A")


def _traces_and_feedback():
    T = lambda i, q, a, **kw: dict(dict(trace_id=f"t{i}", ts=f"2026-01-01T00:00:{i:02d}Z", question=q, answer=a, status=200), **kw)
    fix = "Parquet files and exact search on a laptop were enough for 410,000 vectors. Write to ilse@example.com."
    traces = [T(1, "How do you keep a vector index cheap?", "Buy a bigger managed cluster."),
              T(2, "How do you keep your vector index cheap?", "Buy a bigger managed cluster, always."),
              T(3, "What broke?", "It failed.", status=500),
              T(4, "Why evals first?", "Because evals tell you whether fine-tuning helped at all, so write them first.")]
    fb = [dict(trace_id="t1", rating=1, corrected_text=fix), dict(trace_id="t2", rating=2, corrected_text=fix),
          dict(trace_id="t3", rating=1), dict(trace_id="t4", rating="up")]
    return traces, fb


def test_feedback_becomes_pairs_masked_and_deduplicated():
    traces, fb = _traces_and_feedback()
    pairs, sft, rep = feedback_to_data(fb, traces, author="Ilse Marchetti")
    assert [p["trace_id"] for p in pairs] == ["t1"]                           # t2 is the same correction: a duplicate
    p = pairs[0]
    assert p["chosen"][0]["content"].endswith("Write to [EMAIL].") and p["rejected"][0]["content"] == "Buy a bigger managed cluster."
    assert p["prompt"][0]["content"] == "You are Ilse Marchetti. Write in your own voice." and p["split"] == "train"
    assert sorted(r["trace_id"] for r in sft) == ["t1", "t4"]                # correction + an answer rated up
    assert rep["pairs_dropped_duplicate"] == 1 and rep["dropped_failed_request"] == 1
    assert "@example.com" not in json.dumps(pairs + sft)
    ev = {"qa": [{"id": "e1", "text": "How do you keep a vector index cheap? Parquet files and exact search on a laptop were enough."}]}
    pairs2, _, rep2 = feedback_to_data(fb, traces, evalsets=ev, decontam_ngram=8, author="Marisol Vega")
    assert pairs2 == [] and rep2["pairs_dropped_contaminated"] == 1          # shares an 8-gram with the evaluation item
    _, sft3, _ = feedback_to_data(fb, traces, author="Marisol Vega")          # the name is data.author's, whoever the twin is
    assert {r["prompt"][0]["content"] for r in sft3} == {"You are Marisol Vega. Write in your own voice."}
    with pytest.raises(TypeError): feedback_to_data(fb, traces)                                  # no guessing a name
    with pytest.raises(ValueError, match="data.author"): feedback_to_data(fb, traces, author="")


def test_drift_is_higher_for_off_topic_questions():
    from llmtwin_nb.core import load_embedder
    emb = load_embedder("packaged:minilm", "cpu")
    ref = ["Write a LinkedIn post about vector databases, Parquet and cost.", "Write the section of your article on p95 latency and benchmarks.",
           "Write about evaluation sets before fine-tuning a language model.", "Write a post about embedding documents on a CPU without a GPU.",
           "Write the part of the README that covers the pondlet command line.", "Write about batching requests to an LLM server."]
    on = ["How much does a hosted vector database cost?", "Why report p95 latency?", "Do I need a GPU to embed documents?", "Should I write evals first?"]
    off = ["What is a good lasagne recipe?", "How do I repot an orchid?", "Who won the 1998 world cup?", "Plan a weekend in Lisbon."]
    enc = lambda xs: emb.encode(xs, normalize_embeddings=True)
    d_on, d_off = drift_check(enc(on), enc(ref), permutations=50), drift_check(enc(off), enc(ref), permutations=50)
    assert d_off["drift_score"] > d_on["drift_score"] + 0.15 and d_off["ood_share"] > d_on["ood_share"]


DOC_TEXTS = [
    ("Why not a vector database", "post", "Tidewater switched off its hosted vector store. It cost 1,140 euros a month for 410,000 vectors, and "
     "Parquet files with exact search on a laptop were enough for every query we had. Nobody noticed the difference in latency, and the "
     "finance team noticed the difference in the bill. Boring technology wins again when the data is small."),
    ("Measure p95, not the mean", "article", "A mean hides the slow requests your users remember. Report p50 and p95 latency, and the "
     "hardware they were measured on, or the number means nothing. We learned this when a dashboard said 80 ms and the support queue said "
     "otherwise: one request in twenty took four seconds, and those were the ones people complained about."),
]


def _instruct_train(tok, n=6):
    "A small train split in the SFT chapter's instruct schema."
    from datasets import Dataset
    from llmtwin_nb.instruct import SYSTEM_PROMPT, chat_example, example_tokens
    row = chat_example(SYSTEM_PROMPT.format(author="Ilse Marchetti"), "Why p95?", "Because the mean hides the slow requests users remember.")
    return Dataset.from_list([dict(row, doc_id=f"{i:016x}", platform="medium", kind="article", title="t", instruction_source="template_budget",
                                   tokens=example_tokens(tok, row), answer_chars=56) for i in range(n)])


def test_the_loop_served_traffic_becomes_training_rows(tmp_path):
    """Simulated users through chapter 07's real app (one app, its own A/B split, uvicorn on loopback) into a logs folder;
    the feedback stage's function turns the logs into rows; the SFT and DPO loaders grow by exactly those rows."""
    from transformers import AutoTokenizer
    from llmtwin_nb.core import load_embedder, resolve_model, section_params
    from llmtwin_nb.dpo import check_pairs, load_feedback_pairs
    from llmtwin_nb.sources import EmbeddingRetriever
    docs = [SimpleNamespace(id=f"{i:016x}", title=t, kind=k, platform="linkedin" if k == "post" else "medium", content=c, split="train",
                            author="Ilse Marchetti") for i, (t, k, c) in enumerate(DOC_TEXTS)]
    emb = load_embedder("packaged:minilm", "cpu")
    retriever = EmbeddingRetriever([dict(id=d.id, title=d.title, text=d.content) for d in docs], embedder=emb)
    reqs = sim_requests(docs, {}, 24, rag_fraction=0.3, offtopic_fraction=0.5, recent=8, seed=1)
    logs, split, salt = tmp_path/"logs", "a=0.5,b=0.5", "t"
    stats = run_simulation(reqs, serve_cfg=dict(reranker="none", top_k=1, context_tokens=64, max_batch_size=8, prompts_dir=str(ROOT/"prompts"),
                                                variants="a=packaged:smollm2-135m-instruct,b=packaged:smollm2-135m-instruct", split=split, ab_salt=salt),
                           logs_dir=logs, embedder=emb, prompts=PromptRegistry(ROOT/"prompts"), author="Ilse Marchetti", max_tokens=4,
                           concurrency=8, correct_fraction=1.0, failures=1, retriever=retriever, device="cpu", seed=3, log=lambda *a: None)
    tr, fb = read_traces(logs/"traces.jsonl"), FeedbackLog(logs/"feedback.jsonl").read()
    assert stats["requests"] == 24 and len(tr) == 24 and fb.corrupt == []
    assert stats["feedback_http"][404] == 1 and stats["feedback_http"][400] == 2 and stats["feedback_http"][200] == len(fb.records)
    # the server assigned every request by its user key, and every trace says who served and with which template
    assert {t["variant"] for t in tr} == {"a", "b"} and all(t["variant"] == assign_variant(t["user"], split, salt) for t in tr)
    assert {t["template_id"].split("#")[0] for t in tr} == {"chat", "rag_answer@v1"} and any(t["status"] == 500 for t in tr)
    assert all(f["variant"] in ("a", "b") and f["template_id"] for f in fb.records)
    # accounting: every trace is priced (a failed one at 0), and cost_per_variant adds them up per variant
    prices = section_params("serve", {})
    assert all(t["cost_usd"] == (prices.cost_usd(t["answered_by"], t["prompt_tokens"], t["completion_tokens"]) if t["status"] == 200 else 0.0)
               and t["prompt_tokens"] > 0 for t in tr)
    cost = cost_per_variant(tr, root=ROOT)
    assert set(cost) == {"a", "b"} and sum(c["requests"] for c in cost.values()) == 24 and all(c["priced_requests"] == c["requests"] for c in cost.values())
    assert abs(sum(c["cost_usd"] for c in cost.values()) - sum(t["cost_usd"] for t in tr)) < 1e-9 and all(c["cost_usd"] > 0 for c in cost.values())
    assert all(c["answered_by"] == {"packaged:smollm2-135m-instruct": c["priced_requests"]} for c in cost.values())
    # the feedback stage's function
    cfg = section_params("mlops", logs_dir=str(logs), out_dir=str(tmp_path/"feedback"))
    rep = build_feedback_data(logs, tmp_path/"feedback", cfg, author="Ilse Marchetti", docs=docs, evalsets={})
    pairs_file, sft_file = tmp_path/"feedback"/"preference.jsonl", tmp_path/"feedback"/"sft.jsonl"
    assert rep["feedback_records"] == len(fb.records) and rep["new_pairs"] > 0 and rep["new_sft_rows"] > 0
    assert len(pairs_file.read_text().splitlines()) == rep["new_pairs"] and len(sft_file.read_text().splitlines()) == rep["new_sft_rows"]
    assert "@example.com" not in pairs_file.read_text() + sft_file.read_text() and rep["author"] == "Ilse Marchetti"
    assert {p["prompt"][0]["content"] for p in map(json.loads, pairs_file.read_text().splitlines())} == {"You are Ilse Marchetti. Write in your own voice."}
    # DPO: the chapter's loader appends exactly the new pairs to the training pairs
    fb_pairs = load_feedback_pairs(pairs_file)
    base_pairs = [dict(prompt=[{"role": "user", "content": f"Q{i}?"}], chosen=[{"role": "assistant", "content": "The author's answer."}],
                       rejected=[{"role": "assistant", "content": "Certainly! Here are some points."}], doc_id=f"d{i}", split="train") for i in range(5)]
    train = base_pairs + fb_pairs
    assert len(train) == len(base_pairs) + rep["new_pairs"] and check_pairs(train) == len(train)
    assert all(p["doc_id"].startswith("feedback-") and set(p) == set(base_pairs[0]) for p in fb_pairs)
    # SFT: append_feedback_sft grows the instruct train split by exactly the new rows, in its schema
    tok = AutoTokenizer.from_pretrained(resolve_model("packaged:smollm2-135m-instruct"))
    inst = _instruct_train(tok)
    grown, srep = append_feedback_sft(inst, sft_file, tok, 1024)
    assert len(grown) == len(inst) + rep["new_sft_rows"] and srep["feedback_rows"] == rep["new_sft_rows"]
    assert grown.column_names == inst.column_names and grown["platform"].count("feedback") == rep["new_sft_rows"]
    assert all(d is None for d, p in zip(grown["doc_id"], grown["platform"]) if p == "feedback")


def _run(cmd, cwd, **kw):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"}, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_dvc_reruns_the_feedback_stage_and_only_the_training_stage_whose_rows_changed(tmp_path):
    """The repository's own `feedback` stage (its command, logs-folder dependency, params and outputs) in a scratch DVC
    project, with stand-ins for sft and dpo that depend on its files as the real stages do: a fresh clone (logs/ with
    only a README) runs and writes empty files; new logs rerun it; then only the training stage whose rows changed reruns."""
    real = yaml.safe_load((ROOT/"dvc.yaml").read_text())["stages"]
    stage = real["feedback"]
    dvc = str(Path(sys.executable).with_name("dvc"))
    (tmp_path/"logs").mkdir(); shutil.copy(ROOT/"logs"/"README.md", tmp_path/"logs"/"README.md")
    real_params, params = yaml.safe_load((ROOT/"params.yaml").read_text()), {}
    for p in stage["params"]:                                      # what the stage tracks (sections or section.key), as in params.yaml
        sec, _, key = p.partition(".")
        if key: params.setdefault(sec, {})[key] = real_params[sec][key]
        else: params[sec] = real_params[sec]
    (tmp_path/"params.yaml").write_text(yaml.safe_dump(params))
    count = "python -c \"import sys; print(sum(1 for _ in open(sys.argv[1])))\" {} > {}"
    stages = {"feedback": dict(cmd=stage["cmd"], deps=[d for d in stage["deps"] if d.startswith("${")], params=stage["params"], outs=stage["outs"]),
              "sft": dict(cmd=count.format("artifacts/feedback/sft.jsonl", "sft.txt"), deps=["artifacts/feedback/sft.jsonl"], outs=["sft.txt"]),
              "dpo": dict(cmd=count.format("artifacts/feedback/preference.jsonl", "dpo.txt"), deps=["artifacts/feedback/preference.jsonl"], outs=["dpo.txt"])}
    assert "artifacts/feedback/preference.jsonl" in real["dpo"]["deps"]
    (tmp_path/"dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    _run([dvc, "init", "--no-scm", "-q"], tmp_path)
    ran = lambda out: {s for s in ("feedback", "sft", "dpo") if f"Running stage '{s}'" in out}
    assert ran(_run([dvc, "repro"], tmp_path)) == {"feedback", "sft", "dpo"}                  # a fresh clone: no feedback yet
    assert (tmp_path/"sft.txt").read_text().strip() == "0" and (tmp_path/"dpo.txt").read_text().strip() == "0"
    assert "up to date" in _run([dvc, "status"], tmp_path)
    T = lambda i, q, a: dict(trace_id=f"t{i}", ts=f"2026-01-01T00:00:{i:02d}Z", question=q, answer=a, status=200, variant="a")
    traces = [T(1, "How do you keep a vector index cheap?", "Buy a bigger managed cluster."),
              T(2, "Why write evals first?", "Evals tell you whether fine-tuning helped, so write them before training anything."),
              T(3, "Why write evals first?", "No idea at all, really, none whatsoever.")]
    with open(tmp_path/"logs"/"traces.jsonl", "w") as f: f.writelines(json.dumps(t) + "\n" for t in traces)
    log = FeedbackLog(tmp_path/"logs"/"feedback.jsonl")
    log.append(dict(trace_id="t1", rating=1, corrected_text="Parquet files and exact search on a laptop were enough for 410,000 vectors."))
    st = _run([dvc, "status"], tmp_path)
    assert "feedback" in st and "modified" in st and "logs" in st                               # the logs folder changed
    assert ran(_run([dvc, "repro"], tmp_path)) == {"feedback", "sft", "dpo"}                  # a correction: a new SFT row and a new pair
    assert ((tmp_path/"sft.txt").read_text().strip(), (tmp_path/"dpo.txt").read_text().strip()) == ("1", "1")
    log.append(dict(trace_id="t2", rating=5))                       # a well-rated answer: a new SFT row, no pair yet
    assert ran(_run([dvc, "repro"], tmp_path)) == {"feedback", "sft"} and (tmp_path/"sft.txt").read_text().strip() == "2"
    log.append(dict(trace_id="t3", rating=1))                       # a poor answer to the same question: a new pair, no new SFT row
    assert ran(_run([dvc, "repro"], tmp_path)) == {"feedback", "dpo"} and (tmp_path/"dpo.txt").read_text().strip() == "2"
    log.append(dict(trace_id="t-unknown", rating=4))                # nothing usable: no training stage reruns
    assert ran(_run([dvc, "repro"], tmp_path)) == {"feedback"}


def test_pipeline_wiring_of_the_loop():
    "feedback is upstream of the training stages, depends on the logs folder (in git with its README), and nothing in the pipeline writes into it."
    real = yaml.safe_load((ROOT/"dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT/"params.yaml").read_text())
    fb, logs_dir = real["feedback"], params["mlops"]["logs_dir"]
    assert "${mlops.logs_dir}" in fb["deps"] and (ROOT/logs_dir/"README.md").exists()
    assert subprocess.run(["git", "ls-files", "--error-unmatch", f"{logs_dir}/README.md"], cwd=ROOT, capture_output=True).returncode == 0, \
        "the logs folder must be in git (with its README) so a fresh clone has the feedback stage's dependency"
    tracked = set(fb["params"])                                    # whole sections or section.key
    assert all(p in tracked or p.split(".")[0] in tracked for p in FEEDBACK_STAGE_PARAMS), (sorted(tracked), FEEDBACK_STAGE_PARAMS)
    assert "data.author" in FEEDBACK_STAGE_PARAMS                  # the twin's name in the rows' system prompt
    assert fb["outs"] == ["artifacts/feedback/sft.jsonl", "artifacts/feedback/preference.jsonl"]
    assert "artifacts/feedback/preference.jsonl" in real["dpo"]["deps"] and {"dpo", "dpo.feedback_pairs"} & set(real["dpo"]["params"])
    outs = {next(iter(o)) if isinstance(o, dict) else o for st in real.values() for o in st.get("outs", [])}
    assert not any(o == logs_dir or o.startswith(logs_dir.rstrip("/") + "/") for o in outs), "no stage may write into the collected logs"
    assert not Path(params["serve"]["trace_path"]).is_relative_to(logs_dir), "the serve stage's own load test must not log into logs_dir"
    assert not {"artifacts/feedback/sft.jsonl", "artifacts/feedback/preference.jsonl"} & {next(iter(o)) if isinstance(o, dict) else o
                                                                                        for o in real["mlops"].get("outs", [])}


def test_sft_stage_reads_the_feedback_rows():
    "The sft stage must depend on the feedback stage's SFT rows (the lead wires nbs/03_sft.ipynb to append_feedback_sft)."
    sft = yaml.safe_load((ROOT/"dvc.yaml").read_text())["stages"]["sft"]
    assert "artifacts/feedback/sft.jsonl" in sft["deps"], "add artifacts/feedback/sft.jsonl to the sft stage's deps"


def test_simulation_and_drift_questions_come_from_the_twins_own_material():
    "Any author: on-topic questions from the twin's documents and evaluation questions about them, never another author's."
    mine = [SimpleNamespace(id=f"{i:016x}", title=t, kind=k, platform="medium", content=c, split=sp, author="Marisol Vega")
            for i, ((t, k, c), sp) in enumerate(zip(DOC_TEXTS, ("train", "test")))]
    ev = {"retrieval": [dict(id="q1", text="x", question="What did the hosted store cost?", doc_ids=[mine[0].id], source="gold"),
                        dict(id="q2", text="y", question="Another author's question?", doc_ids=["ffffffffffffffff"], source="gold"),
                        dict(id="q3", text="z", question="What is said about hosted and store?", doc_ids=[mine[0].id], source="generated")]}
    qs = topic_questions(mine, ev, 6, seed=0)
    held = [q for q in qs if q.startswith("What have you written about ")]
    assert len(qs) == 6 and set(qs) - set(held) == {"What did the hosted store cost?"} and held
    assert all(w in mine[1].content for q in held for w in q[28:-1].replace(" and ", ", ").split(", "))   # the held-out doc's key words
    assert not set(qs) & set(training_reference(mine))               # not the reference itself: the drift check has something to measure
    with pytest.raises(ValueError, match="dvc repro"): topic_questions([], ev)
    reqs = sim_requests(mine, ev, 60, eval_fraction=0.5, offtopic_fraction=0.5, recent=20, seed=2)
    kinds = {r["kind"] for r in reqs}
    assert kinds == {"on", "eval", "off"}
    assert {r["question"] for r in reqs if r["kind"] == "eval"} == {"What did the hosted store cost?", "What is said about hosted and store?"}   # not q2
    assert {r["question"] for r in reqs if r["kind"] == "off"} <= set(OFF_TOPIC_QUESTIONS)
    assert all(r["ideal"] in mine[0].content for r in reqs if r["kind"] == "on")     # from the twin's train document
