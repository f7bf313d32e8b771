"""End-to-end Ctrl-C: one GRPO run interrupted once in each phase of a step (generate, reward,
update, weight sync, eval, checkpoint), resumed with `trainer.resume=auto` after each, ends equal
to an uninterrupted run: same per-step losses, each step logged once, same final weights.

The interrupt is a real SIGINT to the run's process group, as a terminal sends on Ctrl-C
(`RLKD_INTERRUPT_AT=phase:step` fires it as that timed phase of that step begins). An update
already sent must finish and be saved: a Ctrl-C in `train` or `sync` of step n leaves
checkpoint-n, one in `generate` or `reward` leaves checkpoint-(n-1). Real CLI, Ray, vLLM and
DeepSpeed on the embedded model; exactness as in test_e2e_resume.py (`grpo.tis_cap=0`).
"""

import re

import pytest
from e2e_procs import RESUME_ARGS, assert_same_run, metrics, reap, start_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 8
# (phase, step it lands in, the step the checkpoint it leaves holds), in the order they happen.
INTERRUPTS = [("generate", 2, 1), ("reward", 3, 2), ("train", 4, 4), ("sync", 5, 5),
              ("eval", 6, 6), ("checkpoint", 7, 7)]
ARGS = [*RESUME_ARGS, f"trainer.max_steps={STEPS}", "trainer.eval_every=6", "trainer.eval_samples=2"]


def _run(run_dir, tmp_path, name, extra=(), **env):
    log = tmp_path / f"{name}.log"
    proc, tag = start_cli([*ARGS, f"run.dir={run_dir}", *extra], log, **env)
    try:
        code = proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
        orphans = reap(tag)
    return code, log.read_text(), orphans


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupt")
    straight, stopped = tmp / "straight", tmp / "stopped"
    code, text, _ = _run(straight, tmp, "straight")
    assert code == 0, text[-3000:]
    segments = []
    for i, (phase, step, _) in enumerate(INTERRUPTS):
        extra = ["trainer.resume=auto"] if i else []
        segments.append(_run(stopped, tmp, f"{phase}", extra, RLKD_INTERRUPT_AT=f"{phase}:{step}"))
    code, text, _ = _run(stopped, tmp, "last", ["trainer.resume=auto"])
    assert code == 0, text[-3000:]
    return straight, stopped, segments


def test_each_interrupt_exits_130_naming_the_checkpoint_that_holds_its_step(runs):
    _, stopped, segments = runs
    for (phase, step, saved), (code, text, orphans) in zip(INTERRUPTS, segments, strict=True):
        assert code == 130, (phase, text[-3000:])
        last = [line for line in text.splitlines() if line.startswith("rlkd: interrupted")]
        assert last, (phase, text[-3000:])
        assert f"interrupted in step {step}; {stopped}/checkpoint-{saved} holds step {saved}" in last[-1], \
            (phase, last[-1])
        assert "trainer.resume=auto" in last[-1]
        assert "Traceback" not in text and "BrokenPipeError" not in text, (phase, text[-3000:])
        assert orphans == [], (phase, orphans)
        if phase in ("train", "sync"):  # the update in flight was waited for, and said so
            assert re.search(rf"Ctrl-C: finishing step {step} \(its update is on the learner\)", text), phase


def test_the_resumed_run_equals_an_uninterrupted_one(runs):
    straight, stopped, _ = runs
    assert_same_run(straight, stopped, STEPS)
    evals = [m["step"] for m in metrics(stopped) if "eval/accuracy" in m]
    assert 6 not in evals, "the eval cut short at step 6 is not logged as if it ran"
