"""RolloutGuard on real Ray actors whose processes die: restart, re-sync, retry, and the
one-line error once rollout.max_restarts is spent. The actors stand in for vLLM engines (same
method names), so this runs in seconds; test_e2e_actor_failure.py kills the real ones."""

import os
import re
import subprocess
import sys

import pytest
import ray

from rlkd.actors.recovery import RolloutCallError, RolloutFailedError, RolloutGuard

pytestmark = pytest.mark.e2e  # starts a Ray instance


@ray.remote
class Counter:
    """Counts across restarts of the flaky actors (a restarted actor loses its own state)."""

    def __init__(self):
        self.counts = {}

    def bump(self, key: str) -> int:
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    def steps_done(self) -> int:  # also the (healthy) learner the guard checks on a failure
        return 0


@ray.remote(max_restarts=5)
class Flaky:
    """Its process exits on the first `crashes` generate calls, counted across restarts."""

    def __init__(self, counter, crashes: int):
        self.counter, self.crashes, self.weights = counter, crashes, 0

    def generate(self, prompt: str) -> str:
        if ray.get(self.counter.bump.remote("generate")) <= self.crashes:
            os._exit(1)
        return f"{prompt} with weights {self.weights}"

    def check_engine(self) -> None:
        pass

    def update_weights(self, version: int) -> None:
        self.weights = version


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _guard(crashes, max_restarts):
    counter = Counter.remote()
    actor = Flaky.remote(counter, crashes)
    syncs = []

    def resync():
        syncs.append(1)
        ray.get(actor.update_weights.remote(7))

    return actor, RolloutGuard(counter, [actor], resync, max_restarts), syncs


def test_dead_actor_is_restarted_resynced_and_the_call_retried():
    actor, guard, syncs = _guard(crashes=2, max_restarts=3)
    out = guard("generate", lambda: ray.get(actor.generate.remote("step 5")))
    assert out == "step 5 with weights 7"  # the restarted actor got the current weights
    assert guard.failures == 2 and len(syncs) == 2


def test_failures_beyond_max_restarts_stop_with_one_line():
    actor, guard, _ = _guard(crashes=3, max_restarts=2)
    with pytest.raises(RolloutFailedError) as info:
        guard("generate", lambda: ray.get(actor.generate.remote("step 5")))
    message = str(info.value)
    assert "\n" not in message
    # Ray reports a call on a process that died as ActorDied or ActorUnavailable (connection
    # reset), depending on which it notices first.
    assert re.match(r"rollout failed 3 times, more than rollout.max_restarts=2; last, during "
                    r"generate: Actor(Died|Unavailable)Error: ", message), message


@ray.remote(max_restarts=5)
class Rejecting:
    """Raises on every generate call, as vLLM does for a parameter it rejects; its engine works
    unless `engine_dead`, like an actor alive around a vLLM engine that died."""

    def __init__(self, counter, engine_dead: bool):
        self.counter, self.engine_dead = counter, engine_dead

    def generate(self, prompt: str) -> str:
        ray.get(self.counter.bump.remote("generate"))
        raise ValueError("temperature must be non-negative, got -0.5.\nmore detail")

    def check_engine(self) -> None:
        if self.engine_dead:
            raise RuntimeError("engine dead")


def test_an_error_from_a_healthy_actor_stops_at_once_in_one_line():
    counter = Counter.remote()
    actor = Rejecting.remote(counter, engine_dead=False)
    guard = RolloutGuard(counter, [actor], lambda: None, max_restarts=3)
    with pytest.raises(RolloutCallError) as info:
        guard("generate", lambda: ray.get(actor.generate.remote("q")))
    assert str(info.value) == ("generate failed, not retried (the rollout actors are healthy): "
                               "ValueError: temperature must be non-negative, got -0.5.")
    assert guard.failures == 0 and ray.get(counter.bump.remote("generate")) == 2  # called once


def test_an_error_from_an_actor_with_a_dead_engine_is_a_failure():
    counter = Counter.remote()
    actor = Rejecting.remote(counter, engine_dead=True)
    guard = RolloutGuard(counter, [actor], lambda: None, max_restarts=1)
    with pytest.raises(RolloutFailedError) as info:  # restarted, and the restart checked
        guard("generate", lambda: ray.get(actor.generate.remote("q")))
    assert guard.failures == 1 and "\x1b" not in str(info.value), str(info.value)


# ---------------------------------------------------------------------------- Ctrl-C


def test_a_second_ctrl_c_during_the_save_is_answered_not_obeyed(capsys):
    import os
    import signal

    from rlkd.actors.recovery import save_on_interrupt

    def save():
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again mid-save
        return "checkpoint-3"

    before = signal.getsignal(signal.SIGINT)
    assert save_on_interrupt(save) == "checkpoint-3"
    assert "still saving the checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_during_a_held_step_lets_it_finish_then_stops(capsys):
    import os
    import signal

    from rlkd.actors.recovery import hold_interrupts

    before, done = signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt):
        with hold_interrupts("finishing step 4"):
            os.kill(os.getpid(), signal.SIGINT)  # mid-update
            os.kill(os.getpid(), signal.SIGINT)  # and again, impatiently
            done.append("booked")  # the rest of the step still runs
    err = capsys.readouterr().err
    assert done == ["booked"]
    assert "Ctrl-C: finishing step 4, then stopping" in err and "still finishing step 4" in err
    assert signal.getsignal(signal.SIGINT) is before
    with hold_interrupts("a quiet step"):  # no Ctrl-C: no interrupt afterwards
        pass


def test_a_hold_inside_a_hold_defers_to_the_outer_one():
    import os
    import signal

    from rlkd.actors.recovery import hold_interrupts

    order = []
    with pytest.raises(KeyboardInterrupt):
        with hold_interrupts("finishing step 2"):
            with hold_interrupts("writing checkpoint-2"):
                os.kill(os.getpid(), signal.SIGINT)
            order.append("after the inner hold")  # the inner one must not raise
    assert order == ["after the inner hold"]


def test_a_cut_short_eval_still_logs_its_step(tmp_path):
    from rlkd.actors.recovery import booked_on_interrupt
    from rlkd.tracking import Timer, Tracker, read_metrics

    tracker, timer = Tracker(tmp_path), Timer(3)
    with timer("train"):
        pass
    with pytest.raises(KeyboardInterrupt):
        with booked_on_interrupt(tracker, 3, lambda: {"train/loss": 0.5}, timer):
            raise KeyboardInterrupt
    with pytest.raises(ValueError):  # other failures are not a Ctrl-C: nothing is logged
        with booked_on_interrupt(tracker, 4, lambda: {"train/loss": 0.25}, timer):
            raise ValueError
    tracker.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"], "time/train" in r) for r in rows] == [(3, 0.5, True)]


def test_a_ctrl_c_held_through_an_update_logs_the_step_it_finished(tmp_path):
    """The e2e interrupt test found steps 4, 5 and 7 missing from a resumed run's metrics: a
    Ctrl-C held through the update acted before the step was logged."""
    import signal

    from rlkd.actors.recovery import booked_on_interrupt, hold_interrupts
    from rlkd.tracking import Timer, Tracker, read_metrics

    tracker, timer = Tracker(tmp_path), Timer(5)
    metrics = {}
    with pytest.raises(KeyboardInterrupt):
        with booked_on_interrupt(tracker, 5, lambda: metrics, timer):
            with hold_interrupts("finishing step 5"), timer("train"):
                os.kill(os.getpid(), signal.SIGINT)  # lands mid-update
                metrics = {"train/loss": 0.125}  # the update's result, bound after the Ctrl-C
    tracker.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"], "time/train" in r) for r in rows] == [(5, 0.125, True)]


def test_interrupt_message_names_the_checkpoint_and_the_command(tmp_path):
    from rlkd.actors.recovery import interrupted

    msg = str(interrupted(9, 8, tmp_path, resumable=True))
    assert f"{tmp_path}/checkpoint-8 holds step 8" in msg and "trainer.resume=auto" in msg
    assert "model.name=" in str(interrupted(9, 8, tmp_path, resumable=False))
    assert "before any checkpoint" in str(interrupted(1, 0, tmp_path, resumable=True))


@pytest.mark.parametrize("quiet", ["true", "false"])
def test_interrupted_exit_is_130_and_quiet_with_the_pipe_gone(quiet, tmp_path):
    # `cmd | tee` and Ctrl-C: tee dies with the process group, so stdout and stderr point at a
    # pipe nobody reads (with run.quiet, the terminal copies of them that rlkd keeps do). The
    # exit must still be 130, with no traceback or BrokenPipeError.
    code = ("import sys; from rlkd.errors import Interrupted\n"
            "from rlkd import train\n"
            "def task(cfg, run_dir):\n"
            "    raise Interrupted('interrupted in step 2; checkpoint-2 holds step 2')\n"
            "train.TASKS[train.Task.eval] = task\n"
            "train.main(['recipe=eval_gsm8k', 'run.dir=' + sys.argv[1], 'run.quiet=' + sys.argv[2]])\n")
    r, w = os.pipe()
    os.close(r)  # what a dead tee leaves behind
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), quiet], stdout=w, stderr=w,
                              timeout=120)
    finally:
        os.close(w)
    # A traceback would exit 1, and a failed flush of stdout at shutdown 120.
    assert proc.returncode == 130
