"""Chapter 3 (SFT): interrupted training resumes from its checkpoint; a checkpoint of another configuration is
refused; the dataset builder respects the document split and decontaminates against evaluation sets.
Tiny configurations on the packaged SmolLM2-135M (4 steps, max_length 64) so the file runs in well under a minute."""
import copy, json, os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmtwin_nb.core import load_llm, section_params
from llmtwin_nb.instruct import build_instruct_dataset, chat_example, example_tokens, load_evalsets, split_extracts
from llmtwin_nb.sft import CONFIG_FILE, CheckpointMismatch, last_checkpoint, train_sft

MODEL = "packaged:smollm2-135m-instruct"

@pytest.fixture(scope="module")
def base():
    return load_llm(MODEL, "cpu")

def tiny_cfg(**kw):
    return section_params("sft", {**dict(max_length=64, max_steps=4, batch_size=2, grad_accum=1, logging_steps=1, eval_steps=2,
                                         save_steps=2, min_train_examples=4, target_modules="q_proj,v_proj", lora_r=4, lora_alpha=8,
                                         learning_rate=1e-3), **kw})

def tiny_ds(tok, n=12):
    from datasets import Dataset
    rows = [chat_example("You are Ilse.", f"Write one line about topic {i}.", f"Line {i}: ship the boring version first, then measure p95.")
            for i in range(n)]
    for r in rows: r["tokens"] = example_tokens(tok, r)
    return Dataset.from_list(rows)

class Stop(Exception): pass

def test_interrupted_run_resumes_to_the_same_step(base, tmp_path):
    from transformers import TrainerCallback
    model, tok = base
    ds = tiny_ds(tok); cfg = tiny_cfg()

    class Crash(TrainerCallback):       # dies right after step 3 (checkpoint-2 exists, step 3 is lost)
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3: raise Stop()
    with pytest.raises(Stop):
        train_sft(ds, None, cfg, MODEL, data_version="v1", checkpoint_dir=tmp_path, device="cpu",
                  model=copy.deepcopy(model), tokenizer=tok, callbacks=[Crash()], eval_base=False)
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1
    ck = last_checkpoint(folders[0])
    assert ck is not None and ck.name == "checkpoint-2" and (ck/CONFIG_FILE).exists()
    run = train_sft(ds, None, cfg, MODEL, data_version="v1", checkpoint_dir=tmp_path, device="cpu",
                    model=copy.deepcopy(model), tokenizer=tok)
    assert run["metrics"]["resumed_from"] == str(ck)
    assert run["trainer"].state.global_step == 4 and run["metrics"]["global_step"] == 4
    steps = [h["step"] for h in run["trainer"].state.log_history if "loss" in h]
    assert steps[:2] == [1, 2] and steps[-1] == 4      # the log history before the crash was restored from the checkpoint

def test_resume_from_another_configuration_is_refused(base, tmp_path):
    model, tok = base
    ds = tiny_ds(tok)
    run = train_sft(ds, None, tiny_cfg(max_steps=2), MODEL, data_version="v1", checkpoint_dir=tmp_path, device="cpu",
                    model=copy.deepcopy(model), tokenizer=tok)
    ck = last_checkpoint(run["out_dir"])
    with pytest.raises(CheckpointMismatch, match="lora_r"):
        train_sft(ds, None, tiny_cfg(max_steps=2, lora_r=8), MODEL, data_version="v1", checkpoint_dir=tmp_path, device="cpu",
                  resume=ck, model=copy.deepcopy(model), tokenizer=tok)
    with pytest.raises(CheckpointMismatch, match="data_version"):
        train_sft(ds, None, tiny_cfg(max_steps=2), MODEL, data_version="v2", checkpoint_dir=tmp_path, device="cpu",
                  resume=ck, model=copy.deepcopy(model), tokenizer=tok)

def test_too_long_rows_and_tiny_datasets_are_refused(base, tmp_path):
    model, tok = base
    ds = tiny_ds(tok)
    with pytest.raises(ValueError, match="longer than sft.max_length = 16"):
        train_sft(ds, None, tiny_cfg(max_length=32).model_copy(update=dict(max_length=16)), MODEL, checkpoint_dir=tmp_path, model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="only 3 training examples"):
        train_sft(ds.select(range(3)), None, tiny_cfg(), MODEL, checkpoint_dir=tmp_path, model=model, tokenizer=tok)

def _doc(i, split, text):
    return dict(id=f"{i:016x}", author="Ilse Marchetti", platform="medium", kind="article", title=f"Essay {i}",
                content=text, split=split, status="active")

def test_builder_respects_split_and_decontaminates(base, tmp_path):
    _, tok = base
    para = lambda i, j: (f"Here's the thing about system {i} part {j}: we measured the latency of the service for a week and the "
                         f"p95 was {100 + i * 10 + j} ms while the mean looked fine, so we fixed the slow path in module {i}{j} first.")
    docs = [_doc(i, "test" if i >= 4 else "train", "\n\n".join(para(i, j) for j in range(4))) for i in range(6)]
    secret = "The Lodestar geocoder outage lasted forty-one minutes on the seventeenth of January, and our own clients caused it."
    docs[1]["content"] += "\n\n" + secret + " " + para(1, 9)
    (tmp_path/"qa.jsonl").write_text(json.dumps(dict(id="q", text="Q: how long was the outage? A: the Lodestar geocoder outage lasted forty-one minutes", doc_ids=[docs[1]["id"]])) + "\n")
    cfg = section_params("sft", dict(extract_min_chars=100, extract_max_chars=300, max_llm_calls=0, max_length=128, dedup_jaccard=0.95))
    ds, rep = build_instruct_dataset(docs, tok, cfg, backend=None, evalsets=load_evalsets(tmp_path), seed=1)
    train_ids, test_ids = set(ds["train"]["doc_id"]), set(ds["test"]["doc_id"])
    assert train_ids == {d["id"] for d in docs[:4]} and test_ids == {d["id"] for d in docs[4:]}
    assert rep["contaminated_by"] == {"qa": 1} and rep["dropped_contaminated"] == 1
    answers = [r["completion"][0]["content"] for s in ds for r in ds[s]]
    assert not any(secret in a for a in answers) and len(answers) == rep["extracts"] - 1
    assert set(rep["instruction_source"]) <= {"section", "opening", "continuation", "outline"} and rep.get("llm_calls", 0) == 0
    assert set(ds["test"]["instruction_source"]) <= {"section", "opening", "continuation", "outline"}   # sft.test_tasks
    assert {"continuation", "outline"} & set(ds["train"]["instruction_source"])
    assert all(r["prompt"][0]["content"] == "You are Ilse Marchetti. Write in your own voice." for r in ds["train"])
    # same seed, same rows
    ds2, _ = build_instruct_dataset(docs, tok, cfg, backend=None, evalsets=load_evalsets(tmp_path), seed=1)
    assert ds2["train"]["completion"] == ds["train"]["completion"]

def test_split_extracts_are_paragraph_aligned():
    text = "\n\n".join(f"Paragraph {i} " + "x" * 150 for i in range(5))
    ex = split_extracts(text, 100, 400)
    assert all(e.startswith("Paragraph") and len(e) <= 400 for e in ex)
    assert "\n\n".join(ex) == text

def test_builder_keeps_only_the_twins_documents(base):
    "A warehouse of two authors: the twin's documents become rows, the other author's are counted and never used."
    _, tok = base
    para = lambda i, j: (f"We measured the latency of service {i} for a week, part {j}: the p95 was {100 + i * 10 + j} ms while the "
                         f"mean looked fine, so we fixed the slow path in module {i}{j} before anything else.")
    theirs = lambda i, j: (f"Okay, story time! Label party number {i}, round {j}: we looked at {50 + i + j} raw examples of the yield "
                           f"forecast before any metric, and the spreadsheet told us more than the dashboard ever did!")
    twin = [_doc(i, "test" if i >= 3 else "train", "\n\n".join(para(i, j) for j in range(4))) for i in range(4)]
    other = [dict(_doc(10 + i, "test" if i == 0 else "train", "\n\n".join(theirs(i, j) for j in range(4))), author="Marisol Vega")
             for i in range(3)]
    cfg = section_params("sft", dict(extract_min_chars=100, extract_max_chars=300, max_llm_calls=0, max_length=128, dedup_jaccard=0.95))
    ds, rep = build_instruct_dataset(other + twin, tok, cfg, backend=None, seed=1, author="Ilse Marchetti", log=lambda *a: None)
    assert set(ds["train"]["doc_id"]) | set(ds["test"]["doc_id"]) == {d["id"] for d in twin}
    assert (rep["documents"], rep["documents_other_authors"], rep["author"]) == (4, 3, "Ilse Marchetti")
    assert rep["documents_per_kind"] == {"article": 4, "post": 0, "repository": 0}      # kinds without documents: reported, no error
    assert {r["prompt"][0]["content"] for s in ds for r in ds[s]} == {"You are Ilse Marchetti. Write in your own voice."}
    ds_all, _ = build_instruct_dataset(other + twin, tok, cfg, backend=None, seed=1, log=lambda *a: None)   # no author: everybody's rows
    assert {d["id"] for d in other} <= set(ds_all["train"]["doc_id"]) | set(ds_all["test"]["doc_id"])
    with pytest.raises(ValueError, match="set data.author"):
        build_instruct_dataset(twin, tok, cfg, author="Marisol Vega")

def test_process_rank_and_device_follow_the_launcher(monkeypatch):
    "A plain run is rank 0 of 1 on the device asked for; under a launcher the env decides; the CPU path is never changed."
    from llmtwin_nb.sft import process_rank, is_main_process, local_device, ddp_args
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"): monkeypatch.delenv(k, raising=False)
    assert process_rank() == (0, 0, 1) and is_main_process() and ddp_args() == {} and local_device("cpu") == "cpu"
    monkeypatch.setenv("RANK", "3"); monkeypatch.setenv("LOCAL_RANK", "1"); monkeypatch.setenv("WORLD_SIZE", "4")
    assert process_rank() == (3, 1, 4) and not is_main_process() and local_device("cpu") == "cpu"
    assert ddp_args() == dict(ddp_find_unused_parameters=False)

def test_test_tasks_ask_every_test_extract_once_per_task(base):
    "A test document of 3 extracts gives 1 opening + 2 section + 2 continuation rows; the train rows do not depend on test_tasks."
    _, tok = base
    para = lambda i, j: (f"Here's the thing about system {i} part {j}: we measured the latency of the service for a week and the "
                         f"p95 was {100 + i * 10 + j} ms while the mean looked fine, so we fixed the slow path in module {i}{j} first.")
    docs = [_doc(i, "test" if i == 3 else "train", "\n\n".join(para(i, j) for j in range(3))) for i in range(4)]
    cfg = section_params("sft", dict(extract_min_chars=100, extract_max_chars=300, max_llm_calls=0, max_length=192, dedup_jaccard=0.95,
                                     test_tasks=["section", "continuation"]))
    ds, rep = build_instruct_dataset(docs, tok, cfg, seed=1, log=lambda *a: None)
    assert rep["test_tasks"] == {"opening": 1, "section": 2, "continuation": 2} and rep["test_task_dropped"] == 0
    assert len(ds["test"]) == rep["test_examples"] == 5 and set(ds["test"]["doc_id"]) == {docs[3]["id"]}
    cont = [r for r in ds["test"] if r["instruction_source"] == "continuation"]
    assert all(r["prompt"][1]["content"].startswith("Continue your Medium article 'Essay 3'") for r in cont)
    one, rep_one = build_instruct_dataset(docs, tok, cfg.model_copy(update=dict(test_tasks=["section"])), seed=1, log=lambda *a: None)
    assert one["train"][:] == ds["train"][:] and rep_one["test_tasks"] == {"opening": 1, "section": 2}
    short, rep_short = build_instruct_dataset(docs, tok, cfg.model_copy(update=dict(max_length=128)), seed=1, log=lambda *a: None)
    assert rep_short["test_tasks"].get("continuation", 0) + rep_short["test_task_dropped"] == 2        # too long: dropped, not replaced
    assert {k: v for k, v in rep_short["test_tasks"].items() if k != "continuation"} == {"opening": 1, "section": 2}
    with pytest.raises(Exception, match="each test task once"):
        section_params("sft", dict(test_tasks=["section", "section"]))
    assert section_params("sft", dict(kinds=["article"])).kinds == ["article"]
