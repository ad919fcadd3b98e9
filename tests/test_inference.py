"""Chapter 6 (inference): the KV-cache calculator against a real cache, lossless decoding methods against greedy,
the bandwidth probe, and the helpers' refusals. Tiny generations on the packaged SmolLM2-135M (CPU)."""
import os

import pytest, torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from llmtwin_nb.core import load_llm
from llmtwin_nb.inference import (assert_same_tokens, acceptance_rate, bench_generate, bytes_per_token, cache_nbytes,
                                  count_acceptance, gpu_spec_bandwidth, heldout_documents, heldout_texts, kv_cache_bytes,
                                  layer_skip_draft, measure_bandwidth, model_bytes, padding_waste, paragraphs, perplexity,
                                  quantize_int8_weight_only, roofline)

NEW = 4

@pytest.fixture(scope="module")
def lm():
    model, tok = load_llm("packaged:smollm2-135m-instruct", "cpu", "float32")
    tok.padding_side = "left"
    return model, tok

def _inputs(tok, text):
    s = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tok([s], return_tensors="pt", add_special_tokens=False)

@pytest.fixture(scope="module")
def greedy(lm):
    model, tok = lm
    inp = _inputs(tok, "Name two reasons to write tests.")
    return inp, bench_generate(model, inp, NEW, repeats=1, warmup=0, name="greedy")

def test_kv_calculator_matches_a_real_dynamic_cache(lm):
    model, tok = lm
    for batch, text in [(1, "Hi"), (2, "Say something about caches, please.")]:
        s = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        inp = tok([s] * batch, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
        seq = out.past_key_values.get_seq_length()
        assert seq == inp["input_ids"].shape[1] + 3 - 1
        assert cache_nbytes(out.past_key_values) == kv_cache_bytes(model.config, seq, batch, 4)
    c = model.config
    assert kv_cache_bytes(c, 100, 2, 2) == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 100 * 2 * 2
    with pytest.raises(ValueError, match="batch"): kv_cache_bytes(c, 10, 0)

@pytest.mark.parametrize("name,kw", [("no cache", dict(use_cache=False)), ("static cache", dict(cache_implementation="static")),
                                     ("prompt lookup", dict(prompt_lookup_num_tokens=3))])
def test_lossless_methods_give_greedy_token_ids(lm, greedy, name, kw):
    model, tok = lm
    inp, ref = greedy
    b = bench_generate(model, inp, NEW, repeats=1, warmup=0, name=name, **kw)
    assert b.ids.shape == (1, NEW)
    assert_same_tokens(ref, b)

def test_speculative_layer_skip_draft_is_lossless_and_counted(lm, greedy):
    model, tok = lm
    inp, ref = greedy
    draft = layer_skip_draft(model, 4)
    assert draft.config.num_hidden_layers == 4 and draft.lm_head is model.lm_head
    with count_acceptance() as st:
        b = bench_generate(model, inp, NEW, repeats=1, warmup=0, name="speculative", assistant_model=draft)
    assert_same_tokens(ref, b)
    assert st["rounds"] >= 1 and 0 <= st["accepted"] <= st["proposed"] and 0 <= acceptance_rate(st) <= 1
    with pytest.raises(ValueError, match="draft_layers"): layer_skip_draft(model, model.config.num_hidden_layers)

def test_a_different_token_is_caught(greedy):
    _, ref = greedy
    import dataclasses
    other = dataclasses.replace(ref, name="broken", ids=ref.ids.clone()); other.ids[0, 0] += 1
    with pytest.raises(AssertionError, match="broken differs"): assert_same_tokens(ref, other)

def test_bandwidth_is_positive_and_validated():
    assert measure_bandwidth(64, repeats=2) > 0
    assert measure_bandwidth(64, repeats=2, kind="copy") > 0
    with pytest.raises(ValueError): measure_bandwidth(0)

def test_bytes_and_int8_weight_only(lm):
    model, tok = lm
    n = sum(p.numel() for p in model.parameters())
    assert model_bytes(model) == 4 * n
    q = quantize_int8_weight_only(model)
    assert bytes_per_token(q) < bytes_per_token(model) / 3
    inp = _inputs(tok, "Hello")
    with torch.inference_mode():
        a, b = model(**inp).logits[0, -1], q(**inp).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98

def test_padding_roofline_and_gpu_table():
    assert padding_waste([4, 4], 2) == 0 and padding_waste([1, 3], 2) == pytest.approx(1 / 3)
    r = roofline(10, 10**9, 0, 20.0)
    assert r["achieved_gbs"] == 10 and r["roofline_fraction"] == 0.5 and r["roofline_tokens_per_s"] == 20
    with pytest.raises(ValueError, match="bandwidth"): roofline(1, 1, 1, 0)
    assert gpu_spec_bandwidth("NVIDIA H100 80GB HBM3") == 3350 and gpu_spec_bandwidth("NVIDIA H200") == 4800


def _warehouse(tmp_path):
    "A warehouse of two authors, each with train and test documents (one of them code), written the way chapter 01 writes it."
    from llmtwin_nb.data import Document, merge_snapshot, write_warehouse
    para = lambda who, i: (f"{who} wrote paragraph {i} about shipping software carefully, measuring what matters, and writing it "
                           "down so that the next person does not have to guess what happened or why it mattered to anyone.")
    spec = [("Ann Author", "test", "article", 6), ("Ann Author", "test", "post", 2), ("Ann Author", "test", "repository", 9),
            ("Ann Author", "train", "article", 7), ("Bo Other", "test", "article", 8), ("Bo Other", "train", "post", 3)]
    docs = [Document(id=f"{i:016x}", author=a, author_id=a.lower().replace(" ", "-"), platform="github" if k == "repository" else "local",
                     kind=k, title=f"{a} {k} {i}", content="\n\n".join(para(a, j) for j in range(n)), content_hash=str(i), split=sp)
            for i, (a, sp, k, n) in enumerate(spec, 1)]
    write_warehouse(merge_snapshot({}, docs, "2026-01-01T00:00:00Z")[0], tmp_path/"warehouse")
    return tmp_path/"warehouse"

def test_heldout_text_is_the_twins_test_split_only(tmp_path):
    wh = _warehouse(tmp_path)
    docs = heldout_documents("Ann Author", wh)
    assert [(d.author, d.split) for d in docs] == [("Ann Author", "test")] * 3
    assert [d.kind for d in docs] == ["article", "post", "repository"]          # prose before code, then longest first
    texts = heldout_texts("Ann Author", 2, wh)
    assert list(texts) == ["Ann Author article 1", "Ann Author post 2"] and "Bo Other" not in " ".join(texts.values())
    assert all(p.startswith("Ann Author wrote") for d in docs for p in paragraphs(d.content))
    assert len(paragraphs(docs[0].content)) == 6 and paragraphs("too short\n\n" + "x " * 100, 50) == [("x " * 100).strip()]
    with pytest.raises(ValueError, match="data.author") as e: heldout_documents("Nobody", wh)
    assert "Ann Author" in str(e.value) and "Bo Other" in str(e.value)          # names the authors it does hold
    with pytest.raises(FileNotFoundError, match="dvc repro data"): heldout_documents("Ann Author", tmp_path/"missing")
    with pytest.raises(ValueError, match="n_docs"): heldout_texts("Ann Author", 0, wh)

def test_perplexity_of_heldout_text_is_finite_and_int8_close(lm, tmp_path):
    model, tok = lm
    text = next(iter(heldout_texts("Ann Author", 1, _warehouse(tmp_path)).values()))[:600]
    p32 = perplexity(model, tok, [text], 128)
    assert 1 < p32 < 200 and abs(perplexity(quantize_int8_weight_only(model), tok, [text], 128) - p32) < 0.1 * p32
    with pytest.raises(ValueError, match="fewer than 2 tokens"): perplexity(model, tok, [""], 128)
