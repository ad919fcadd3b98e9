"""GGUF export (chapter 09): the merged twin (or, before the DPO stage has run, the packaged base model) written to
GGUF, loaded back with transformers' GGUF loader and compared logit by logit with the source model within the stated
tolerance; the tokenizer inside the file gives the same ids; an f32 export of a grouped-query-attention Llama is exact
(the Q/K permutation); the Ollama Modelfile's template renders what the chat template renders; bad input is refused."""
import re, shutil
from pathlib import Path

import pytest, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmtwin_nb.core import ParamsError, section_params
from llmtwin_nb.export import (TOLERANCE, compare_logits, check_messages_for, export_source, load_gguf, modelfile,
                               next_token_logits, ollama_template, permute_qk, render_go, render_pieces, stop_tokens,
                               template_pieces, within_tolerance, write_gguf)

ROOT = Path(__file__).resolve().parents[1]
AUTHOR = "A. N. Author"          # any author: the name only goes into the system prompt

@pytest.fixture(scope="module")
def source():
    "The DPO stage's merged model when the pipeline has made it, else the packaged base model (core's model resolution)."
    return export_source("models/dpo/merged", ROOT, fallback="packaged:smollm2-135m-instruct", log=lambda *a: None)[0]

@pytest.fixture(scope="module")
def tok(source): return AutoTokenizer.from_pretrained(source)

def chat_ids(tokenizer, convs):
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for c in convs]

def test_q8_0_round_trip_within_tolerance(source, tok, tmp_path):
    info = write_gguf(source, tmp_path/"twin-q8_0.gguf", "q8_0", name="twin")
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    assert info["tensor_types"].keys() == {"Q8_0", "F32"} and 8.4 < 8 * info["bytes"] / n_params < 8.8   # 8.5 bits/weight + metadata
    assert not list(tmp_path.glob("*.tmp*")), "a temporary file was left behind"
    convs = check_messages_for(AUTHOR, 8)   # 8 prompts: one near-tie flip of the top-1 token must not decide the check
    ids = chat_ids(tok, convs)
    model, gtok = load_gguf(tmp_path/"twin-q8_0.gguf")
    cmp = compare_logits(next_token_logits(ref, ids), next_token_logits(model, ids))
    print("q8_0 round trip:", cmp, "tolerance:", TOLERANCE["q8_0"])
    assert within_tolerance(cmp, "q8_0"), f"{cmp} outside {TOLERANCE['q8_0']}"
    assert cmp["max_abs_logit_diff"] > 0            # two different weight sets were compared, not one model twice
    assert chat_ids(gtok, convs) == ids               # the file's tokenizer: same ids for the chat prompt
    assert gtok.decode(ids[0]) == tok.decode(ids[0])
    assert gtok.chat_template == tok.chat_template

def test_f32_export_of_a_gqa_llama_is_exact(tok, tmp_path):
    "Untied head, 4 query heads on 2 KV heads: f32 logits equal up to float rounding, and K left unpermuted would not."
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path/"tiny"); tok.save_pretrained(tmp_path/"tiny")
    info = write_gguf(tmp_path/"tiny", tmp_path/"tiny.gguf", "f32")
    assert info["tensor_types"] == {"F32": 2 * 9 + 3}           # 9 per layer, embedding, final norm, untied output
    ref = AutoModelForCausalLM.from_pretrained(tmp_path/"tiny", dtype=torch.float32).eval()
    got, _ = load_gguf(tmp_path/"tiny.gguf", tokenizer=False)
    ids = chat_ids(tok, check_messages_for(AUTHOR, 2))
    cmp = compare_logits(next_token_logits(ref, ids), next_token_logits(got, ids))
    assert cmp["max_abs_logit_diff"] < 1e-4 and cmp["top1_agreement"] == 1.0, cmp
    with torch.no_grad():
        k = got.model.layers[1].self_attn.k_proj.weight
        k.copy_(torch.from_numpy(permute_qk(k.detach().numpy().copy(), 4, 2)))
    assert compare_logits(next_token_logits(ref, ids), next_token_logits(got, ids))["max_abs_logit_diff"] > 100 * cmp["max_abs_logit_diff"] + 1e-4

def test_modelfile_template_renders_the_chat_template(tok, tmp_path):
    p = template_pieces(tok)
    convs = [[{"role": "user", "content": "hi"}], *check_messages_for(AUTHOR, 1),
             [*check_messages_for(AUTHOR, 1)[0], {"role": "assistant", "content": "An answer."}, {"role": "user", "content": "More?"}]]
    for c in convs:
        for gen in (True, False):
            assert render_pieces(p, c, gen) == tok.apply_chat_template(c, tokenize=False, add_generation_prompt=gen)
    stops = stop_tokens(tok, p)
    mf = modelfile("twin-q8_0.gguf", ollama_template(p), f"You are {AUTHOR}.", stops, dict(temperature=0.0, num_ctx=2048))
    lines = mf.splitlines()
    assert "FROM ./twin-q8_0.gguf" in lines and f'SYSTEM """You are {AUTHOR}."""' in lines
    assert [l for l in lines if l.startswith("PARAMETER stop")] == [f'PARAMETER stop "{s}"' for s in stops] and stops[0] == tok.eos_token
    assert "PARAMETER temperature 0.0" in lines and "PARAMETER num_ctx 2048" in lines
    template = re.search(r'TEMPLATE """(.*?)"""', mf, re.S).group(1)
    assert template == ollama_template(p) and "{{-" not in template
    with pytest.raises(ValueError, match="cannot hold"): modelfile("x.gguf", template, 'He said """hi"""', stops, {})

@pytest.mark.skipif(shutil.which("go") is None, reason="no go toolchain (Debian: apt-get install golang-go)")
def test_go_text_template_renders_like_jinja(tok):
    "Go's own text/template (Ollama's engine) renders the Modelfile TEMPLATE exactly as the Jinja chat template."
    convs = [[{"role": "user", "content": "hi"}], *check_messages_for(AUTHOR, 1),
             [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]]
    assert render_go(ollama_template(template_pieces(tok)), convs) == [
        tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]

def test_bad_input_is_refused_with_the_reason(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="dvc repro dpo"): export_source("models/no-such-model", ROOT)
    with pytest.raises(ParamsError, match="export.precision"): section_params("export", precision="q4_k_m")
    with pytest.raises(ParamsError, match="export.name"): section_params("export", name="My Twin")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg.save_pretrained(tmp_path/"no-weights"); tok.save_pretrained(tmp_path/"no-weights")
    with pytest.raises(FileNotFoundError, match="safetensors"): write_gguf(tmp_path/"no-weights", tmp_path/"x.gguf")
    with pytest.raises(ValueError, match="allowed"): write_gguf(tmp_path/"no-weights", tmp_path/"x.gguf", "q4_k")
    from transformers import GPT2Config
    GPT2Config(n_layer=1).save_pretrained(tmp_path/"gpt2")
    with pytest.raises(ValueError, match="Llama-architecture"): write_gguf(tmp_path/"gpt2", tmp_path/"x.gguf")
    with pytest.raises(ValueError, match="embedding rows"):
        from llmtwin_nb.export import gguf_vocab
        gguf_vocab(tok, 100)
    with pytest.raises(FileNotFoundError, match="no such GGUF"): load_gguf(tmp_path/"missing.gguf")
    assert not (tmp_path/"x.gguf").exists()

def test_conventions_match_llama_cpp_converter():
    """The packaged SmolLM2 GGUF was written by llama.cpp's convert_hf_to_gguf.py: our tokenizer metadata equals its, and
    permute_qk of the folder core dequantized from it gives back its attn_q / attn_k exactly."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig
    from llmtwin_nb.core import PACKAGED, package_dir, resolve_model
    from llmtwin_nb.export import gguf_vocab
    spec = PACKAGED["smollm2-135m-instruct"]
    rd = gguf.GGUFReader(str(package_dir(spec["package"])/spec["gguf"]))
    f = lambda k: rd.fields[k].contents()
    d = resolve_model("packaged:smollm2-135m-instruct")
    tok, cfg = AutoTokenizer.from_pretrained(d), AutoConfig.from_pretrained(d)
    v = gguf_vocab(tok, cfg.vocab_size)
    assert v["tokens"] == f("tokenizer.ggml.tokens") and [int(t) for t in v["types"]] == f("tokenizer.ggml.token_type")
    assert v["merges"] == f("tokenizer.ggml.merges") and v["pre"] == f("tokenizer.ggml.pre") == "smollm"
    assert [v["special"][k] for k in ("bos", "eos", "unk", "pad")] == [f(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")]
    ref = {t.name: t for t in rd.tensors}
    with safe_open(str(Path(d)/"model.safetensors"), "np") as st:
        for layer in (0, cfg.num_hidden_layers - 1):
            for proj, kv in (("q", cfg.num_attention_heads), ("k", cfg.num_key_value_heads)):
                mine = permute_qk(st.get_tensor(f"model.layers.{layer}.self_attn.{proj}_proj.weight"), cfg.num_attention_heads, kv)
                t = ref[f"blk.{layer}.attn_{proj}.weight"]
                assert (mine == gguf.quants.dequantize(t.data, t.tensor_type)).all(), f"blk.{layer}.attn_{proj} differs from llama.cpp's"


def test_a_near_tie_flip_is_not_a_disagreement_but_a_decisive_one_is():
    "Top-1 agreement is required where the source's choice is decisive (top two > 2x the bound apart), not at near ties."
    a = [torch.tensor([5.0, 4.9, 0.0]), torch.tensor([9.0, 1.0, 0.0]), torch.tensor([3.0, 2.95, 0.0])]
    near = [torch.tensor([4.8, 5.0, 0.0]), torch.tensor([9.1, 1.0, 0.0]), torch.tensor([2.9, 3.0, 0.1])]
    cmp = compare_logits(a, near)
    assert cmp["top1_agreement"] < 0.5 and cmp["max_abs_logit_diff"] <= 0.2 and within_tolerance(cmp, "q8_0"), cmp
    flipped = [a[0], torch.tensor([1.0, 9.0, 0.0]), a[2]]                 # the decisive prompt's choice flips (and moves 8 logits)
    assert not within_tolerance(compare_logits(a, flipped), "q8_0")
    assert not within_tolerance(dict(compare_logits(a, a), top1_agree=[True, False, True]), "f32")   # f32 (bound 1e-3): every choice counts
