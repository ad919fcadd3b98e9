"""DPO chapter: the pair builder's filters and split, refusals of bad pairs, checkpoint resume and a foreign
config's checkpoint refused. Training runs on a tiny randomly initialised Llama with SmolLM2's tokenizer, so the
whole file stays well under a minute on 2 CPU cores."""
import json, os, random, shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmtwin_nb.core import section_params, resolve_model
from llmtwin_nb.dpo import (select_prompts, make_pairs, check_pairs, keep_chosen, is_complete, train_dpo, prepare_checkpoints,
                            dpo_config, check_reference, check_adapter_base, merge_adapter, load_instruct, judge_pairs, curves_table)
from llmtwin_nb.sft import CheckpointMismatch

WORDS = ("parquet laptop cluster queue retry backoff rollout rollback mean latency budget heater dashboard notebook eval "
         "leaderboard lasagne router bicycle river harbour freight container schema index shard cache").split()

def answer(i, n=20): return " ".join(random.Random(i).sample(WORDS, n)).capitalize() + ", and that is the whole point."

def row(i, doc, split, chosen=None):
    return dict(prompt=[{"role": "system", "content": "You are Ilse."}, {"role": "user", "content": f"Write about topic {i}."}],
                chosen=chosen if chosen is not None else answer(i), doc_id=doc, split=split)

def rows(n=40):
    return [row(i, f"doc{i % 8}", "test" if i % 8 in (0, 1) else "train") for i in range(n)]

# ---------------------------------------------------------------- the pair builder
def test_filters_drop_short_incomplete_duplicate_and_contaminated():
    rs = rows(40)
    rs.append(row(100, "doc2", "train", "Too short."))
    rs.append(row(101, "doc2", "train", answer(101) + " and then the queue"))        # incomplete last sentence
    rs.append(row(102, "doc3", "train", rs[5]["chosen"]))                            # duplicate answer (same instruction words but 102)
    rs.append(row(103, "doc4", "train", answer(103)))
    evalsets = {"qa": [dict(id="q", text="Question: " + rs[-1]["chosen"], doc_ids=["doc4"])]}
    sel, rep = select_prompts(rs, min_chars=100, max_train=1000, max_test=1000, seed=1, evalsets=evalsets, ngram=8)
    assert rep["shorter than 100 characters"] == 1 and rep["incomplete last sentence"] == 1
    assert rep["duplicate"] == 1 and rep["contaminated"] == 1
    assert len(sel["train"]) + len(sel["test"]) == 40 - 0 and all(keep_chosen(r["chosen"]) is None for s in sel.values() for r in s)

def test_split_is_by_document_and_capped():
    sel, _ = select_prompts(rows(40), max_train=12, max_test=5, seed=3)
    assert (len(sel["train"]), len(sel["test"])) == (12, 5)
    assert {r["doc_id"] for r in sel["test"]} <= {"doc0", "doc1"}
    assert not {r["doc_id"] for r in sel["train"]} & {"doc0", "doc1"}
    again, _ = select_prompts(rows(40), max_train=12, max_test=5, seed=3)
    assert again == sel                                                            # deterministic for a seed
    leak = rows(40) + [row(200, "doc3", "test", answer(200))]                         # doc3 is a train document
    with pytest.raises(ValueError, match="both splits"): select_prompts(leak)

def test_complete_sentences():
    assert is_complete("It ends.") and is_complete("Does it?") and is_complete("```\ncode\n```")
    assert not is_complete("```\ncode") and not is_complete("no end") and not is_complete("")

def test_chosen_equal_rejected_and_empty_refused():
    rs = [row(i, "d", "train") for i in range(3)]
    pairs, rep = make_pairs(rs, ["A generic answer.", "", rs[2]["chosen"].upper()])
    assert len(pairs) == 1 and rep == {"empty rejected": 1, "chosen == rejected": 1}
    with pytest.raises(ValueError, match="chosen == rejected"):
        check_pairs([dict(prompt=[{"role": "user", "content": "q"}], chosen=[{"role": "assistant", "content": "same"}],
                          rejected=[{"role": "assistant", "content": "same"}])])
    with pytest.raises(ValueError, match="`chosen` is empty"): check_pairs([dict(prompt="q", chosen="", rejected="b")])
    with pytest.raises(ValueError, match="no `prompt` field"): check_pairs([dict(chosen="a", rejected="b")])

def test_load_instruct_reads_the_sft_layout(tmp_path):
    from datasets import Dataset, DatasetDict
    mk = lambda i: dict(prompt=[{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}],
                        completion=[{"role": "assistant", "content": answer(i)}], doc_id=f"d{i}")
    DatasetDict(train=Dataset.from_list([mk(1), mk(2)]), test=Dataset.from_list([mk(3)])).save_to_disk(str(tmp_path/"i"))
    got = load_instruct(tmp_path/"i")
    assert [(r["doc_id"], r["split"]) for r in got] == [("d1", "train"), ("d2", "train"), ("d3", "test")]
    assert got[0]["chosen"] == answer(1) and got[0]["prompt"][1]["content"] == "q1"

class FakeJudge:
    "A deterministic judge that always prefers the longer answer (stands in for an endpoint in this unit test)."
    def __init__(self): self.calls = 0
    def chat(self, messages, max_new_tokens=None, temperature=None, **kw):
        import re
        from llmtwin_nb.core import ChatResult
        self.calls += 1
        t = messages[0]["content"]
        a = re.search(r"Answer A:\n(.*?)\n\nAnswer B:", t, re.S).group(1); b = t.split("Answer B:\n", 1)[1]
        return ChatResult("A" if len(a) > len(b) else "B", "fake")

def test_judge_keeps_pairs_it_agrees_with_in_either_order():
    rs = [row(i, "d", "train") for i in range(10)]
    pairs, _ = make_pairs(rs, ["Short generic reply." if i % 2 else answer(i, 26) + " Longer than the author." for i in range(10)])
    kept, dropped = judge_pairs(pairs, FakeJudge(), seed=0)
    assert (len(kept), dropped) == (5, 5) and all(len(p["chosen"][0]["content"]) > len(p["rejected"][0]["content"]) for p in kept)

# ---------------------------------------------------------------- training: resume, refusals
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    "A 2-layer Llama with SmolLM2's real tokenizer and chat template (random weights: this tests the machinery)."
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(resolve_model("packaged:smollm2-135m-instruct"))
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    d = tmp_path_factory.mktemp("tiny")/"model"
    m.save_pretrained(d); tok.save_pretrained(d)
    return str(d)

def tiny_pairs(n, split):
    rs = [row(i, f"d{i}", split) for i in range(n)]
    return make_pairs(rs, [f"Certainly! Here is a generic answer number {i}." for i in range(n)])[0]

def tiny_cfg(**kw):
    return section_params("dpo", **{**dict(max_length=64, batch_size=2, grad_accum=1, eval_steps=2, save_steps=2, lora_r=4,
                                           lora_alpha=8, learning_rate=1e-3, epochs=1), **kw})

def test_resume_from_checkpoint_and_foreign_config_refused(tiny_model, tmp_path):
    train, test = tiny_pairs(8, "train"), tiny_pairs(2, "test")           # 4 steps at batch 2
    cfg = tiny_cfg(); ck = tmp_path/"ck"
    first = train_dpo(tiny_model, train, test, cfg, tmp_path/"out", ck, seed=0, device="cpu", stop_after=2, log=None)
    assert first["interrupted"] and first["global_step"] == 2 and (ck/"checkpoint-2").is_dir()
    # another config finds those checkpoints: refused, naming what differs
    with pytest.raises(CheckpointMismatch, match="another configuration"):
        train_dpo(tiny_model, train, test, tiny_cfg(beta=0.3), tmp_path/"out", ck, seed=0, device="cpu", log=None)
    # the same config resumes from step 2 and finishes
    done = train_dpo(tiny_model, train, test, cfg, tmp_path/"out", ck, seed=0, device="cpu", log=None)
    assert done["resumed_from"].endswith("checkpoint-2") and done["global_step"] == 4 and not done["interrupted"]
    steps = [h["step"] for h in done["log_history"] if "eval_loss" in h]
    assert steps and max(steps) == 4
    assert not ck.exists() and (tmp_path/"out"/"adapter"/"adapter_config.json").exists()
    assert curves_table(done["log_history"])[-1]["step"] == 4
    # the adapter merges onto its own base, and is refused on another
    merge_adapter(tiny_model, tmp_path/"out"/"adapter", tmp_path/"merged")
    assert (tmp_path/"merged"/"config.json").exists()
    other = tmp_path/"other"; shutil.copytree(tiny_model, other)
    (other/"config.json").write_text((other/"config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 32 '))
    os.utime(other/"model.safetensors", (1, 1))                                   # different weights file stamp
    with pytest.raises(ValueError, match="trained on base"): check_adapter_base(tmp_path/"out"/"adapter", other)

def test_reference_mismatch_refused(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(tiny_model); tok = AutoTokenizer.from_pretrained(tiny_model)
    tok2 = AutoTokenizer.from_pretrained(tiny_model); tok2.add_tokens(["<twin>"])
    with pytest.raises(ValueError, match="tokenizers differ"): check_reference(m, tok, m, tok2)
    m2 = AutoModelForCausalLM.from_pretrained(tiny_model); m2.resize_token_embeddings(len(tok) + 64)
    with pytest.raises(ValueError, match="embeddings"): check_reference(m, tok, m2, tok)
    check_reference(m, tok, AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model))

def test_bad_pairs_refused_before_training(tiny_model, tmp_path):
    bad = tiny_pairs(4, "train"); bad[1]["rejected"] = bad[1]["chosen"]
    with pytest.raises(ValueError, match="pair 1: chosen == rejected"):
        train_dpo(tiny_model, bad, tiny_pairs(2, "test"), tiny_cfg(), tmp_path/"o", tmp_path/"c", device="cpu", log=None)


def test_feedback_pairs_are_loaded_in_the_chapter_schema(tmp_path):
    "The feedback stage's preference.jsonl -> training pairs: missing or empty file adds none, a bad line names file and line."
    from llmtwin_nb.dpo import check_pairs, load_feedback_pairs
    pair = dict(prompt=[{"role": "user", "content": "Why p95?"}], chosen=[{"role": "assistant", "content": "The mean hides slow requests."}],
                rejected=[{"role": "assistant", "content": "Certainly! Latency matters."}], doc_id="feedback-0123", split="train",
                source="correction", trace_id="0123", variant="a", template_id="chat", rejected_trace_id="0123")
    f = tmp_path/"preference.jsonl"
    assert load_feedback_pairs(f) == []
    f.write_text("")
    assert load_feedback_pairs(f) == []
    f.write_text(json.dumps(pair) + "\n\n" + json.dumps(dict(pair, doc_id=None)) + "\n")
    got = load_feedback_pairs(f)
    assert len(got) == 2 and check_pairs(got) == 2 and set(got[0]) == {"prompt", "chosen", "rejected", "doc_id", "split"}
    assert got[0]["doc_id"] == "feedback-0123" and got[1]["doc_id"].startswith("feedback-") and {p["split"] for p in got} == {"train"}
    f.write_text(json.dumps(pair) + "\n{torn\n")
    with pytest.raises(ValueError, match="preference.jsonl: line 2 is not valid JSON"): load_feedback_pairs(f)
    f.write_text(json.dumps(dict(pair, rejected=pair["chosen"])) + "\n")
    with pytest.raises(ValueError, match="chosen == rejected"): load_feedback_pairs(f)


def test_pairs_come_only_from_the_twins_documents(monkeypatch):
    "Instruct rows of documents that are not the twin's are dropped and counted; too few pairs is an error saying what to change."
    from llmtwin_nb import dpo
    from llmtwin_nb.core import ChatResult
    twin_ids = {f"doc{i}" for i in range(8)}
    other = [row(100 + i, f"other{i % 4}", "test" if i % 4 == 0 else "train") for i in range(20)]
    sel, rep = select_prompts(rows(40) + other, max_train=1000, max_test=1000, doc_ids=twin_ids)
    assert rep["other author"] == 20 and {r["doc_id"] for s in sel.values() for r in s} <= twin_ids
    monkeypatch.setattr(dpo, "generate_answers", lambda backend, prompts, *a, **kw:
                        [ChatResult(f"Certainly! Here is a generic answer, number {i}.", "fake") for i in range(len(prompts))])
    cfg = section_params("dpo", max_train_pairs=64, min_train_pairs=20, max_test_pairs=8)
    pairs, rep = dpo.build_preference(rows(40) + other, None, cfg, seed=1, doc_ids=twin_ids, log=None)
    assert rep["other author"] == 20 and {p["doc_id"] for s in pairs.values() for p in s} <= twin_ids
    assert len(pairs["train"]) == 30 and len(pairs["test"]) == 8
    # a dropped pair (here: an empty rejected answer for every 4th topic) is refilled from the next prompts, up to the cap
    import re
    monkeypatch.setattr(dpo, "generate_answers", lambda backend, prompts, *a, **kw:
                        [ChatResult("" if int(re.search(r"topic (\d+)", p[-1]["content"]).group(1)) % 4 == 0 else "Certainly! A generic answer.", "fake")
                         for p in prompts])
    pairs, rep = dpo.build_preference(rows(40), None, section_params("dpo", max_train_pairs=20, min_train_pairs=10, max_test_pairs=4), seed=1, log=None)
    assert len(pairs["train"]) == 20 and 20 < rep["train_prompts_generated"] < 30 and rep["empty rejected"] > 0
    pairs, rep = dpo.build_preference(rows(40), None, section_params("dpo", max_train_pairs=28, min_train_pairs=10, max_test_pairs=4), seed=1, log=None)
    assert len(pairs["train"]) == 25 and rep["train_prompts_generated"] == 30      # 5 of the 30 train prompts can never pair
    with pytest.raises(ValueError, match=r"only 30 training pairs \(dpo.min_train_pairs = 31\).*lower dpo.min_train_pairs"):
        dpo.build_preference(rows(40) + other, None, section_params("dpo", min_train_pairs=31), seed=1, doc_ids=twin_ids, log=None)
    with pytest.raises(Exception, match="min_train_pairs"):
        section_params("dpo", min_train_pairs=80, max_train_pairs=64)

# ---------------------------------------------------------------- several processes (accelerate launch)
def test_only_the_main_process_touches_the_checkpoint_folder(tmp_path, monkeypatch):
    "Under a 2-process launch, rank 1 neither deletes nor rewrites the checkpoint folder, and agrees with rank 0 on resuming."
    c = dict(a=1, config_hash="aaa"); d = tmp_path/"ck"
    (d/"checkpoint-4").mkdir(parents=True); (d/"checkpoint-4"/"llmtwin_sft_config.json").write_text(json.dumps(c))
    (d/"llmtwin_sft_config.json").write_text("rank 0 wrote this")
    monkeypatch.setenv("RANK", "1"); monkeypatch.setenv("LOCAL_RANK", "1"); monkeypatch.setenv("WORLD_SIZE", "2")
    assert prepare_checkpoints(d, c, resume=True).name == "checkpoint-4"       # the same answer as rank 0 ...
    assert prepare_checkpoints(d, c, resume=False) is None                     # ... and a fresh start without deleting
    assert (d/"checkpoint-4").is_dir() and (d/"llmtwin_sft_config.json").read_text() == "rank 0 wrote this"
    monkeypatch.setenv("RANK", "0"); monkeypatch.setenv("LOCAL_RANK", "0")
    assert prepare_checkpoints(d, c, resume=False) is None and not (d/"checkpoint-4").exists()   # rank 0 deletes and writes
    assert json.loads((d/"llmtwin_sft_config.json").read_text()) == c
