"""Reward functions: the built-ins, a loader for user rewards, and the weighted combiner.

A reward is a plain function `fn(completions: list[str], **columns) -> list[float | None]`
(TRL's convention). `columns` holds `prompts`, `answer` (the extracted gold answer),
`question`, `truncated` (the completion was cut at rollout.max_new_tokens) and
`completion_tokens` (its length in tokens); a reward takes what it needs and ignores the rest
via `**_`. None means "not applicable": it counts as 0 in the weighted total and shows up as
NaN in the raw scores.
"""

import logging
import math
import numbers
from collections.abc import Callable

from rewards.arithmetic import arithmetic_steps
from rewards.format import (
    format_answer_line,
    format_answer_line_partial,
    format_think,
    format_think_partial,
    worked_answer_line,
)
from rewards.gsm8k import gsm8k_correct
from rlkd.console import one_line
from rlkd.errors import InputError, RunStopped
from rlkd.plugins import resolve

logger = logging.getLogger(__name__)

REGISTRY: dict[str, Callable] = {
    "gsm8k_correct": gsm8k_correct,
    "arithmetic_steps": arithmetic_steps,
    "format_answer_line": format_answer_line,
    "format_answer_line_partial": format_answer_line_partial,
    "format_think": format_think,
    "format_think_partial": format_think_partial,
    "worked_answer_line": worked_answer_line,
}


class RewardError(RunStopped):
    """A reward function failed or returned something that is not one score per completion."""


def load_reward(spec: str) -> Callable:
    """Resolve `spec` to a reward function: a `REGISTRY` name, `pkg.module:fn` or `file.py:fn`.

    Raises InputError (a ValueError) with a one-line message naming the spec and what is wrong.
    """
    fn = resolve(spec, "reward", REGISTRY)
    if not callable(fn):
        raise InputError(f"reward '{spec}': '{spec.rpartition(':')[2]}' is not callable (got {type(fn).__name__})")
    return fn


def compute_rewards(
    fns: dict[str, Callable],
    weights: dict[str, float],
    completions: list[str],
    on_error: str = "raise",
    **columns,
) -> tuple[list[float], dict[str, list[float]], dict[str, int]]:
    """Score `completions` with every reward in `fns` and combine them by `weights`.

    Returns (weighted total per completion, raw scores per reward with None as NaN, error count
    per reward). A missing weight means 1.0. A reward that raises, returns the wrong number of
    scores, or returns a non-number (bools are fine, NaN/inf are not) raises RewardError, unless
    `on_error="zero"`: then that reward scores 0.0 for the whole batch, and the error is logged
    and counted.
    """
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    unknown = set(weights) - set(fns)
    if unknown:
        raise ValueError(f"weights name rewards that are not in fns: {sorted(unknown)}")
    n = len(completions)
    totals = [0.0] * n
    raw: dict[str, list[float]] = {}
    errors = dict.fromkeys(fns, 0)
    for name, fn in fns.items():
        try:
            scores = _checked_scores(name, fn, completions, columns)
        except RewardError as e:
            if on_error == "raise":
                raise
            logger.warning("%s; scoring it 0 for this batch", e)
            errors[name] += 1
            scores = [0.0] * n
        weight = weights.get(name, 1.0)
        for i, score in enumerate(scores):
            totals[i] += 0.0 if score is None else weight * score
        raw[name] = [math.nan if s is None else s for s in scores]
    return totals, raw, errors


def _checked_scores(name: str, fn: Callable, completions: list[str], columns: dict):
    try:
        scores = fn(completions, **columns)
    except Exception as e:
        raise RewardError(f"reward '{name}' raised {one_line(e)}") from e
    if not isinstance(scores, (list, tuple)):
        raise RewardError(f"reward '{name}' returned a {type(scores).__name__}, not a list")
    if len(scores) != len(completions):
        raise RewardError(
            f"reward '{name}' returned {len(scores)} scores for {len(completions)} completions"
        )
    for i, score in enumerate(scores):
        if score is None:
            continue
        if not _is_finite_number(score):
            raise RewardError(f"reward '{name}' returned {_short_repr(score)} at index {i}")
    return [None if s is None else float(s) for s in scores]


def _is_finite_number(score) -> bool:
    try:  # float() because huge ints overflow in math.isfinite
        return isinstance(score, numbers.Real) and math.isfinite(float(score))
    except OverflowError:
        return False


def _short_repr(value) -> str:
    try:  # repr() refuses ints with more than 4300 digits
        return repr(value)[:60]
    except ValueError:
        return f"a huge {type(value).__name__}"


