"""End-to-end: a GRPO run survives its rollout actor's process being SIGKILLed mid-run, and
later its vLLM engine process: Ray restarts the actor, the driver pushes the current weights
to it and retries the step, and the run completes (real CLI, Ray, vLLM, DeepSpeed, CPU)."""

import signal

import psutil
import pytest
from conftest import GSM8K_DIR
from e2e_procs import MECHANICS_ARGS, log_tail, metrics, reap, start_cli, tagged, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 4


def _one(tag, prefix):
    """The tagged process whose title starts with `prefix` (Ray and vLLM set titles)."""
    found = []
    for p in tagged(tag):
        try:
            if " ".join(p.cmdline()).startswith(prefix):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    assert len(found) == 1, [p.cmdline() for p in found]
    return found[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("actor_failure")
    run_dir, log = tmp / "run", tmp / "run.log"
    proc, tag = start_cli([
        "recipe=grpo_gsm8k", f"data.path={GSM8K_DIR}", f"run.dir={run_dir}",
        f"trainer.max_steps={STEPS}", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.save_state=false", "rollout.max_new_tokens=24", "rollout.kv_cache_gb=1",
        "grpo.group_size=4", "grpo.prompts_per_step=2", "learner.lr=2e-5",
        "learner.dtype=float32", "rollout.dtype=float32",  # exact sync check on any CPU
        "rewards.funcs=[tests/data/shaping_rewards.py:concise]", "rewards.weights=[1.0]",
        *MECHANICS_ARGS,
    ], log)
    events = {}
    try:
        # After step 1 the actor is killed; step 2 generates right away, so it dies mid-step.
        wait_for(lambda: len(metrics(run_dir)) >= 1, proc, 1800, log)
        actor = _one(tag, "ray::RolloutWorker")
        engine = actor.children(recursive=True)
        actor.send_signal(signal.SIGKILL)
        events["old_engine_exited"] = psutil.wait_procs(engine, timeout=30)[1] == []
        # After step 3 the restarted actor's vLLM engine dies instead, the actor living on.
        wait_for(lambda: len(metrics(run_dir)) >= 3, proc, 1800, log)
        _one(tag, "VLLM::EngineCore").send_signal(signal.SIGKILL)
        assert proc.wait(timeout=1800) == 0, log_tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
        events["orphans"] = reap(tag)
    return run_dir, log, events


def test_run_completes_after_actor_and_engine_kills(run):
    run_dir, log, _ = run
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1)), log_tail(log)
    assert rows[-1]["rollout/failures"] == 2
    assert (run_dir / f"checkpoint-{STEPS}" / "model.safetensors").is_file()


def test_restarted_actor_samples_from_the_current_weights(run):
    # A restarted engine starts from the initial weights; without the re-sync its sampling
    # logprobs would differ from the learner's by the size of the updates so far.
    for m in metrics(run[0]):
        assert m["train/logp_mismatch"] < 1e-3, (m["step"], m["train/logp_mismatch"])


def test_killed_actor_leaves_no_orphans(run):
    _, _, events = run
    assert events["old_engine_exited"], "the killed actor's vLLM engine outlived it"
    assert events["orphans"] == []


def test_learner_death_stops_cleanly_naming_the_last_checkpoint(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc, tag = start_cli([
        "recipe=grpo_gsm8k", f"data.path={GSM8K_DIR}", f"run.dir={run_dir}",
        "trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=1",
        "rollout.max_new_tokens=16", "rollout.kv_cache_gb=1", "grpo.group_size=4",
        "grpo.prompts_per_step=1", "rewards.funcs=[tests/data/shaping_rewards.py:concise]",
        "rewards.weights=[1.0]", *MECHANICS_ARGS,
    ], log)
    try:
        wait_for(lambda: len(metrics(run_dir)) >= 2, proc, 1800, log)
        _one(tag, "ray::Learner").send_signal(signal.SIGKILL)
        assert proc.wait(timeout=600) == 1, log_tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
        orphans = reap(tag)
    errors = [line for line in log.read_text().splitlines() if line.startswith("rlkd: error:")]
    assert len(errors) == 1, log_tail(log)
    last = errors[0]
    assert last.startswith("rlkd: error: learner actor died during step 3 ("), last
    assert last.endswith(f"the last checkpoint, {run_dir}/checkpoint-2, is intact: continue with "
                         f"trainer.resume=auto run.dir={run_dir}"), last
    assert (run_dir / "checkpoint-2" / "trainer_state.pt").is_file()
    assert orphans == []
