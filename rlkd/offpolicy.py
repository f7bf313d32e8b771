"""Rollouts generated ahead of the learner: `rollout.max_staleness = k` (one-step-off and beyond).

The schedule is fixed, so a run is reproducible and resumes exactly:

    step n:  take step n's rollouts -> start generating step n+k on a background thread (the
             rollout actors still hold weights v(n-1)) -> the learner trains step n meanwhile ->
             wait for that generation -> sync v(n) to the actors

So step m is sampled by weights v(max(m-1-k, 0)) and trained by v(m-1): every sample is exactly
min(k, m-1) versions old, never more. Nothing is dropped or re-queued for its age: a step's
groups are generated whole by one version and trained in order, so a sample's age does not
depend on its length. (Schemes that abort the oldest in-flight requests or keep only what
finished first lose long completions more often than short ones, and bias training toward short,
easy answers.) With several rollout actors a step is sharded over all of them, as in the
synchronous loop. k=0 generates each step inline on the driver's thread: the synchronous loop.

Why k > 1 on this schedule: the k steps already generated are a buffer a slow generation can
draw on; the overlap per step is one generation against one update either way. The off-policy
correction is the learner's existing one (rlkd/losses.py): the PPO ratio is taken against the
learner's own logprobs before the update (the proximal policy) and the truncated importance
weight min(pi_prox / pi_behav, tis_cap) corrects for the rollout engine's stale policy: AReaL's
decoupled PPO objective (Fu et al. 2025) with TIS's cap (Yao et al. 2025).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class RolloutsAhead(Generic[T]):
    """Produces each step's rollouts, up to `k` steps ahead of the step being trained.

    `produce(step)` generates and scores one step (it owns the prompt sampler, whose draws stay
    in step order: one background job at a time, each producing its steps in order). `pending`
    are rollouts a checkpoint saved: generated ahead of its step, not yet trained on.
    """

    def __init__(self, produce: Callable[[int], T], k: int, last_step: int, pending: dict[int, T] | None = None):
        if k < 0:
            raise ValueError(f"rollout.max_staleness={k}: must be >= 0 (0 is the synchronous loop)")
        self._produce, self.k, self.last_step = produce, k, last_step
        self._ready: dict[int, T] = dict(pending or {})
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rlkd-rollouts-ahead") if k else None
        self._job: Future | None = None
        self.ahead_s = 0.0  # the last background job's generation time

    def take(self, step: int) -> T:
        """Step `step`'s rollouts: generated ahead if they were, else now, on this thread."""
        self.settle()
        if step in self._ready:
            return self._ready.pop(step)
        return self._produce(step)

    def start_ahead(self, step: int) -> None:
        """While step `step` trains, generate every step in (step, step + k] not yet generated."""
        if not self.k:
            return
        todo = [m for m in range(step + 1, min(step + self.k, self.last_step) + 1) if m not in self._ready]
        if todo:
            self._job = self._pool.submit(self._produce_all, todo)

    def settle(self) -> None:
        """Wait for the background generation (before a weight sync, an eval or a checkpoint);
        its error, if any, is raised here."""
        if self._job is not None:
            job, self._job = self._job, None
            done, self.ahead_s = job.result()
            self._ready.update(done)

    def pending(self) -> dict[int, T]:
        """Generated, not yet trained on (after `settle`): what a checkpoint must hold."""
        return dict(self._ready)

    def close(self) -> None:
        """Let a background generation end (its actors stopped, it ends with their error)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def idle_metrics(self, m: dict[str, float]) -> dict[str, float]:
        """Each side's idle share of the step, from its timings: the learner waits while the
        driver generates (time/generate: a step not generated ahead) or waits for the background
        generation (time/wait_rollouts); the rollout actors idle when they generate neither."""
        wall = m["time/generate"] + m.get("time/reward", 0.0) + m["time/train"] + m["time/wait_rollouts"] + m["time/sync"]
        busy = m["time/generate"] + self.ahead_s
        self.ahead_s = 0.0
        return {"time/generate_ahead": busy - m["time/generate"],
                "offpolicy/learner_idle_frac": (m["time/generate"] + m["time/wait_rollouts"]) / max(wall, 1e-9),
                "offpolicy/rollout_idle_frac": max(1.0 - busy / max(wall, 1e-9), 0.0)}

    def _produce_all(self, steps: list[int]) -> tuple[dict[int, T], float]:
        start = time.perf_counter()
        return {m: self._produce(m) for m in steps}, time.perf_counter() - start


def staleness_metrics(versions_N: list[int], learner_version: int, k: int, tokens_N: list[int]) -> dict[str, float]:
    """How many versions behind the learner each sample's weights were: the mean, the max, the
    share of samples at each age 0..k and the share of policy tokens sampled off-policy. An age
    over k is a scheduling bug and raises."""
    ages_N = [learner_version - v for v in versions_N]
    if any(a > k or a < 0 for a in ages_N):
        worst = max(ages_N, key=lambda a: abs(a))
        raise RuntimeError(f"a sample is {worst} weight versions behind the learner's v{learner_version}, "
                           f"outside rollout.max_staleness={k}: a weight update was lost or repeated")
    n = max(len(ages_N), 1)
    out = {"offpolicy/staleness_mean": sum(ages_N) / n, "offpolicy/staleness_max": float(max(ages_N, default=0)),
           "offpolicy/token_frac": sum(t for a, t in zip(ages_N, tokens_N, strict=True) if a) / max(sum(tokens_N), 1)}
    out.update({f"offpolicy/age_{a}_frac": sum(x == a for x in ages_N) / n for a in range(k + 1)})
    return out
