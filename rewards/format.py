"""Format rewards: does the completion lay out its answer the way the prompt asked?

All are pure string checks, linear in the completion length, so hostile input is cheap.
"""

import math
import re

from rewards.arithmetic import equations

_ANSWER_LINE_RE = re.compile(r"####\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", re.ASCII)
_HASHES_NUMBER_RE = re.compile(r"####[ \t]*-?\.?\d", re.ASCII)
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def format_answer_line(completions: list[str], **_) -> list[float]:
    """1.0 if the last non-empty line is exactly `#### <number>`, else 0.0.

    The number may carry a sign, thousands commas and decimals (`#### -1,234.5`) and nothing
    else: no units, `$` or trailing text. Surrounding whitespace on the line is ignored.
    """
    return [float(_last_line_is_answer(c)) for c in completions]


def worked_answer_line(completions: list[str], truncated: list[bool] | None = None, **_) -> list[float]:
    """1.0 if the last line is `#### <number>` and that number is the result of an equation
    the completion wrote before it (`... = N`), else 0.0; a completion cut at the token cap
    scores 0.

    `format_answer_line` pays the same for a bare `#### N` as for a worked answer, and on GSM8K
    the main job learned exactly that (completions 168 -> 24 tokens, correctness flat). Here
    the answer line earns only as the end of written work. Whether the work is right is
    `arithmetic_steps`' and the correctness reward's business, not this one's.
    """
    cut = truncated if truncated is not None else [False] * len(completions)
    return [float(not c and _answer_follows_work(text)) for text, c in zip(completions, cut, strict=True)]


def format_answer_line_partial(completions: list[str], **_) -> list[float]:
    """Partial credit for the `#### <number>` answer line.

    1.0: the last non-empty line is `#### <number>` (as in `format_answer_line`).
    0.5: some `####` is directly followed by a number, but not as that final line.
    0.25: `####` appears, but never followed by a number.
    0.0: no `####` at all.
    """
    return [_answer_line_partial(c) for c in completions]


def format_think(completions: list[str], **_) -> list[float]:
    """1.0 if the completion is `<think>reasoning</think>answer`, else 0.0.

    Exactly: after leading whitespace it starts with `<think>`, holds exactly one `<think>` and
    one `</think>`, and both the reasoning and the answer after `</think>` are non-blank. A chat
    template that puts `<think>` in the prompt needs that tag re-added before scoring.
    """
    return [float(all(_think_parts(c))) for c in completions]


def format_think_partial(completions: list[str], **_) -> list[float]:
    """0.25 for each of the four parts that `format_think` requires:

    the completion starts with a single `<think>`; it holds a single `</think>` after that
    (or anywhere, if `<think>` is missing); the reasoning between the tags is non-blank; the
    answer after the single `</think>` is non-blank. All four give 1.0, same as `format_think`.
    """
    return [0.25 * sum(_think_parts(c)) for c in completions]


def _last_line_is_answer(completion: str) -> bool:
    lines = completion.rstrip().rsplit("\n", 1)
    return _ANSWER_LINE_RE.fullmatch(lines[-1].strip()) is not None


def _answer_follows_work(completion: str) -> bool:
    head, _, last = completion.rstrip().rpartition("\n")
    match = _ANSWER_LINE_RE.fullmatch(last.strip())
    if match is None:
        return False
    answer = float(last.strip()[4:].strip().replace(",", ""))
    return any(math.isclose(claimed, answer, rel_tol=1e-6, abs_tol=1e-9) for _, claimed, _ in equations(head))


def _answer_line_partial(completion: str) -> float:
    if _last_line_is_answer(completion):
        return 1.0
    if _HASHES_NUMBER_RE.search(completion):
        return 0.5
    return 0.25 if "####" in completion else 0.0


def _think_parts(completion: str) -> tuple[bool, bool, bool, bool]:
    text = completion.lstrip()
    opens, closes = text.count(_THINK_OPEN), text.count(_THINK_CLOSE)
    close_at = text.find(_THINK_CLOSE)
    opened = opens == 1 and text.startswith(_THINK_OPEN)
    closed = closes == 1 and (opens == 0 or text.find(_THINK_OPEN) < close_at)
    reasoned = opened and closed and text[len(_THINK_OPEN) : close_at].strip() != ""
    answered = closes == 1 and text[close_at + len(_THINK_CLOSE) :].strip() != ""
    return opened, closed, reasoned, answered
