"""Reward-hacking guardrail: completions that shrink sharply while the task reward does not rise.

The collapse GRPO falls into on a small model (measured on the GSM8K main job: mean completion
length 168 -> 24 tokens in 25 steps, held-out answers a bare `#### N`, correctness flat at
0-4%) is the policy learning the cheap rewards (an answer line) and dropping the reasoning that
the task reward needs. A shorter answer is not bad by itself: a policy that gets better *and*
shorter is learning. So the check needs both signs at once:

    baseline = means over steps 1..W (W = trainer.collapse_window)
    current  = means over the latest W steps
    collapse = current_length < collapse_length_ratio * baseline_length
               and current_task_reward < baseline_task_reward + REWARD_RISE

where the task reward is the first of `rewards.funcs` (the recipe's correctness reward). It
reports once when a run enters that state (again only after it has left it), in one line with
every reward's baseline and current mean; `trainer.stop_on_collapse` turns the line into a stop.
Pure Python over logged metrics, so a resumed run rebuilds its history from metrics.jsonl.
"""

from __future__ import annotations

from collections import deque

LENGTH_KEY = "completion/mean_tokens"
REWARD_RISE = 0.05
"""How much the task reward's mean must have risen above its baseline for a shrinking
completion length to count as learning, not hacking (an absolute reward, 0..1 for correctness)."""


class CollapseWatch:
    """Feed it each step's metrics; it answers the one-line warning on the step a collapse starts."""

    def __init__(self, window: int, length_ratio: float, reward_names: list[str]):
        self.window, self.ratio = window, length_ratio
        self.keys = [LENGTH_KEY, *(f"reward/{n}" for n in reward_names)]
        self.task_key = self.keys[1] if len(self.keys) > 1 else None
        self.baseline: list[list[float]] = [[] for _ in self.keys]
        self.recent: list[deque[float]] = [deque(maxlen=max(window, 1)) for _ in self.keys]
        self.collapsed = False

    def replay(self, rows: list[dict]) -> None:
        """Rebuild the history of a resumed run from its logged steps (warnings already printed)."""
        for row in rows:
            if row.get("step", 0) >= 1:
                self.observe(row["step"], row)

    def observe(self, step: int, metrics: dict[str, float]) -> str | None:
        if not self.window or self.task_key is None or LENGTH_KEY not in metrics:
            return None
        for key, base, recent in zip(self.keys, self.baseline, self.recent, strict=True):
            if key in metrics:
                recent.append(metrics[key])
                if len(base) < self.window:
                    base.append(metrics[key])
        length_base, length_now = self._means(LENGTH_KEY)
        if length_base is None or len(self.recent[0]) < self.window or step <= self.window:
            return None  # the baseline is still forming, or the window still overlaps it
        task_base, task_now = self._means(self.task_key)
        now = (task_base is not None and length_now < self.ratio * length_base
               and task_now < task_base + REWARD_RISE)
        entered, self.collapsed = now and not self.collapsed, now
        if not entered:
            return None
        rewards = ", ".join(f"{k.removeprefix('reward/')} {b:.3g} -> {c:.3g}"
                            for k in self.keys[1:] for b, c in [self._means(k)] if b is not None)
        return (f"reward hacking? at step {step} completions average {length_now:.1f} tokens "
                f"(steps {step - self.window + 1}-{step}) against {length_base:.1f} in steps "
                f"1-{self.window}, under trainer.collapse_length_ratio={self.ratio}, while the task "
                f"reward did not rise (means, steps 1-{self.window} -> latest {self.window}: {rewards}); "
                "trainer.stop_on_collapse=true stops such a run")

    def _means(self, key: str) -> tuple[float | None, float | None]:
        i = self.keys.index(key)
        base, recent = self.baseline[i], self.recent[i]
        if len(base) < self.window or not recent:
            return None, None
        return sum(base) / len(base), sum(recent) / len(recent)
