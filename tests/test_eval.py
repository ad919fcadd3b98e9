"""Chapter 05 (evaluation): the statistics, parsers and the twin metric the comparison rests on.
About a minute on 2 cores: synthetic data, the two sample authors' writing (samples/), the packaged MiniLM and 135M model."""
import glob, html.parser, json, os, random, re
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from llmtwin_nb.eval import (JudgeParseError, TwinScorer, auc, clip_text, parse_judgement, perplexity, ppl_diff_ci, passages,
                             rhythm_features, text_nll, twin_metric_texts, twin_position, other_authors, RHYTHM_FEATURES)
from llmtwin_nb.stats import bootstrap_ci, mean_diff_ci

ROOT = Path(__file__).resolve().parents[1]


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


def test_rhythm_features_and_passages():
    f = dict(zip(RHYTHM_FEATURES, rhythm_features("We measured it; the queue was slow. Then we fixed the queue, and the cache.")))
    g = dict(zip(RHYTHM_FEATURES, rhythm_features("Wow! Did it work? (Sort of.) We tried — twice!")))
    assert f["semicolon"] > 0 == g["semicolon"] and g["exclamation"] > 0 == f["exclamation"] and g["question"] > 0 == f["question"]
    assert g["paren"] > 0 == f["paren"] and g["dash"] > 0 == f["dash"] and f["sent_len_mean"] > g["sent_len_mean"]
    assert clip_text("One two. Three four five. Six seven eight nine ten", 6) == "One two. Three four five."
    ps = passages(" ".join(f"This is sentence {i} of ten." for i in range(10)), 15)
    assert [len(p.split()) for p in ps] == [12] * 5 and all(p.endswith(".") for p in ps)


# --- the twin metric on real writing: the two sample authors -------------------------------------------------------------------

class _Text(html.parser.HTMLParser):
    "The prose of an HTML export: paragraphs, headings, list items and quotes (code and styles left out)."
    BLOCKS = {"p", "h1", "h2", "h3", "h4", "li", "blockquote"}
    def __init__(self):
        super().__init__(); self.blocks, self.cur, self.depth = [], [], 0
    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS: self.depth += 1
    def handle_endtag(self, tag):
        if tag in self.BLOCKS:
            self.depth -= 1
            if self.depth == 0 and self.cur: self.blocks.append(" ".join("".join(self.cur).split())); self.cur = []
    def handle_data(self, data):
        if self.depth > 0: self.cur.append(data)

def _html_prose(path) -> str:
    p = _Text(); p.feed(Path(path).read_text(encoding="utf-8")); return "\n\n".join(b for b in p.blocks if b)

def sample_author_texts() -> dict[str, list[str]]:
    "Each sample author's documents as plain text, read straight from samples/ (no pipeline needed)."
    a = [_html_prose(f) for f in sorted(glob.glob(str(ROOT/"samples"/"*-export"/"posts"/"*.html")))]
    b = [r["content"]["Content"] for r in json.loads((ROOT/"samples"/"marisol-vega"/"warehouse.json").read_text())]
    b += [re.sub(r"\A---\n.*?\n---\n", "", Path(f).read_text(encoding="utf-8"), flags=re.S)
          for f in sorted(glob.glob(str(ROOT/"samples"/"marisol-vega"/"notes"/"*.md")))]
    out = {"Ilse Marchetti": [t for t in a if len(t.split()) > 100], "Marisol Vega": [t for t in b if len(t.split()) > 100]}
    assert all(len(v) >= 12 for v in out.values()), {k: len(v) for k, v in out.items()}
    return out

def as_docs(texts_by_author: dict[str, list[str]], test_every: int = 4) -> list[dict]:
    "Warehouse-like documents, split by document (every `test_every`-th one held out)."
    return [dict(id=f"{a.split()[0].lower()}{i:03d}", author=a, kind="article", split="test" if i % test_every == test_every - 1 else "train", content=t)
            for a, ts in texts_by_author.items() for i, t in enumerate(ts)]

class _MemoEmbedder:
    "The packaged MiniLM with a cache: both directions of the test embed the same passages."
    def __init__(self, emb): self.emb, self.cache = emb, {}
    def encode(self, texts, **kw):
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo: self.cache.update(zip(todo, self.emb.encode(todo, **kw)))
        return np.stack([self.cache[t] for t in texts])


@pytest.fixture(scope="module")
def embedder():
    from llmtwin_nb.core import load_embedder
    return load_embedder("packaged:minilm", "cpu")


@pytest.fixture(scope="module")
def sample_docs():
    return as_docs(sample_author_texts())


def test_twin_metric_separates_the_sample_authors_both_ways(embedder, sample_docs):
    "Each sample author as the twin, the other as the floor: held-out AUC >= 0.9 both ways, and the position is 1 at the ceiling, 0 at the floor."
    memo = _MemoEmbedder(embedder)
    for twin in ("Ilse Marchetti", "Marisol Vega"):
        T = twin_metric_texts(sample_docs, twin, max_words=40, max_passages=100, seed=0)
        assert set(T["other"]["test"]["authors"]) == {"Marisol Vega", "Ilse Marchetti"} - {twin}
        assert not set(T["twin"]["train"]["docs"]) & set(T["twin"]["test"]["docs"])
        s = TwinScorer(memo, clip_words=40).fit(T["twin"]["train"]["texts"], {"other authors": T["other"]["train"]["texts"]})
        c, f = s.score(T["twin"]["test"]["texts"]), s.score(T["other"]["test"]["texts"])
        assert auc(c, f) >= 0.9, (twin, auc(c, f))
        assert twin_position(c, c, f, B=200)["value"] == pytest.approx(1.0) and twin_position(f, c, f, B=200)["value"] == pytest.approx(0.0)
        half = twin_position(np.r_[c[:20], f[:20]], c, f, T["twin"]["test"]["docs"], T["other"]["test"]["docs"], B=500)
        assert half["lo"] < half["value"] < half["hi"] and 0 < half["value"] < 1, half


def test_twin_metric_does_not_rest_on_catch_phrases(sample_docs):
    "Remove the demo author's signature phrases from every text: the learned metric ranks held-out passages almost the same."
    strip = lambda ts: [re.sub(r"(?i)here['’]s the thing:?\s*|ship the boring version first\.?", "", t) for t in ts]
    T = twin_metric_texts(sample_docs, "Ilse Marchetti", max_words=40, max_passages=150, seed=0)
    assert sum(bool(re.search(r"(?i)here['’]s the thing|boring version", t)) for t in T["twin"]["train"]["texts"]) >= 3   # they are there
    held = T["twin"]["test"]["texts"] + T["other"]["test"]["texts"]
    with_p = TwinScorer(None).fit(T["twin"]["train"]["texts"], T["other"]["train"]["texts"]).score(held)
    without = TwinScorer(None).fit(strip(T["twin"]["train"]["texts"]), T["other"]["train"]["texts"]).score(strip(held))
    from scipy.stats import spearmanr
    n = len(T["twin"]["test"]["texts"])
    assert spearmanr(with_p, without).statistic > 0.95 and auc(without[:n], without[n:]) >= 0.85


def test_twin_metric_features_are_learned_from_data():
    "Two toy authors writing in invented words: no fixed English phrase or spelling list could separate them; the learned features do, both ways."
    rng = random.Random(0)
    def author(vocab, end, n):
        return [" ".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 9))).capitalize() + end for _ in range(3)) for _ in range(n)]
    va, vb = ["zorp", "blick", "wumble", "fesk"], ["quan", "dreel", "ostro", "mip"]
    a, b = author(["tol", "ama"] + va, ".", 40), author(["tol", "ama"] + vb, ".", 40)
    for (pos, neg, vocab) in ((a, b, va), (b, a, vb)):
        s = TwinScorer(None, clip_words=40).fit(pos[:30], neg[:30])
        assert auc(s.score(pos[30:]), s.score(neg[30:])) == 1.0
        assert set(s.top_features(4)["words"]["author"]) <= set(vocab)
    with pytest.raises(ValueError, match="at least 2"): TwinScorer(None).fit(a[:1], b)
    # several kinds of negative text: each is a class of its own, P(author) still in [0, 1] and highest on the author
    c = author(["tol", "ama", "grib", "yonk"], "!", 40)
    s = TwinScorer(None, clip_words=40).fit(a[:30], {"b": b[:30], "c": c[:30]})
    assert s.n_train == {"author": 30, "b": 30, "c": 30} and sorted(s.pipe.classes_) == ["author", "not:b", "not:c"]
    pa, pb, pc = s.score(a[30:]), s.score(b[30:]), s.score(c[30:])
    assert ((0 <= np.r_[pa, pb, pc]) & (np.r_[pa, pb, pc] <= 1)).all() and auc(pa, pb) == auc(pa, pc) == 1.0
    assert s.top_features(3)["rhythm"]["exclamation"] < 0


def test_no_hand_picked_author_markers_in_the_package():
    "The eval module names no author, catch-phrase or spelling list: what is distinctive is learned (see the tests above)."
    src = (ROOT/"llmtwin_nb"/"eval.py").read_text().lower()
    for marker in ("here's the thing", "here’s the thing", "boring version", "space heater", "mood ring", "magic trick", "lab report",
                   "ilse", "marchetti", "pondlet", "lasagne", "tidewater", "marisol", "fieldnotes", "stay curious"):
        assert marker not in src, marker
    import llmtwin_nb.eval as ev
    assert not any(hasattr(ev, k) for k in ("PHRASES", "BRITISH", "AMERICAN", "synthetic_styles"))


def test_twin_metric_needs_another_author():
    docs = [dict(id=f"d{i}", author="A", kind="post", split="test" if i % 3 == 0 else "train", content="A sentence with six words here. " * 20) for i in range(6)]
    with pytest.raises(ValueError, match="needs another author"): other_authors(docs, "A")
    with pytest.raises(ValueError, match="no documents by the twin"): other_authors(docs, "B")
    docs.append(dict(id="e0", author="B", kind="post", split="train", content="Another sentence with six words. " * 20))
    assert other_authors(docs, "A") == ["B"]
    with pytest.raises(ValueError, match="test-split passages by 'B'"): twin_metric_texts(docs, "A")
    with pytest.raises(ValueError, match="ceiling"): twin_position([0.5, 0.6], [0.2, 0.3], [0.7, 0.8])


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
