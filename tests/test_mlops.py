"""The MLOps loop (chapter 08): the feedback log under concurrent writers (threads and processes) and a torn
write, the feedback endpoint, the A/B split, prompt templates, feedback -> training rows, drift, and a few dozen
requests with feedback through chapter 07's real service on loopback followed by the loop's data function."""
import json, os, subprocess, sys, textwrap, threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from llmtwin_nb.mlops import (ABRouter, FeedbackLog, PromptRegistry, TraceIndex, assign_variant, drift_check, feedback_router,
                              feedback_to_data, parse_weights, read_traces, run_simulation, sim_requests, training_reference)

ROOT = Path(__file__).resolve().parents[1]
PAD = "x" * 6000          # records larger than PIPE_BUF (4096): without the lock and one write they could interleave


def _writer_script(path, tag, threads, n):
    return textwrap.dedent(f"""
        import threading
        from llmtwin_nb.mlops import FeedbackLog
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


def test_feedback_endpoint_validates_masks_and_checks_the_trace(tmp_path):
    traces = tmp_path/"traces.jsonl"
    traces.write_text(json.dumps({"trace_id": "abc123", "answer": "hi", "model": "llmtwin-a"}) + "\n")
    app = FastAPI(); app.include_router(feedback_router(FeedbackLog(tmp_path/"fb.jsonl"), TraceIndex(traces)))
    c = TestClient(app)
    r = c.post("/feedback", json={"trace_id": "abc123", "rating": "down", "corrected_text": "Call me on +31 6 1234 5678.", "user": "u1"})
    assert r.status_code == 200 and r.json()["rating"] == 1 and r.json()["id"]
    rec = FeedbackLog(tmp_path/"fb.jsonl").records()[0]
    assert "1234 5678" not in rec["corrected_text"] and rec["model"] == "llmtwin-a" and rec["rating_raw"] == "down"
    assert c.post("/feedback", json={"trace_id": "missing", "rating": 4}).status_code == 404
    with open(traces, "a") as f: f.write(json.dumps({"trace_id": "later"}) + "\n")        # written after the index was built
    assert c.post("/feedback", json={"trace_id": "later", "rating": 4}).status_code == 200
    for bad in ({"trace_id": "abc123", "rating": 0}, {"trace_id": "abc123", "rating": 4.5}, {"trace_id": "abc123", "rating": "meh"},
                {"rating": 3}, {"trace_id": "abc123", "rating": 3, "corrected_text": 5}, {"trace_id": "abc123", "rating": 3, "extra": 1}):
        r = c.post("/feedback", json=bad)
        assert r.status_code == 422, bad
        assert r.json()["error"]["message"] and r.json()["error"]["code"] == "invalid_feedback"


def test_ab_split_holds_its_ratio_and_is_stable_across_processes():
    keys = [f"user-{i}" for i in range(2000)]
    for spec in ("a=0.5,b=0.5", "a=0.9,b=0.1", "control=0.7,candidate=0.3"):
        w = parse_weights(spec)
        obs = ABRouter({k: k for k in w}, spec, "salt-1").observed_split(keys)
        for k in w: assert abs(obs[k] - w[k]) < 0.03, (spec, obs)
    here = [assign_variant(k, "a=0.7,b=0.3", "salt-1") for k in keys[:300]]
    code = ("import json; from llmtwin_nb.mlops import assign_variant; "
            f"print(json.dumps([assign_variant(f'user-{{i}}', 'b=0.3,a=0.7', 'salt-1') for i in range(300)]))")
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                                      env={**os.environ, "PYTHONHASHSEED": "123"}).stdout)
    assert here == other
    ab = ABRouter({"a": "backend-a", "b": "backend-b"}, "a=0.7,b=0.3", "salt-1")
    assert ab.route("user-1") == (here[1], f"backend-{here[1]}") and ab.served[here[1]] == 1
    with pytest.raises(ValueError, match="must match"): ABRouter({"a": 1}, "a=0.5,b=0.5")


def test_prompt_templates_match_what_serve_sends():
    from llmtwin_nb.serve import rag_messages
    reg = PromptRegistry(ROOT/"prompts")
    msgs, tid = reg.render("rag_answer", question="Q?", context="[1] c")
    assert msgs == rag_messages("Q?", "[1] c") and tid.startswith("rag_answer@v1#")
    assert reg.get("twin_chat").render(author="A", question="hi")[0]["content"] == "You are A. Write in your own voice."


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
    pairs2, _, rep2 = feedback_to_data(fb, traces, evalsets=ev, decontam_ngram=8)
    assert pairs2 == [] and rep2["pairs_dropped_contaminated"] == 1          # shares an 8-gram with the evaluation item


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


def test_real_serve_requests_with_feedback_become_new_pairs(tmp_path):
    """A few dozen requests through chapter 07's `create_app` (uvicorn on loopback, packaged model, two variants),
    feedback through the mounted router over HTTP, then the loop's data function: new pairs appear."""
    from llmtwin_nb.core import load_embedder
    from llmtwin_nb.serve import EmbeddingRetriever
    docs = [SimpleNamespace(id=f"{i:016x}", title=t, kind=k, platform="linkedin" if k == "post" else "medium", content=c, split="train",
                            author="Ilse Marchetti") for i, (t, k, c) in enumerate(DOC_TEXTS)]
    emb = load_embedder("packaged:minilm", "cpu")
    retriever = EmbeddingRetriever([dict(id=d.id, title=d.title, text=d.content) for d in docs], embedder=emb)
    reqs = sim_requests(docs, {}, 24, rag_fraction=0.3, offtopic_fraction=0.5, recent=8, seed=1)
    traces, fbp = tmp_path/"traces.jsonl", tmp_path/"feedback.jsonl"
    stats = run_simulation(reqs, variants={"a": "packaged:smollm2-135m-instruct", "b": "packaged:smollm2-135m-instruct"},
                           split="a=0.5,b=0.5", salt="t", traces_path=traces, feedback_path=fbp,
                           serve_cfg=dict(reranker="none", top_k=1, context_tokens=64, max_batch_size=8), embedder=emb,
                           prompts=PromptRegistry(ROOT/"prompts"), author="Ilse Marchetti", max_tokens=4, concurrency=8,
                           correct_fraction=1.0, failures=1, retriever=retriever, device="cpu", seed=3, log=lambda *a: None)
    tr, fb = read_traces(traces), FeedbackLog(fbp).read()
    assert stats["requests"] == 24 and len(tr) == 24 and fb.corrupt == []
    assert stats["feedback_http"][404] == 1 and stats["feedback_http"][422] == 2 and stats["feedback_http"][200] == len(fb.records)
    assert {t["model"].removesuffix("-rag") for t in tr} == {"llmtwin-a", "llmtwin-b"}
    assert any(t["status"] == 500 for t in tr)                                # the injected generation failure is traced
    pairs, sft, rep = feedback_to_data(fb.records, tr, author="Ilse Marchetti", served_names=stats["served_names"])
    assert rep["new_pairs"] > 0 and pairs and all(p["variant"] in ("a", "b") for p in pairs)
    corrected = [p for p in pairs if p["source"] == "correction"]
    assert corrected and all(p["chosen"][0]["content"] in {d.content for d in docs} | {d.content + " More at [EMAIL]." for d in docs}
                             for p in corrected)
