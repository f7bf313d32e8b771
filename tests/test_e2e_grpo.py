"""End-to-end GRPO: the real CLI, Ray, vLLM and DeepSpeed on the embedded 135M model.

One short run (module fixture) backs every test here: it must learn, log what it promises,
keep vLLM in sync with the learner, and leave a checkpoint that transformers and vLLM load.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GSM8K_DIR, REPO_ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.e2e

STEPS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    cmd = [
        sys.executable, "-m", "rlkd.train", "recipe=grpo_gsm8k",
        f"data.path={GSM8K_DIR}", f"run.dir={run_dir}",
        f"trainer.max_steps={STEPS}", "trainer.eval_every=6", "trainer.eval_samples=8",
        "trainer.save_every=6", "eval.max_new_tokens=64",
        "rollout.max_new_tokens=48", "grpo.group_size=8", "grpo.prompts_per_step=2",
        "learner.lr=2e-5", "learner.dtype=float32", "rollout.dtype=float32",  # fp32 both sides: a missed sync must show
        # A dense shaping reward, loaded by file path like any user reward, gives every group
        # a learning signal from step 1, so a few steps show learning with margin.
        "rewards.funcs=[tests/data/shaping_rewards.py:concise,gsm8k_correct]",
        "rewards.weights=[1.0,0.0]",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_rises(run_dir):
    rewards = [m["reward/total_mean"] for m in _metrics(run_dir)]
    assert len(rewards) == STEPS
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards


def test_rollouts_sample_from_the_learner_policy(run_dir):
    # vLLM's sampling logprobs and the learner's agree only if every sync landed: a missed
    # sync shows up as a mismatch of the size of the update itself.
    for m in _metrics(run_dir):
        assert m["train/logp_mismatch"] < 1e-3, (m["step"], m["train/logp_mismatch"])


def test_run_outputs(run_dir):
    rows = _metrics(run_dir)
    for key in ("reward/concise", "reward/gsm8k_correct", "completion/mean_tokens", "train/clip_frac",
                "train/logp_mismatch", "time/generate", "time/reward", "time/train", "time/sync"):
        assert key in rows[-1], key
    assert "eval/accuracy" in rows[5] and "eval/accuracy" in rows[-1]
    for name in ("config.yaml", "rewards.png", "training.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]


def _greedy_hf(path, prompt, max_new_tokens=24):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_checkpoint_loads_in_transformers_and_vllm(run_dir):
    ckpt = run_dir / f"checkpoint-{STEPS}"
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                     tokenize=False, add_generation_prompt=True)
    hf_text = _greedy_hf(ckpt, prompt)
    assert hf_text.strip()
    script = textwrap.dedent(f"""
        import json, sys
        if __name__ == "__main__":
            from rlkd.rollout import RolloutWorker, SamplingSpec
            w = RolloutWorker({str(ckpt)!r}, max_model_len=512)
            g = w.generate([sys.argv[1]], SamplingSpec(n=1, max_tokens=24, temperature=0.0))
            print("RESULT" + json.dumps(g.texts[0]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, prompt], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm_text = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    # Both run the checkpoint in float32 with greedy decoding, so the texts agree.
    assert vllm_text.strip() == hf_text.strip()
