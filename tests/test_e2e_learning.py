"""GRPO teaches: held-out exact-match accuracy on a verifiable task rises, not only the reward.

The task is one-step addition and subtraction word problems (rlkd/datasets/arith, written by its
make.py, in GSM8K's format), rewarded by correctness alone (`gsm8k_correct`), with dynamic
sampling so every step carries signal and overlong filtering. One run evaluates the untrained
policy greedily on the 200 test problems (step 0), trains 16 steps and evaluates again, under the
same settings. When the settings were chosen (bf16 learner and vLLM, AVX-512-bf16 CPU) it went
from 37 to 89 of 200 (60 gained, 8 lost, McNemar p < 1e-10); a CI machine took the first 64 of
them from 14 to 23, which the 64-problem version of this test could not tell from chance. The
real CLI, Ray, vLLM and DeepSpeed run.
"""

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

# slow: its run takes about 10 of make test's 30 minutes on 2 cores; the learning claim it
# guards is re-measured on a published benchmark by recipe=grpo_mawps (README, "Does it teach?").
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 16
N_TEST = 200


def _exact_two_sided(k: int, n: int) -> float:
    """Two-sided exact binomial p-value of k successes in n at 1/2 (McNemar on discordant pairs)."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _correct(eval_dir) -> dict[str, bool]:
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    return {r["id"]: r["correct"] for r in rows}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run: greedy eval of the untrained policy (step 0), 16 GRPO steps, greedy eval again."""
    run_dir = tmp_path_factory.mktemp("learning")
    args = ["data.name=arith", "recipe=grpo_gsm8k", "data.held_out=0", "data.eval_split=test",
            f"run.dir={run_dir}",
            f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}", f"trainer.eval_samples={N_TEST}",
            "eval.max_new_tokens=128", "trainer.save_every=0", "trainer.save_state=false",
            "rollout.max_new_tokens=128", "rollout.temperature=0.7", "rollout.kv_cache_gb=1",
            "grpo.prompts_per_step=4", "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=4",
            "grpo.overlong=mask", "grpo.beta=0",  # as measured: no KL anchor
            "rewards.funcs=[gsm8k_correct]", "rewards.weights=[1.0]", "learner.lr=1e-5"]
    proc = subprocess.run([sys.executable, "-m", "rlkd.train", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_held_out_accuracy_rises_significantly(run):
    before, after = _correct(run / "eval" / "step-0"), _correct(run / "eval" / f"step-{STEPS}")
    assert before.keys() == after.keys() and len(before) == N_TEST
    gained = sum(after[k] and not before[k] for k in before)
    lost = sum(before[k] and not after[k] for k in before)
    p = _exact_two_sided(gained, gained + lost) if gained + lost else 1.0
    acc = (sum(before.values()) / N_TEST, sum(after.values()) / N_TEST)
    # With margin: at least 16 more questions right (8 points) and a paired exact test at 1%.
    assert gained - lost >= 16 and p < 0.01, (acc, gained, lost, p)


def test_every_trained_step_carried_signal(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(STEPS + 1)) and "eval/accuracy" in rows[0]
    for m in rows[1:]:
        assert m["adv/frac_zero_std_groups"] == 0.0 or m["sampling/groups_short"] > 0, m["step"]
        assert m["sampling/prompts_drawn"] >= 4 and m["train/logp_mismatch"] < 0.5
    assert sum(m["sampling/groups_short"] for m in rows[1:]) <= STEPS  # rarely short of signal
