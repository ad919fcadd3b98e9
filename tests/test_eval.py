"""Chapter 05 (evaluation): the statistics and parsers the comparison rests on.
Fast (< 60 s on 2 cores): synthetic data, the packaged MiniLM and the packaged 135M model."""
import os, random

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from llmtwin_nb.eval import (JudgeParseError, TwinScorer, auc, bootstrap_ci, clip_text, mean_diff_ci, parse_judgement, perplexity,
                             ppl_diff_ci, style_features, synthetic_styles, text_nll, STYLE_FEATURES)


def test_bootstrap_ci_covers_true_difference():
    "Over many synthetic paired datasets, the 95% interval covers the true mean difference about 95% of the time."
    rng, true, covered, reps = np.random.default_rng(0), 0.4, 0, 200
    for r in range(reps):
        x = rng.normal(0, 1, 40)
        a, b = x + true + rng.normal(0, 0.5, 40), x + rng.normal(0, 0.5, 40)
        ci = mean_diff_ci(a, b, B=1000, seed=r)
        covered += ci["lo"] <= true <= ci["hi"]
    assert 0.88 <= covered / reps <= 0.99, covered / reps


def test_bootstrap_detects_and_refuses():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 50)
    assert mean_diff_ci(x + 1.0 + rng.normal(0, 0.2, 50), x, B=500)["significant"]
    assert not mean_diff_ci(x + rng.normal(0, 0.2, 50), x + rng.normal(0, 0.2, 50), B=500)["significant"]
    with pytest.raises(ValueError, match="at least 2"): bootstrap_ci(lambda i: np.zeros(np.shape(i)[:-1]), 1)
    with pytest.raises(ValueError, match="tokenizer"): ppl_diff_ci([(1.0, 2), (1.0, 3)], [(1.0, 2), (1.0, 4)])
    # perplexity difference: a model twice as surprised per token (nats) has exp(2x) perplexity
    d = ppl_diff_ci([(2.0, 2), (4.0, 4)], [(1.0, 2), (2.0, 4)], B=200)
    assert abs(d["diff"] - (np.e - np.exp(0.5))) < 1e-9 and d["lo"] <= d["diff"] <= d["hi"]


@pytest.mark.parametrize("text,expected", [
    ('{"accuracy": {"analysis": "fine", "score": 3}, "style": {"analysis": "stiff", "score": 1}}', {"accuracy": 3, "style": 1}),
    ('```json\n{"accuracy": 2, "style": "2"}\n```', {"accuracy": 2, "style": 2}),
    ('Sure. {"accuracy": {"score": 1, "analysis": "a {brace} and \\"quote\\""}, "style": {"score": 3}} Done.', {"accuracy": 1, "style": 3}),
])
def test_judge_parsing_valid(text, expected):
    assert parse_judgement(text) == expected


@pytest.mark.parametrize("text,why", [
    ("", "no JSON"), ("Accuracy 3, style 2.", "no JSON"), ('{"accuracy": 3, "style": 2,}', "invalid JSON"),
    ('{"accuracy": {"score": 3}}', "both"), ('{"accuracy": {"score": 4}, "style": {"score": 2}}', "outside 1-3"),
    ('{"accuracy": {"score": 0}, "style": {"score": 2}}', "outside 1-3"), ('{"accuracy": {"score": 2}, "style": {"score": 1.5}}', "not an integer"),
    ('{"accuracy": {"score": "good"}, "style": {"score": 2}}', "not an integer"), ('{"accuracy": true, "style": 2}', "not an integer"),
])
def test_judge_parsing_rejects(text, why):
    with pytest.raises(JudgeParseError, match=why): parse_judgement(text)


def test_style_features_and_clip():
    f = dict(zip(STYLE_FEATURES, style_features("Here's the thing: we optimised it; the behaviour changed. Ship the boring version first.")))
    g = dict(zip(STYLE_FEATURES, style_features("Wow! We optimized it!! The behavior changed, right?")))
    assert f["semicolon"] > 0 == g["semicolon"] and f["british"] > 0 == g["british"] and g["american"] > 0 == f["american"]
    assert f["phrases"] > 0 == g["phrases"] and g["exclamation"] > 0 == f["exclamation"]
    assert clip_text("One two. Three four five. Six seven eight nine ten", 6) == "One two. Three four five."


@pytest.fixture(scope="module")
def embedder():
    from llmtwin_nb.core import load_embedder
    return load_embedder("packaged:minilm", "cpu")


def test_twin_classifier_separates_styles(embedder):
    a, b = synthetic_styles(40, seed=3)
    s = TwinScorer(embedder, clip_words=80).fit(a[:25], b[:25])
    pa, pb = s.score(a[25:]), s.score(b[25:])
    assert auc(pa, pb) == 1.0 and pa.mean() > 0.8 and pb.mean() < 0.2
    with pytest.raises(ValueError, match="at least 2"): TwinScorer(embedder).fit(a[:1], b)


def test_auc():
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auc([0.1], [0.9]) == 0.0 and auc([0.5, 0.5], [0.5]) == 0.5


def test_perplexity_repeated_below_shuffled():
    from llmtwin_nb.core import load_llm
    model, tok = load_llm("packaged:smollm2-135m-instruct", "cpu")
    text = "Parquet and SQLite beat a cluster until proven otherwise. Measure p95, not the mean."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    shuffled = tok.decode(random.Random(0).sample(ids, len(ids)))
    rep = perplexity(text_nll(model, tok, [text + " " + text]))
    shuf = perplexity(text_nll(model, tok, [shuffled + " " + shuffled]))
    assert rep < shuf / 2, (rep, shuf)
    # windows and batching do not change the token-weighted result much
    one = text_nll(model, tok, [text * 3], window=512)[0]; many = text_nll(model, tok, [text * 3], window=16, batch_size=2)[0]
    assert many[1] == one[1] and many[0] > one[0]          # same tokens scored; short windows see less context
    with pytest.raises(ValueError, match="no tokens"): perplexity([(0.0, 0)])


def test_judge_through_openai_compatible_endpoint_on_loopback(tmp_path):
    "The judge path with an endpoint: real HTTP on 127.0.0.1, one valid, one malformed and one out-of-range answer, cached."
    import http.server, json, threading
    from llmtwin_nb.core import make_backend
    from llmtwin_nb.eval import judge_answers
    replies = {"A": '{"accuracy": {"analysis": "right", "score": 3}, "style": {"analysis": "plain", "score": 2}}',
               "B": "I think it is fine.", "C": '{"accuracy": {"score": 7}, "style": {"score": 2}}'}
    calls = []
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(req)
            answer = next(v for k, v in replies.items() if f"Answer: {k}" in req["messages"][-1]["content"])
            body = json.dumps({"model": req["model"], "choices": [{"message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 9, "completion_tokens": 9}}).encode()
            self.send_response(200); self.send_header("Content-Type", "application/json"); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H); threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        b = make_backend({"backend": "openai", "base_url": f"http://127.0.0.1:{srv.server_address[1]}/v1", "model": "judge", "max_retries": 0},
                         cache=tmp_path)
        items = [dict(instruction="Explain p95.", answer=k, reference="The 95th percentile latency.") for k in "ABC"]
        out = judge_answers(b, items, log=None)
        assert out[0]["accuracy"] == 3 and out[0]["style"] == 2
        assert "no JSON" in out[1]["error"] and "outside 1-3" in out[2]["error"]
        assert judge_answers(b, items, log=None) == out and len(calls) == 3          # second pass: all from the cache
    finally: srv.shutdown()
