"""The reward-hacking check against a plain-Python reference over whole metric histories."""

import random

from rlkd.collapse import REWARD_RISE, CollapseWatch

NAMES = ["gsm8k_correct", "format_answer_line"]


def rows(lengths, correct, fmt=None):
    fmt = fmt or [0.5] * len(lengths)
    return [{"step": i + 1, "completion/mean_tokens": n, "reward/gsm8k_correct": c, "reward/format_answer_line": f}
            for i, (n, c, f) in enumerate(zip(lengths, correct, fmt, strict=True))]


def reference_trips(history, window, ratio):
    """Steps at which a collapse starts, recomputed from slices of the whole history each step."""
    trips, was = [], False
    for i in range(len(history)):
        step = history[i]["step"]
        if step <= window or i + 1 < window:
            continue
        mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
        base, recent = history[:window], history[i + 1 - window:i + 1]
        now = (mean("completion/mean_tokens", recent) < ratio * mean("completion/mean_tokens", base)
               and mean("reward/gsm8k_correct", recent) < mean("reward/gsm8k_correct", base) + REWARD_RISE)
        if now and not was:
            trips.append(step)
        was = now
    return trips


def watch_trips(history, window=10, ratio=0.5):
    w = CollapseWatch(window, ratio, NAMES)
    return [r["step"] for r in history if w.observe(r["step"], r)]


def test_the_measured_gsm8k_collapse_trips_once_with_its_figures():
    # The main job's collapse (issue 30): 168 tokens falling to ~24, correctness flat near 0.02.
    lengths = [168 - 9 * i for i in range(16)] + [24] * 24
    history = rows(lengths, [0.02] * 40, fmt=[0.3] * 10 + [0.98] * 30)
    w = CollapseWatch(10, 0.5, NAMES)
    lines = [(r["step"], w.observe(r["step"], r)) for r in history]
    fired = [(s, line) for s, line in lines if line]
    assert [s for s, _ in fired] == reference_trips(history, 10, 0.5) and len(fired) == 1
    step, line = fired[0]
    assert "reward hacking?" in line and "gsm8k_correct 0.02 -> 0.02" in line
    assert "format_answer_line 0.3 -> 0.844" in line and "stop_on_collapse" in line and f"at step {step}" in line


def test_shorter_and_better_is_learning_not_hacking():
    # MAWPS-like: completions halve while correctness climbs from 0.07 to 0.5.
    history = rows([22 - 0.4 * i for i in range(40)], [0.07 + 0.011 * i for i in range(40)])
    assert watch_trips(history) == [] == reference_trips(history, 10, 0.5)


def test_matches_the_reference_on_random_histories_including_recovery():
    rng = random.Random(0)
    for _ in range(200):
        n, window, ratio = rng.randint(1, 60), rng.randint(1, 12), rng.choice([0.3, 0.5, 0.8])
        level, lengths = 100.0, []
        for _ in range(n):  # a random walk that can shrink, recover and shrink again
            level = max(1.0, level * rng.choice([0.7, 0.9, 1.0, 1.2, 1.5]))
            lengths.append(level)
        correct = [rng.choice([0.0, 0.02, 0.1, 0.3]) for _ in range(n)]
        history = rows(lengths, correct)
        assert watch_trips(history, window, ratio) == reference_trips(history, window, ratio)


def test_a_resumed_run_rebuilds_its_history():
    lengths = [168 - 9 * i for i in range(16)] + [24] * 24
    history = rows(lengths, [0.02] * 40)
    straight = watch_trips(history)
    for cut in (5, 12, 20):  # before, inside and after the trip
        w = CollapseWatch(10, 0.5, NAMES)
        w.replay(history[:cut])
        resumed = [r["step"] for r in history[cut:] if w.observe(r["step"], r)]
        assert resumed == [s for s in straight if s > cut]


def test_window_zero_or_no_rewards_never_trips():
    history = rows([100] * 10 + [5] * 30, [0.0] * 40)
    assert watch_trips(history, window=0) == []
    w = CollapseWatch(10, 0.5, [])
    assert not any(w.observe(r["step"], r) for r in history)
