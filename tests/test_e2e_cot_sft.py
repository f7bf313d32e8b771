"""End-to-end CoT -> filter -> SFT: the real CLI, Ray, vLLM and DeepSpeed on the embedded model.

The teacher is primed with the gold answer, a few dozen questions get two samples each and the
default filters keep the correct, well-formed ones. The 135M teacher gets few right, so the same
samples are re-filtered (cot.samples=, no generation) with correctness and format off to give
the student enough to train on for a few epochs: the loss must fall and the checkpoint must
load and generate.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import GSM8K_DIR, REPO_ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.e2e


def _run(*args, timeout=1800):
    proc = subprocess.run([sys.executable, "-m", "rlkd.train", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def cot_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cot") / "run"
    _run("recipe=cot_gsm8k", f"data.path={GSM8K_DIR}", f"run.dir={out}", "cot.num_questions=32",
         "cot.prompt_mode=gt_primed", "cot.temperatures=[0.3,0.7]", "cot.max_new_tokens=200",
         "filter.max_per_question=2", "rollout.kv_cache_gb=1", "model.max_model_len=512")
    return out


@pytest.fixture(scope="module")
def loose_dir(cot_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loose") / "run"
    _run("recipe=cot_gsm8k", f"cot.samples={cot_dir}", f"run.dir={out}", "filter.correct=false",
         "filter.answer_line=false", "filter.max_per_question=2")
    return out


@pytest.fixture(scope="module")
def sft_dir(loose_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    _run("recipe=sft_gsm8k", f"data.path={GSM8K_DIR}", f"run.dir={out}", f"sft.data={loose_dir}/kept.jsonl",
         "sft.batch_size=4", "sft.epochs=3", "sft.held_out=4", "sft.packing=true", "sft.max_seq_len=512",
         "learner.lr=2e-5", "learner.micro_batch_size=2", "trainer.eval_every=4", "trainer.eval_samples=4",
         "eval.max_new_tokens=32", "rollout.kv_cache_gb=1", "model.max_model_len=512")
    return out


def test_cot_records_filters_and_reports(cot_dir):
    samples = [json.loads(line) for line in (cot_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 * 2
    assert {s["temperature"] for s in samples} == {0.3, 0.7}
    assert all(s["prompt_mode"] == "gt_primed" and s["num_tokens"] > 0 for s in samples)
    assert all(s["min_logprob"] <= s["mean_logprob"] < 0 for s in samples)
    report = json.loads((cot_dir / "filter_report.json").read_text())
    kept = (cot_dir / "kept.jsonl").read_text().splitlines()
    assert report["kept"] == len(kept) == sum(s["kept"] for s in samples)
    assert report["rejected_by_filter"]["correct"] > 0
    assert report["throughput"]["questions_per_min"] > 0
    for s in samples:  # every kept sample really passes the correctness and format filters
        if s["kept"]:
            assert s["text"].rstrip().splitlines()[-1].replace(" ", "") == f"####{s['gold']}"
    assert (cot_dir / "lengths.png").stat().st_size > 1000


def test_refilter_without_generation(cot_dir, loose_dir):
    strict = json.loads((cot_dir / "filter_report.json").read_text())
    loose = json.loads((loose_dir / "filter_report.json").read_text())
    assert loose["samples"] == strict["samples"] and loose["throughput"] == {}
    assert loose["kept"] >= max(strict["kept"], 24)
    assert loose["rejected_by_filter"]["correct"] == 0


def test_sft_loss_falls_and_checkpoint_loads(sft_dir):
    metrics = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics]
    third = max(len(losses) // 3, 1)
    assert sum(losses[-third:]) / third < 0.9 * sum(losses[:third]) / third, losses
    heldout = [m["eval/heldout_nll"] for m in metrics if "eval/heldout_nll" in m]
    assert len(heldout) >= 2 and "eval/accuracy" in metrics[-1]
    ckpt = sorted(sft_dir.glob("checkpoint-*"))[-1]
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert (sft_dir / "loss.png").exists()
