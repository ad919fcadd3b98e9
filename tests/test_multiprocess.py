"""Multi-process training (chapters 3 and 4): `accelerate launch` with the repository's 2-process CPU config
(configs/accelerate/cpu_2proc.yaml: torchrun starts 2 processes, the Trainer joins a gloo group) trains SFT and DPO
on tiny data with the same global batch as one process, and gives the same loss curve; only the main process
writes the merged model. The GPU configs (DDP, FSDP, DeepSpeed ZeRO-2/3) are checked to parse; they need GPUs to run.

Comparison: one process with batch_size 2 x grad_accum 2 against two processes with batch_size 2 x grad_accum 1
(global batch 4 both; the distributed sampler gives process k the k-th batch of the same shuffled order, so each
optimiser step sees the same rows). Every logged train loss must agree within LOSS_TOL, both curves must fall, and
the final eval loss must agree within LOSS_TOL and beat the untrained model's.
Measured on a busy 2-core CPU: SFT losses agree to 1.4e-3 (step 1 exactly), DPO losses to 1e-6."""
import json, math, os, re, subprocess, sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT/"configs"/"accelerate"
MODEL = "packaged:smollm2-135m-instruct"
LOSS_TOL = 0.01      # absolute, per logged step (the curves' own step-to-step changes are 0.1-0.3)

def launch(module: str, args: list[str], procs: int, log: Path) -> str:
    "Run `python -m module` (1 process) or `accelerate launch --config_file cpu_2proc.yaml -m module` (2); returns the output."
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    head = [sys.executable, "-m", module] if procs == 1 else \
           [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS/"cpu_2proc.yaml"), "-m", module]
    r = subprocess.run(head + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"{' '.join(head)} failed (exit {r.returncode}); last output:\n{(r.stdout + r.stderr)[-3000:]}"
    return r.stdout + r.stderr

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "16 train / 4 test instruct rows and preference pairs, saved as the stages save them."
    from datasets import Dataset, DatasetDict
    from llmtwin_nb.core import resolve_model
    from llmtwin_nb.instruct import chat_example
    resolve_model(MODEL)            # convert the packaged GGUF once, before two processes want it
    d = tmp_path_factory.mktemp("mp")
    sysm = "You are the author. Write in your own voice."
    ex = lambda i, topic: chat_example(sysm, f"Write one line about {topic} {i}.", f"Line {i}: ship the boring version of {topic} {i} first, then measure p95.")
    DatasetDict(train=Dataset.from_list([ex(i, "topic") for i in range(16)]),
                test=Dataset.from_list([ex(i, "subject") for i in range(4)])).save_to_disk(str(d/"instruct"))
    pair = lambda i, split: dict(prompt=[{"role": "user", "content": f"Write one line about topic {i}."}],
                                 chosen=[{"role": "assistant", "content": f"Ship the boring version of topic {i} first, then measure p95."}],
                                 rejected=[{"role": "assistant", "content": f"As an AI language model, I find topic {i} very interesting."}],
                                 doc_id=f"d{i}", split=split)
    DatasetDict(train=Dataset.from_list([pair(i, "train") for i in range(16)]),
                test=Dataset.from_list([pair(100 + i, "test") for i in range(2)])).save_to_disk(str(d/"preference"))
    return d

SFT_SETTINGS = dict(max_steps=4, max_length=64, batch_size=2, logging_steps=1, eval_steps=4, save_steps=4, min_train_examples=4,
                    target_modules="q_proj,v_proj", lora_r=4, lora_alpha=8, learning_rate=0.001, lora_dropout=0.0, eval_batch_size=2)
DPO_SETTINGS = dict(max_length=64, batch_size=2, logging_steps=1, eval_steps=4, save_steps=4, learning_rate=0.0005, lora_r=4,
                    lora_alpha=8, min_train_pairs=4, resume=False)

def sets(section, settings): return [a for k, v in settings.items() for a in ("-S", f"{section}.{k}={v}")]

@pytest.fixture(scope="module")
def sft_runs(tiny):
    runs = {}
    for procs, accum in ((1, 2), (2, 1)):
        out, log = tiny/f"sft{procs}", tiny/f"sft{procs}.log"
        text = launch("llmtwin_nb.sft", sets("sft", dict(SFT_SETTINGS, grad_accum=accum)) + ["-S", f"models.llm={MODEL}",
                      "--data", str(tiny/"instruct"), "--out", str(out), "--checkpoint-dir", str(tiny/f"sft{procs}-ck"),
                      "--resume", "never", "--metrics", str(tiny/f"sft{procs}.json")], procs, log)
        runs[procs] = dict(m=json.loads((tiny/f"sft{procs}.json").read_text()), out=out, text=text, ck=tiny/f"sft{procs}-ck")
    return runs

@pytest.fixture(scope="module")
def dpo_runs(tiny):
    runs = {}
    for procs, accum in ((1, 2), (2, 1)):
        out, log = tiny/f"dpo{procs}", tiny/f"dpo{procs}.log"
        text = launch("llmtwin_nb.dpo", sets("dpo", dict(DPO_SETTINGS, grad_accum=accum)) + [
                      "--pairs", str(tiny/"preference"), "--model", MODEL, "--out", str(out), "--checkpoint-dir", str(tiny/f"dpo{procs}-ck"),
                      "--max-steps", "4", "--metrics", str(tiny/f"dpo{procs}.json")], procs, log)
        runs[procs] = dict(m=json.loads((tiny/f"dpo{procs}.json").read_text()), out=out, text=text)
    return runs

def check_written_once(run, procs):
    "The run had `procs` processes, rank 0 wrote the merged model, and exactly one process said it wrote it."
    m = run["m"]
    assert m["world_size"] == procs and m["saved_by_rank"] == 0
    assert len(re.findall(r"^rank \d+/\d+: wrote ", run["text"], flags=re.M)) == 1, "the merged model must be written by one process"
    merged = run["out"]/"merged"
    assert (merged/"config.json").exists() and (merged/"model.safetensors").exists() and (run["out"]/"adapter"/"adapter_config.json").exists()
    assert not list(run["out"].rglob("*.tmp*")), "half-written files left behind"

def test_cpu_config_starts_two_processes_and_gpu_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    want = {"cpu_2proc": DistributedType.MULTI_GPU, "ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
            "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}
    for name, kind in want.items():
        c = load_config_from_file(str(CONFIGS/f"{name}.yaml"))
        assert c.distributed_type == kind and c.num_machines == 1, name
    assert load_config_from_file(str(CONFIGS/"cpu_2proc.yaml")).num_processes == 2
    assert load_config_from_file(str(CONFIGS/"deepspeed_zero2.yaml")).deepspeed_config["zero_stage"] == 2
    assert load_config_from_file(str(CONFIGS/"deepspeed_zero3.yaml")).deepspeed_config["zero_stage"] == 3
    readme = (ROOT/"README.md").read_text()
    for name in want: assert f"configs/accelerate/{name}.yaml" in readme, f"README's GPU section does not show the command for {name}.yaml"

def test_sft_two_processes_match_one(sft_runs):
    one, two = sft_runs[1], sft_runs[2]
    check_written_once(one, 1); check_written_once(two, 2)
    # both processes trained: the Trainer saves one RNG state per process in each checkpoint
    ck = next(two["ck"].iterdir())/"checkpoint-4"
    assert (ck/"rng_state_0.pth").exists() and (ck/"rng_state_1.pth").exists()
    assert not (next(one["ck"].iterdir())/"checkpoint-4"/"rng_state_1.pth").exists()
    l1 = [(r["step"], r["loss"]) for r in one["m"]["curve"] if r["loss"] is not None]
    l2 = [(r["step"], r["loss"]) for r in two["m"]["curve"] if r["loss"] is not None]
    print("SFT train loss, 1 process:", l1, "\nSFT train loss, 2 processes:", l2)
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3, 4]
    assert all(abs(a - b) <= LOSS_TOL for (_, a), (_, b) in zip(l1, l2)), (l1, l2)
    assert l1[-1][1] < l1[0][1] and l2[-1][1] < l2[0][1]
    e1, e2 = one["m"]["eval_loss"], two["m"]["eval_loss"]
    print("SFT eval loss: base", one["m"]["eval_loss_base"], two["m"]["eval_loss_base"], "trained", e1, e2)
    assert abs(one["m"]["eval_loss_base"] - two["m"]["eval_loss_base"]) <= 1e-3
    assert abs(e1 - e2) <= LOSS_TOL and e1 < one["m"]["eval_loss_base"] and e2 < two["m"]["eval_loss_base"]

def test_dpo_two_processes_match_one(dpo_runs):
    one, two = dpo_runs[1], dpo_runs[2]
    check_written_once(one, 1); check_written_once(two, 2)
    f = lambda run: [(r["step"], r["train_loss"]) for r in run["m"]["curve"] if r["train_loss"] != ""]
    l1, l2 = f(one), f(two)
    print("DPO train loss, 1 process:", l1, "\nDPO train loss, 2 processes:", l2)
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3, 4]
    assert all(abs(a - b) <= LOSS_TOL for (_, a), (_, b) in zip(l1, l2)), (l1, l2)
    assert abs(l1[0][1] - math.log(2)) < 1e-3 and l1[-1][1] < l1[0][1] and l2[-1][1] < l2[0][1]   # starts at ln 2 (policy = reference)
    e1, e2 = one["m"]["eval"]["eval_loss"], two["m"]["eval"]["eval_loss"]
    print("DPO eval loss:", e1, e2, "reward accuracy:", one["m"]["eval"]["eval_rewards/accuracies"], two["m"]["eval"]["eval_rewards/accuracies"])
    assert abs(e1 - e2) <= LOSS_TOL and e1 < math.log(2) and e2 < math.log(2)
    assert not (two["out"].parent/"dpo2-ck").exists()      # the main process removed the checkpoints after the run
