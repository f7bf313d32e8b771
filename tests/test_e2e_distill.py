"""End-to-end MiniLLM: the real CLI, Ray, vLLM and DeepSpeed, distilling the embedded 135M model
into a student pruned out of it. The student must move towards its teacher on held-out prompts,
and vLLM must load and score with the pruned checkpoint."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GSM8K_DIR, REPO_ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.losses import selective_log_softmax

pytestmark = pytest.mark.e2e

STEPS = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("minillm") / "run"
    cmd = [
        sys.executable, "-m", "rlkd.train", "recipe=minillm_gsm8k",
        f"data.path={GSM8K_DIR}", f"run.dir={run_dir}",
        f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}", "trainer.eval_samples=4",
        "trainer.save_every=0", "eval.max_new_tokens=32", "rollout.max_new_tokens=32",
        "grpo.group_size=4", "grpo.prompts_per_step=2", "distill.kl_eval_prompts=8",
        "distill.kl_eval_samples=2", "learner.lr=1e-4", "rollout.kv_cache_gb=1",
        # fp32 on both sides: with bf16 (the default on AVX-512-bf16 CPUs) the sampler's noise
        # (0.15 nats/token on the pruned student) makes 6 steps at this lr too noisy to assert a
        # 25% drop: 6.3 -> 4.1 measured, against 6.1 -> 1.7 in fp32.
        "learner.dtype=float32", "rollout.dtype=float32",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_held_out_reverse_kl_decreases(run_dir):
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    before, after = rows[0]["eval/reverse_kl"], rows[-1]["eval/reverse_kl"]
    assert after < 0.75 * before, (before, after)
    assert all(r["train/single_step_kl"] > 0 for r in rows[1:])


def test_pruned_student_is_smaller_and_checkpoint_saved(run_dir):
    first = _metrics(run_dir)[0]
    assert first["params/student"] < 0.8 * first["params/teacher_0"]
    assert (run_dir / f"checkpoint-{STEPS}" / "config.json").is_file()
    assert (run_dir / "distill.png").stat().st_size > 0


def test_teacher_worker_scores_the_pruned_checkpoint_like_transformers(run_dir):
    path = run_dir / "student-init"
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok("Question: What is 12 + 30?\nAnswer:", add_special_tokens=False).input_ids
    completion = tok(" 12 + 30 = 42.\n#### 42", add_special_tokens=False).input_ids
    script = textwrap.dedent(f"""
        import json
        if __name__ == "__main__":
            from rlkd.actors.teacher import TeacherWorker
            w = TeacherWorker({str(path)!r}, max_model_len=256, kv_cache_gb=1)
            print("RESULT" + json.dumps(w.score([{prompt}], [{completion}])[0]))
            w.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm_scores = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        hf = selective_log_softmax(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0, len(prompt) - 1:]
    assert len(vllm_scores) == len(completion)
    assert torch.allclose(torch.tensor(vllm_scores), hf.float(), atol=2e-3), (vllm_scores, hf.tolist())
