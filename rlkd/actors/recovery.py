"""Surviving actor failures, and stopping runs that can no longer learn.

A rollout actor that dies mid-step (its process killed, OOM, its vLLM engine dead) is restarted
by Ray (`max_restarts`), brought back to the learner's current weights, and the step's
generation or weight sync is retried; after `rollout.max_restarts` failures the run stops with
a one-line error. The learner holds the only copy of the optimizer state, so its death stops
the run, pointing at the last checkpoint to resume from.

`SignalGuard` stops a run that trains on nothing (every group at equal reward for many steps:
silent all-zero rewards are the commonest RL failure) or on the wrong policy (the sampler's
logprobs drifting from the learner's: weights that did not arrive), in one line.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    OutOfMemoryError,
    RayActorError,
    RayError,
    RayTaskError,
)

from rlkd.config import TrainerConfig
from rlkd.console import one_line, say
from rlkd.errors import Interrupted, RunStopped
from rlkd.resume import checkpoint_step, complete_checkpoints
from rlkd.tracking import Timer, Tracker

logger = logging.getLogger("rlkd.recovery")
T = TypeVar("T")
RESTART_TIMEOUT_S = 900.0  # a vLLM engine starts in ~35 s on an idle CPU; minutes when busy
# What a call on an actor raises when its process dies: killed, crashed, or killed by Ray's
# memory monitor (which reports OutOfMemoryError instead of the actor's death).
ACTOR_FAILURES = (RayActorError, RayTaskError, OutOfMemoryError)
HEALTH_TIMEOUT_S = 120.0  # a one-token generate on every engine, after a call raised
DIED_RETRIES = 30  # seconds of "actor died" answers tolerated while Ray notices and restarts it
_HOLDING: list[str] = []  # the hold_interrupts block in force, if any: inner ones defer to it


class RolloutFailedError(RunStopped):
    """Rollout actors failed more often than rollout.max_restarts allows."""


class LearnerDiedError(RunStopped):
    """The learner actor died; the run stops and can be resumed from its last checkpoint."""


class RolloutCallError(RunStopped):
    """A call raised inside rollout actors that still work: retrying it would fail the same way."""


class RolloutGuard:
    """Runs a call on the rollout actors, restoring them and retrying when one fails. An error
    raised by an actor whose engine still answers (vLLM rejecting a parameter, say) is the
    call's own, not a failure: it stops the run at once, in one line."""

    def __init__(self, learner, rollouts: list, resync: Callable[[], None], max_restarts: int):
        self.learner, self.rollouts, self.resync = learner, rollouts, resync
        self.max_restarts = max_restarts
        self.failures = 0

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        while True:
            try:
                return fn()
            except ACTOR_FAILURES as e:
                if isinstance(e, RayTaskError) and self._all_healthy():
                    raise RolloutCallError(f"{what} failed, not retried (the rollout actors are "
                                           f"healthy): {one_line(e)}") from None
                # A weight sync also fails when the learner died: that is not ours to restart.
                ray.get(self.learner.steps_done.remote(), timeout=RESTART_TIMEOUT_S)
                self.failures += 1
                if self.failures > self.max_restarts:
                    raise RolloutFailedError(
                        f"rollout failed {self.failures} times, more than "
                        f"rollout.max_restarts={self.max_restarts}; last, during {what}: "
                        f"{one_line(e)}"
                    ) from e
                logger.warning("rollout failure %d/%d during %s (%s); restarting and retrying",
                               self.failures, self.max_restarts, what, one_line(e))
                try:
                    for actor in self.rollouts:
                        restore(actor)
                    # A restarted engine holds the initial weights: push the current ones to all.
                    self.resync()
                except (RayError, TimeoutError) as restart_error:
                    raise RolloutFailedError(
                        f"rollout actor could not be restarted after a failure during {what} "
                        f"({one_line(e)}): {one_line(restart_error)}"
                    ) from restart_error

    def _all_healthy(self) -> bool:
        try:
            ray.get([a.check_engine.remote() for a in self.rollouts], timeout=HEALTH_TIMEOUT_S)
            return True
        except (RayError, TimeoutError):
            return False


def restore(actor) -> None:
    """Wait until `actor` answers with a working engine; an actor alive around a dead engine is
    killed so that Ray restarts it."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    died = 0
    while True:
        try:
            ray.get(actor.check_engine.remote(), timeout=RESTART_TIMEOUT_S)
            return
        except ActorUnavailableError:  # restarting: refused until it is up again
            if time.monotonic() > deadline:
                raise
        except ActorDiedError:
            # Calls that reached the old process before it died fail like this too; an actor
            # out of restarts fails every call.
            died += 1
            if died > DIED_RETRIES:
                raise
        except RayTaskError:
            ray.kill(actor, no_restart=False)
        time.sleep(1.0)


class BadStepsError(RunStopped):
    """Too many consecutive updates skipped for a NaN/inf loss or gradient."""


def count_bad_steps(bad_steps: int, skipped: float, step: int, max_bad_steps: int) -> int:
    """Consecutive steps with a skipped update, this one included; raises BadStepsError when
    they reach `max_bad_steps` (0: never)."""
    bad_steps = bad_steps + 1 if skipped else 0
    if max_bad_steps and bad_steps >= max_bad_steps:
        raise BadStepsError(
            f"{bad_steps} consecutive steps (up to step {step}) skipped for a NaN/inf loss or "
            f"gradient (trainer.max_bad_steps={max_bad_steps}); checkpoints are left as they were")
    return bad_steps


@contextmanager
def hold_interrupts(what: str, *, then_stop: bool = True) -> Iterator[None]:
    """Ctrl-C inside the block is answered ("rlkd: Ctrl-C: <what>, then stopping"), not obeyed;
    at the block's end it acts (`then_stop`), as a KeyboardInterrupt.

    Drivers hold a step's update and its bookkeeping this way: an update already sent to the
    learner finishes there whatever the driver does, so the driver waits for it (seconds) and
    books the step, and the checkpoint written on the way out holds it. Checkpoint writes are
    held too; every further Ctrl-C gets one line and changes nothing. Inside another hold, or
    off the main thread (where Python delivers no signal), the block runs as it is.
    """
    if _HOLDING or threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []

    def answer(*_):
        pressed.append(1)
        say(f"rlkd: Ctrl-C: {what}, then stopping" if len(pressed) == 1 and then_stop
            else f"rlkd: still {what}, one moment")

    previous = signal.signal(signal.SIGINT, answer)
    _HOLDING.append(what)
    try:
        yield
    finally:
        _HOLDING.pop()
        signal.signal(signal.SIGINT, previous)
    if pressed and then_stop:
        raise KeyboardInterrupt


def save_on_interrupt(save: Callable[[], T]) -> T:
    """Run `save` with further Ctrl-Cs answered, not obeyed: the checkpoint is written whole."""
    with hold_interrupts("saving the checkpoint", then_stop=False):
        return save()


@contextmanager
def booked_on_interrupt(tracker: Tracker, step: int, metrics: Callable[[], dict[str, float]],
                        timer: Timer) -> Iterator[None]:
    """Around everything a step does after its update is held: a Ctrl-C in the update or the
    sync (acting when the hold ends), in the evaluation (the one long phase not held) or in a
    checkpoint write still logs the step's metrics, without a cut-short eval, before the
    interrupt acts. `metrics` is read then, since the step fills it as it goes."""
    try:
        yield
    except KeyboardInterrupt:
        tracker.log(step, {**metrics(), **timer.metrics()})
        raise


@dataclass
class Progress:
    """Where a training loop stands: the step in flight, the last one finished, the last saved."""

    step: int = 0
    done: int = 0
    saved: int = 0


@contextmanager
def training_tail(progress: Progress, run_dir: Path, save: Callable[[], object], *, resumable: bool,
                  cleanup: Callable[[], None], died: Callable[..., RunStopped] | None = None,
                  can_save: Callable[[], bool] = lambda: True) -> Iterator[Progress]:
    """The one except/interrupt/finally tail of every training loop (grpo, sft, distill).

    A dead actor ends the run with `died`'s one line (default `actor_died`). Ctrl-C saves the
    last finished step when it is not saved yet and `can_save()` (GRPO: the learner holds exactly
    that step's weights), with further Ctrl-Cs answered, then ends with `interrupted`'s one line.
    Loops hold each step's update and bookkeeping (`hold_interrupts`), so a Ctrl-C lands either
    before an update is sent (the previous step is saved) or after its step is booked (that
    step is saved). `save` must set `progress.saved`. `cleanup` runs whatever happened.
    """
    try:
        yield progress
    except (RayActorError, OutOfMemoryError) as e:
        raise (died or actor_died)(e, progress.step, run_dir) from e
    except KeyboardInterrupt:
        if progress.saved < progress.done and can_save():
            say(f"rlkd: interrupted after step {progress.done}: saving a checkpoint before exiting")
            save_on_interrupt(save)
        raise interrupted(progress.step, progress.saved, run_dir, resumable=resumable) from None
    finally:
        cleanup()


def interrupted(step: int, saved: int, run_dir: Path, resumable: bool) -> Interrupted:
    """The one line a Ctrl-C ends with: which checkpoint holds the run and what continues it."""
    if not saved:
        return Interrupted(f"interrupted in step {step}, before any checkpoint was saved")
    where = f"interrupted in step {step}; {run_dir}/checkpoint-{saved} holds step {saved}"
    if resumable:
        return Interrupted(f"{where}; continue with the same command plus run.dir={run_dir} "
                           "trainer.resume=auto")
    return Interrupted(f"{where}; start from it with model.name={run_dir}/checkpoint-{saved}")


class SignalLostError(RunStopped):
    """Training stopped carrying signal (no reward variance) or left the sampler's policy."""


class SignalGuard:
    """Consecutive-step counters behind trainer.max_zero_signal_steps and max_logp_mismatch."""

    def __init__(self, t: TrainerConfig, reward_fns: dict):
        self.t, self.names = t, list(reward_fns)
        self.zero_signal = self.mismatched = 0

    def check(self, step: int, metrics: dict[str, float]) -> str | None:
        """Why the run must stop after this step's metrics, or None."""
        t = self.t
        self.zero_signal = self.zero_signal + 1 if metrics.get("adv/frac_zero_std_groups") == 1.0 else 0
        mismatch = metrics.get("train/logp_mismatch", 0.0)
        self.mismatched = self.mismatched + 1 if t.max_logp_mismatch and mismatch > t.max_logp_mismatch else 0
        if t.max_zero_signal_steps and self.zero_signal >= t.max_zero_signal_steps:
            scores = ", ".join(
                f"{n} mean {metrics.get(f'reward/{n}', float('nan')):.3f}"
                + (f" (no answer parsed in {metrics[f'reward/{n}_unparsed']:.0%})"
                   if f"reward/{n}_unparsed" in metrics else "")
                for n in self.names)
            return (f"{self.zero_signal} consecutive steps (up to step {step}) had every group at equal "
                    f"reward, so no gradient (trainer.max_zero_signal_steps={t.max_zero_signal_steps}); "
                    f"rewards: {scores}. Check the rewards and the prompt format, or use "
                    "grpo.dynamic_sampling=true")
        if self.mismatched >= t.logp_mismatch_steps:
            return (f"train/logp_mismatch={mismatch:.3g} above trainer.max_logp_mismatch={t.max_logp_mismatch} "
                    f"for {self.mismatched} consecutive steps (up to step {step}): the rollout engine no "
                    "longer samples the learner's policy (weights that did not arrive, or an engine that "
                    "diverged)")
        return None


def learner_died(error: RayError, step: int, run_dir: Path) -> LearnerDiedError:
    found = complete_checkpoints(run_dir)
    last = (f"the last checkpoint, {found[-1]}, is intact: continue with trainer.resume=auto "
            f"run.dir={run_dir}") if found else "no checkpoint was saved yet"
    return LearnerDiedError(f"learner actor died during step {step} ({one_line(error)}); {last}")


def actor_died(error: RayError, step: int, run_dir: Path) -> LearnerDiedError:
    """For the SFT and distillation loops, which save weights but do not resume: the one line
    names the last weights a new run can start from (model.name), not a resume."""
    # Written as checkpoint-N.tmp and renamed: a digits-only name is a complete checkpoint.
    found = sorted((p for p in run_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()),
                   key=checkpoint_step)
    last = (f"the weights of step {checkpoint_step(found[-1])} are intact: start a new run from them with "
            f"model.name={found[-1]}") if found else "no checkpoint was saved yet (trainer.save_every)"
    return LearnerDiedError(f"an actor died during step {step} ({one_line(error)}); {last}")


def shutdown(learners: list, rollouts: list) -> None:
    """Close every actor that still answers; a dead one must not hide the error that killed it."""
    for ref in [*(lr.close.remote() for lr in learners), *(r.shutdown.remote() for r in rollouts)]:
        try:
            ray.get(ref, timeout=120)
        except (RayError, TimeoutError) as e:
            logger.warning("actor shutdown failed: %s", one_line(e))
