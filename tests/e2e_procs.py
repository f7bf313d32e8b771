"""Helpers for end-to-end tests that kill or interrupt a training run: start the CLI in its own
session with a tag in its environment, find (and reap) every process that inherited the tag, and
compare a resumed run with an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import torch
from conftest import GSM8K_DIR, REPO_ROOT
from safetensors.torch import load_file

# A small GRPO run that checkpoints every step. vLLM's CPU sampling logprobs differ between two
# fresh processes by ~1e-9 to 1e-6 (same weights, seeds and tokens); the update sees them only
# through the truncated importance weight, so `grpo.tis_cap=0` makes resumed runs bit-identical.
# grpo_gsm8k is the main job; runs that test mechanics on it turn off its KL anchor (a reference
# model to load) and its overlong mask (their 16-48-token rollouts would all be cut and masked).
MECHANICS_ARGS = ["grpo.beta=0", "grpo.overlong=none"]
# The run mechanics every resume test pins, whatever it trains on.
RESUME_PINS = [
    "trainer.eval_every=0", "trainer.save_every=1", "trainer.keep_checkpoints=2", "rollout.kv_cache_gb=1",
    "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.tis_cap=0", "learner.lr=2e-5", "learner.warmup_steps=2",
    # fp32 rollouts on every CPU: in bf16 (auto on AVX-512-bf16) a resumed engine's logprobs
    # differed from the straight run's by up to 1e-3 (2026-12-07), over VLLM_NOISE_KEYS' 1e-5.
    "rollout.dtype=float32",
    "rewards.funcs=[tests/data/shaping_rewards.py:concise,gsm8k_correct]", "rewards.weights=[1.0,0.5]",
]
RESUME_ARGS = ["recipe=grpo_gsm8k", f"data.path={GSM8K_DIR}", "rollout.max_new_tokens=24",
               *MECHANICS_ARGS, *RESUME_PINS]
# Multi-turn episodes with the calculator: 96 tokens leave room for a call, its result and the
# answer, so a resumed run must re-create every tool turn, not only the sampled text.
TOOL_RESUME_ARGS = ["recipe=grpo_calculator", "rollout.max_new_tokens=96", *RESUME_PINS]
# Logged per step and fully determined by the weights, the prompts and the sampling seed.
EXACT_KEYS = ["train/loss", "train/grad_norm", "train/lr", "train/entropy_proxy",
              "train/clip_frac", "reward/total_mean", "completion/mean_tokens"]
VLLM_NOISE_KEYS = ["train/logp_mismatch"]


def assert_same_run(straight, resumed, steps: int) -> None:
    """Every step logged once, with the same per-step figures, and the same final weights."""
    a = [m for m in metrics(straight) if m["step"] > 0]  # step 0: the untrained policy's eval
    b = [m for m in metrics(resumed) if m["step"] > 0]
    assert [m["step"] for m in a] == list(range(1, steps + 1))
    assert [m["step"] for m in b] == list(range(1, steps + 1)), "each step logged exactly once"
    for row_a, row_b in zip(a, b, strict=True):
        for key in EXACT_KEYS:
            assert row_a[key] == row_b[key], (row_a["step"], key, row_a[key], row_b[key])
        for key in VLLM_NOISE_KEYS:
            assert abs(row_a[key] - row_b[key]) < 1e-5, (row_a["step"], key, row_a[key], row_b[key])
    w_a = load_file(straight / f"checkpoint-{steps}" / "model.safetensors")
    w_b = load_file(resumed / f"checkpoint-{steps}" / "model.safetensors")
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k


def start_cli(args: list[str], log_path, **env_extra: str) -> tuple[subprocess.Popen, str]:
    tag = uuid.uuid4().hex
    env = dict(os.environ, RLKD_TEST_TAG=tag, PYTHONPATH=str(REPO_ROOT), **env_extra)
    log = open(log_path, "w")  # noqa: SIM115  (closed with the process by the caller's wait)
    proc = subprocess.Popen([sys.executable, "-m", "rlkd.train", *args], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, tag


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries `tag` (Ray workers and vLLM engines included)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RLKD_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def reap(tag: str, grace_s: float = 30.0) -> list[str]:
    """Wait up to `grace_s` for tagged processes to exit by themselves, then SIGKILL the rest;
    returns the names of those that had to be killed (orphans)."""
    deadline = time.monotonic() + grace_s
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(1.0)
    orphans = []
    for p in tagged(tag):
        try:
            orphans.append(p.name())
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return orphans


def metrics(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # being written
    return rows


def wait_for(predicate, proc: subprocess.Popen, timeout_s: float, log_path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) early:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s:\n{log_tail(log_path)}")
        time.sleep(0.5)


def kill_session(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def log_tail(log_path, chars: int = 4000) -> str:
    return open(log_path, errors="replace").read()[-chars:]
