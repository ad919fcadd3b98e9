"""Chapter 3's LLM-written instructions through a real OpenAI-compatible endpoint: the project's own `llmtwin-serve`
(chapter 7) on loopback, serving the packaged SmolLM2-135M, is the `llm.backend: openai` endpoint of the dataset builder.
Both LLM paths run end to end over HTTP: back-translation (one instruction per extract) and the book's
generate-and-rewrite (`sft.generation: book`); the server's own traces prove every call reached it."""
import json, os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmtwin_nb.core import load_llm, make_backend, section_params
from llmtwin_nb.serve import ServerThread, create_app
from llmtwin_nb.instruct import build_instruct_dataset

ROOT = Path(__file__).resolve().parents[1]
MODEL = "packaged:smollm2-135m-instruct"
PARA = ("Here's the thing about the billing service {i}: we measured its latency for a week and the p95 was {p} ms while the "
        "mean looked fine, so we fixed the slow retry path first and the nightly export stopped timing out.")


def _docs(n_docs: int = 4, paras: int = 2):
    return [dict(id=f"{i:016x}", author="Ilse Marchetti", platform="medium", kind="article", title=f"Essay {i}", status="active",
                 split="test" if i == n_docs - 1 else "train", content="\n\n".join(PARA.format(i=i, p=100 + 10 * i + j) for j in range(paras)))
            for i in range(n_docs)]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model, tok = load_llm(MODEL, "cpu")
    cfg = section_params("serve", dict(model=MODEL, index_path=str(tmp / "no-index"), trace_path=str(tmp / "traces.jsonl"),
                                       max_new_tokens=320, max_prompt_tokens=1024))
    with ServerThread(create_app(cfg, root=ROOT, model=model, tokenizer=tok, author="Ilse Marchetti")) as url:
        yield f"{url}/v1", cfg.served_name, tmp / "traces.jsonl", tok


def _traced(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


@pytest.mark.parametrize("generation", ["backtranslate", "book"])
def test_the_llm_paths_run_against_llmtwin_serve(endpoint, tmp_path, generation):
    base_url, served, traces, tok = endpoint
    llm = section_params("llm", dict(backend="openai", base_url=base_url, model=served, max_retries=0, timeout_s=300))
    backend = make_backend(llm, cache=tmp_path / "cache")
    cfg = section_params("sft", dict(extract_min_chars=100, extract_max_chars=300, max_llm_calls=3, max_length=256,
                                     generation=generation, pairs_per_extract=1, min_train_examples=1))
    docs = _docs() if generation == "backtranslate" else _docs(2, 1)       # the book path asks for ~300 tokens per extract: 2 extracts
    before = _traced(traces)
    ds, rep = build_instruct_dataset(docs, tok, cfg, backend, {}, seed=1, author="Ilse Marchetti", log=print)
    calls = _traced(traces) - before
    print(generation, rep["instruction_source_counts"], "calls traced by the server:", calls)
    n_extracts = rep["extracts"] - rep.get("dropped_near_duplicate", 0) - rep.get("dropped_language", 0)
    assert calls == (3 if generation == "backtranslate" else n_extracts) and calls > 0    # every LLM call went over HTTP
    assert rep["backend"].startswith("openai") and len(ds["train"]) and len(ds["test"])
    answers = {r["completion"][0]["content"] for s in ds for r in ds[s]}
    if generation == "backtranslate":           # the answers are always the author's own extracts
        assert all(a.startswith("Here's the thing about the billing service") for a in answers)
        assert rep["llm_calls"] == 3
    # a second build replays the response cache: no new request reaches the server
    build_instruct_dataset(docs, tok, cfg, make_backend(llm, cache=tmp_path / "cache"), {}, seed=1, author="Ilse Marchetti", log=print)
    assert _traced(traces) - before == calls
    row = json.loads(traces.read_text().splitlines()[-1])
    assert row.get("model") or row.get("variant")          # a real trace of the server, not of a stub
