"""A reward for benchmarks that gives every GRPO group reward variance.

`bench_grpo_step.py --workloads signal` trains with it on both sides, so that no step can be
cheap because its groups carry no signal: the share of digits among a completion's characters
is a continuous score, and two different completions of one prompt almost never tie.
"""


def digit_share(completions: list[str], **_) -> list[float]:
    """Digits / characters of each completion (0.0 for an empty one)."""
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]
