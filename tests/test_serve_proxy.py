"""The service in front of an engine (`serve.backend: openai`), against a deliberately slow, real HTTP upstream on loopback
that streams server-sent events with pauses between pieces: pieces pass through as they arrive, upstream errors come back
with their status, and a variant that fails or times out is answered by `serve.fallback_model` (marked in the trace, the
headers and /metrics)."""
import http.server, json, threading, time
from pathlib import Path

import httpx, openai, pytest

from llmtwin_nb.core import OpenAIChatBackend, UpstreamError, load_llm, section_params
from llmtwin_nb.serve import ServerThread, create_app
from llmtwin_nb.traces import Tracer

ROOT = Path(__file__).resolve().parents[1]
PIECES = [f"piece {i} of the slow answer; " for i in range(8)]      # 8 x 29 characters
DELAY = 0.25                                                       # seconds between pieces: the upstream takes ~2 s


class SlowUpstream(http.server.BaseHTTPRequestHandler):
    "An OpenAI-compatible endpoint whose model name picks its behaviour: `slow` streams PIECES with pauses, `eNNN` answers HTTP NNN."
    finished: dict = {}                      # request id -> perf_counter() when the upstream wrote its last piece
    calls: list = []
    def log_message(self, *a): pass
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        SlowUpstream.calls.append(req)
        model = req["model"]
        if model.startswith("e"):
            body = json.dumps({"error": {"message": f"upstream says {model[1:]}", "type": "x", "param": None, "code": None}}).encode()
            self.send_response(int(model[1:])); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body); return
        rid = req["messages"][-1]["content"]
        if model == "hang":                    # answers nothing for 20 s (the client gives up first)
            time.sleep(20)
            try: self.send_response(504); self.end_headers()
            except OSError: pass
            return
        if not req.get("stream"):
            time.sleep(DELAY * len(PIECES))
            body = json.dumps({"model": model, "choices": [{"message": {"role": "assistant", "content": "".join(PIECES)}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 11, "completion_tokens": len(PIECES)}}).encode()
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
            SlowUpstream.finished[rid] = time.perf_counter(); return
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        for i, p in enumerate(PIECES):
            if i: time.sleep(DELAY)
            d = {"model": model, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(d)}\n\n".encode()); self.wfile.flush()
        SlowUpstream.finished[rid] = time.perf_counter()
        for d in ({"model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {"model": model, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(PIECES)}}):
            self.wfile.write(f"data: {json.dumps(d)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n"); self.wfile.flush()


@pytest.fixture(scope="module")
def upstream():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowUpstream)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def _front(upstream, tmp, model="slow", **kw):
    cfg = section_params("serve", dict(backend="openai", base_url=upstream, upstream_model=model, index_path=str(tmp/"no-index"),
                                       trace_path=str(tmp/"traces.jsonl"), upstream_max_retries=0, max_new_tokens=32,
                                       default_max_tokens=8, **kw))
    return cfg, create_app(cfg, root=ROOT)


def _stream(url, rid, **kw):
    "POST a streamed chat; (arrival time of each content piece, the pieces, the response)."
    times, pieces = [], []
    body = {"model": "llmtwin", "stream": True, "max_tokens": 16, "messages": [{"role": "user", "content": rid}], **kw}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"): continue
            d = json.loads(line[6:])
            for ch in d.get("choices") or []:
                if ch["delta"].get("content"): times.append(time.perf_counter()); pieces.append(ch["delta"]["content"])
    return times, pieces, r


@pytest.mark.parametrize("pii_mask", [False, True])
def test_a_stream_passes_the_upstreams_pieces_through_as_they_arrive(upstream, tmp_path, pii_mask):
    cfg, app = _front(upstream, tmp_path, pii_mask=pii_mask)
    with ServerThread(app) as url:
        rid = f"stream-{pii_mask}"
        t0 = time.perf_counter()
        times, pieces, r = _stream(url, rid)
        done = SlowUpstream.finished[rid]
    assert r.status_code == 200 and "".join(pieces) == "".join(PIECES)
    first, total = times[0] - t0, done - t0
    print(f"pii_mask={pii_mask}: first piece at {first:.3f} s, upstream finished at {total:.3f} s, {len(pieces)} pieces")
    assert total > (len(PIECES) - 1) * DELAY * 0.9
    if not pii_mask:                           # each upstream piece is one client piece, the first long before the upstream ends
        assert pieces == PIECES and first < 2 * DELAY and times[0] < done - 4 * DELAY
    else:                                      # the PII masker holds back 48 characters: the first piece waits for the second or third
        assert len(pieces) >= len(PIECES) - 2 and times[0] < done - 3 * DELAY
    rec = Tracer(tmp_path/"traces.jsonl").read()[-1]
    assert rec["status"] == 200 and rec["completion_tokens"] == len(PIECES) and rec["prompt_tokens"] == 11    # the upstream's usage
    assert 0 < rec["ttft_ms"] / 1000 < total and rec["cost_usd"] == cfg.cost_usd("slow", 11, len(PIECES))


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_upstream_errors_come_back_with_their_status(upstream, tmp_path, status):
    cfg, app = _front(upstream, tmp_path, model=f"e{status}")
    with ServerThread(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "llmtwin", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        s = httpx.post(url + "/v1/chat/completions", json={"model": "llmtwin", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                       timeout=60)
        g = httpx.post(url + "/rag", json={"question": "hi"}, timeout=60)           # no index: 503 from this service itself
        m = httpx.get(url + "/metrics").text
    for resp in (r, s):                        # a stream's status line waits for the first piece: the error is an HTTP status too
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["code"] == "upstream_error" and f"upstream says {status}" in err["message"] and resp.headers["x-trace-id"]
    assert g.status_code == 503 and g.json()["error"]["code"] == "index_unavailable"
    recs = Tracer(tmp_path/"traces.jsonl").read()
    assert [(t["endpoint"], t["status"], t["error_code"], t["cost_usd"]) for t in recs] == [
        ("chat", status, "upstream_error", 0.0), ("chat.stream", status, "upstream_error", 0.0)]
    assert f'llmtwin_errors_total{{code="upstream_error",endpoint="chat",prompt_version="chat",variant="main"}} 1.0' in m


def test_the_openai_client_sees_the_upstream_status(upstream, tmp_path):
    cfg, app = _front(upstream, tmp_path, model="e429")
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError, match="upstream says 429"):
            client.chat.completions.create(model="llmtwin", messages=[{"role": "user", "content": "hi"}])


def test_upstream_retries_then_the_status(upstream):
    "The core client retries a 503 (bounded), then raises UpstreamError carrying the status; a 404 is not retried."
    n = len(SlowUpstream.calls)
    with pytest.raises(UpstreamError) as e: OpenAIChatBackend(upstream, "e503", max_retries=2, backoff_s=0.01).chat([{"role": "user", "content": "x"}])
    assert e.value.status == 503 and len(SlowUpstream.calls) - n == 3
    with pytest.raises(UpstreamError) as e: OpenAIChatBackend(upstream, "e404", max_retries=2, backoff_s=0.01).stream([{"role": "user", "content": "x"}], print)
    assert e.value.status == 404 and len(SlowUpstream.calls) - n == 4
    with pytest.raises(UpstreamError) as e: OpenAIChatBackend("http://127.0.0.1:9/v1", "m", max_retries=0).chat([{"role": "user", "content": "x"}])
    assert e.value.status == 502


@pytest.fixture(scope="module")
def smol():
    return load_llm("packaged:smollm2-135m-instruct", "cpu")


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_variant_is_answered_by_the_fallback_model(upstream, tmp_path, smol, stream):
    "The variant's engine really fails (its upstream answers 500): the local fallback model answers; trace, headers and metrics say so."
    fb = "packaged:smollm2-135m-instruct"
    cfg = section_params("serve", dict(backend="openai", base_url=upstream, upstream_model="e500", variants="twin=e500", index_path=str(tmp_path/"no-index"),
                                       trace_path=str(tmp_path/"traces.jsonl"), upstream_max_retries=0, fallback_model=fb, max_new_tokens=32, default_max_tokens=8))
    app = create_app(cfg, root=ROOT, models={fb: smol})
    body = {"model": "llmtwin", "max_tokens": 6, "stream": stream, "messages": [{"role": "user", "content": "Name a colour."}]}
    with ServerThread(app) as url:
        assert httpx.get(url + "/health").json()["fallback"] == fb
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        m = httpx.get(url + "/metrics").text
    assert r.status_code == 200, r.text
    assert r.headers["x-fallback"] == fb and r.headers["x-fallback-reason"] == "error" and r.headers["x-variant"] == "twin"
    text = (r.json()["choices"][0]["message"]["content"] if not stream else
            "".join(c["choices"][0]["delta"].get("content") or "" for c in (json.loads(l[6:]) for l in r.text.splitlines() if l.startswith("data: {")) if c["choices"]))
    assert text.strip()
    rec = Tracer(tmp_path/"traces.jsonl").read()[-1]
    assert rec["status"] == 200 and rec["variant"] == "twin" and rec["backend_model"] == "e500" and rec["answered_by"] == fb
    assert rec["fallback"]["reason"] == "error" and "500" in rec["fallback"]["error"] and rec["fallback"]["model"] == fb
    assert rec["completion_tokens"] > 0 and rec["cost_usd"] == cfg.cost_usd(fb, rec["prompt_tokens"], rec["completion_tokens"]) > 0
    assert 'llmtwin_fallbacks_total{reason="error",variant="twin"} 1.0' in m


def test_a_slow_variant_times_out_to_the_fallback_model(upstream, tmp_path, smol):
    "The variant's upstream sends nothing for 20 s; after serve.variant_timeout_s the fallback answers (a stream too: no first piece in time)."
    fb = "packaged:smollm2-135m-instruct"
    cfg = section_params("serve", dict(backend="openai", base_url=upstream, upstream_model="hang", index_path=str(tmp_path/"no-index"),
                                       trace_path=str(tmp_path/"traces.jsonl"), fallback_model=fb, variant_timeout_s=0.5,
                                       upstream_timeout_s=3, upstream_max_retries=0))
    app = create_app(cfg, root=ROOT, models={fb: smol})
    with ServerThread(app) as url:
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json={"model": "llmtwin", "max_tokens": 4, "messages": [{"role": "user", "content": "timeout-1"}]},
                       timeout=120)
        took = time.perf_counter() - t0
        times, pieces, s = _stream(url, "timeout-2", max_tokens=4)
    assert r.status_code == 200 and r.headers["x-fallback-reason"] == "timeout" and r.json()["choices"][0]["message"]["content"] is not None
    assert took < 20, f"the fallback answered after {took:.2f} s: it waited for the upstream"
    assert s.status_code == 200 and s.headers["x-fallback-reason"] == "timeout" and pieces
    recs = Tracer(tmp_path/"traces.jsonl").read()
    assert [(t["endpoint"], t["fallback"]["reason"], t["answered_by"]) for t in recs] == [("chat", "timeout", fb), ("chat.stream", "timeout", fb)]
    assert "no answer within 0.5 s" in recs[0]["fallback"]["error"] and recs[1]["ttft_ms"] > 500


def test_no_fallback_without_a_model_to_fall_back_to():
    with pytest.raises(Exception, match="fallback_model"): section_params("serve", dict(variant_timeout_s=1))
