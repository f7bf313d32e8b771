"""End-to-end GRPO: the real CLI, Ray, vLLM and DeepSpeed on the embedded 135M model.

One short run (module fixture) backs every test here: it must log what it promises, keep vLLM
in sync with the learner, keep the terminal to rlkd's own lines, and leave a checkpoint that
transformers and vLLM load. That GRPO learns (held-out accuracy, not only the reward) is
tests/test_e2e_learning.py's claim.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GSM8K_DIR, REPO_ROOT
from e2e_procs import MECHANICS_ARGS
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.e2e

STEPS = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    cmd = [
        sys.executable, "-m", "rlkd.train", "recipe=grpo_gsm8k",
        f"data.path={GSM8K_DIR}", f"run.dir={run_dir}",
        f"trainer.max_steps={STEPS}", "trainer.eval_every=3", "trainer.eval_samples=8",
        "trainer.save_every=3", "eval.max_new_tokens=64",
        "rollout.max_new_tokens=48", "grpo.group_size=8", "grpo.prompts_per_step=2",
        "learner.lr=2e-5", "learner.dtype=float32", "rollout.dtype=float32",  # fp32 both sides: a missed sync must show
        # A dense shaping reward, loaded by file path like any user reward: every group has
        # signal, so every step trains.
        "rewards.funcs=[tests/data/shaping_rewards.py:concise,gsm8k_correct]",
        "rewards.weights=[1.0,0.0]",
        *MECHANICS_ARGS,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir.parent / "terminal.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


def _metrics(run_dir, untrained=False):
    """The trained steps' rows; with `untrained`, also step 0's (the untrained policy's eval)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows if untrained else [m for m in rows if m["step"] > 0]


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
    assert len(rows) == STEPS and "eval/accuracy" in rows[2] and "eval/accuracy" in rows[-1]
    untrained = _metrics(run_dir, untrained=True)[0]
    assert untrained["step"] == 0 and untrained["eval/num_samples"] == 8
    for step in (0, 3, 6):  # per-question predictions of every eval, for eval.compare
        preds = (run_dir / "eval" / f"step-{step}" / "predictions.jsonl").read_text().splitlines()
        assert len(preds) == 8 and {"id", "correct", "completion"} <= json.loads(preds[0]).keys()
    for name in ("config.yaml", "rewards.png", "training.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_terminal_shows_rlkd_not_the_libraries(run_dir):
    # What vLLM, Ray, DeepSpeed and torch print (a weight sync's "Failed to load weights" among
    # it) goes to logs/run.log; the terminal holds rlkd's lines and the progress bar.
    terminal = (run_dir.parent / "terminal.txt").read_text()
    # Off a terminal the progress bar writes each redraw on its own line; on one it is one line.
    lines = [line for line in terminal.replace("\r", "\n").split("\n") if line.strip()]
    others = [line for line in lines if not line.startswith("grpo:")]
    assert len(others) <= 4, terminal
    assert "WARNING" not in terminal and "Failed to load" not in terminal, terminal
    assert "learner precision" in terminal and "grpo: 100%" in terminal
    log = (run_dir / "logs" / "run.log").read_text()
    assert "Learner pid=" in log and "RolloutWorker pid=" in log


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
            from rlkd.actors.rollout import RolloutWorker
            from rlkd.types import SamplingSpec
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
