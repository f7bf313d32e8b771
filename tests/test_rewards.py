"""Tests for the rewards package: built-ins, hostile input, the loader and compute_rewards."""

import math
import threading
import time
from pathlib import Path

import pytest

import rlkd.answer
from rewards import REGISTRY, RewardError, compute_rewards, load_reward
from rewards.arithmetic import arithmetic_steps
from rewards.format import (
    format_answer_line,
    format_answer_line_partial,
    format_think,
    format_think_partial,
    worked_answer_line,
)
from rewards.gsm8k import gsm8k_correct
from rlkd.answer import answers_match, extract_answer, is_correct

MY_REWARD = Path(__file__).parent / "data" / "my_reward.py"
HOSTILE_LIMIT_S = 1.5

HOSTILE = {
    "1 MB of text": "She makes 9 * 2 = 18 dollars. " * 35_000,
    "1 MB of digits": "1" * 1_000_000,
    "1 MB in a box": "\\boxed{" + "x" * 1_000_000 + "}",
    "power tower": "9**9**9**9",
    "boxed power tower": r"The answer is \boxed{9^{9^{9^{9}}}}",
    "tagged power tower": "<answer>9**9**9**9</answer>",
    "10k nested brackets": "(" * 10_000 + "18" + ")" * 10_000,
    "10k nested braces in a box": "\\boxed{" + "{" * 10_000 + "18" + "}" * 10_001,
    "frac nested 5k deep": "\\frac{" * 5_000 + "1" + "}{2}" * 5_000,
    "boxed frac nested 40 deep": "\\boxed{" + "\\frac{" * 40 + "1" + "}{2}" * 40 + "}",
    "unclosed boxes": "\\boxed{" * 100_000,
    "unclosed answer tags": "<answer>" * 100_000,
    "many hashes": "####" * 250_000,
    "many phrases": "the answer is " * 70_000,
    "many think tags": "<think>" * 100_000 + "</think>" * 100_000,
    "huge number": "#### " + "9" * 100_000,
    "huge exponent": "#### 1e999999999",
    "huge fraction": "\\boxed{\\frac{" + "9" * 5_000 + "}{" + "7" * 5_000 + "}}",
    "unicode junk": "\u202e\u0000\ud800\U0001f600\u0663\u0661\u0668 \u00bd \ufffd" * 1_000,
    "unicode digits": "#### \u0661\u0668",
    "empty": "",
}


def _all_scorers():
    """Every built-in reward and every rlkd.answer entry point, as `fn(text) -> float`."""
    scorers = {
        name: (lambda text, fn=fn: fn([text], answer=["18"])[0]) for name, fn in REGISTRY.items()
    }
    scorers["answers_match"] = lambda text: float(answers_match(text, "18"))
    scorers["answers_match_gold"] = lambda text: float(answers_match("18", text[:600]))
    scorers["is_correct"] = lambda text: float(is_correct(text, "18"))
    return scorers


@pytest.fixture(scope="module", autouse=True)
def warm_verifier():
    # The first math-verify fallback starts the helper process (~1 s); don't time that.
    assert answers_match(r"3 \times 6", "18")


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("scorer", _all_scorers())
def test_hostile_input_is_fast_and_scored(scorer, case):
    start = time.monotonic()
    score = _all_scorers()[scorer](HOSTILE[case])
    elapsed = time.monotonic() - start
    assert elapsed < HOSTILE_LIMIT_S, f"{scorer} took {elapsed:.2f}s on {case}"
    assert isinstance(score, float) and 0.0 <= score <= 1.0


def test_hostile_input_off_the_main_thread():
    results = {}

    def score_all():
        for case in ("boxed power tower", "frac nested 5k deep", "1 MB of text"):
            start = time.monotonic()
            results[case] = (
                gsm8k_correct([HOSTILE[case]], answer=["18"])[0],
                time.monotonic() - start,
            )

    thread = threading.Thread(target=score_all)
    thread.start()
    thread.join()
    assert results["boxed power tower"][0] == 0.0
    assert results["1 MB of text"][0] == 1.0
    assert all(elapsed < HOSTILE_LIMIT_S for _, elapsed in results.values())


def test_verifier_survives_timeouts_and_a_dead_helper():
    assert not answers_match(r"9^{9^{9^{9}}}", "18")  # times out: its child is killed
    assert answers_match(r"3 \times 6", "18")
    rlkd.answer._VERIFIER._proc.kill()
    assert answers_match(r"3 \times 6", "18")  # a fresh helper is started


def test_extract_answer_bounds_work_on_huge_input():
    assert extract_answer("1" * 1_000_000) == "1" * rlkd.answer.TAIL_CHARS


def test_gsm8k_correct():
    completions = ["#### 18", "#### 17", "The answer is $18.00.", "#### 5"]
    assert gsm8k_correct(completions, answer=["18", "18", "18", None]) == [1.0, 0.0, 1.0, None]


@pytest.mark.parametrize(
    "completion,line,partial",
    [
        ("9 * 2 = 18\n#### 18", 1.0, 1.0),
        ("9 * 2 = 18\n#### -1,234.5\n\n  ", 1.0, 1.0),
        ("####18", 1.0, 1.0),
        ("#### 18\nI hope this helps!", 0.0, 0.5),
        ("#### $18", 0.0, 0.25),
        ("#### 18 dollars", 0.0, 0.5),
        ("The answer is ####", 0.0, 0.25),
        ("The answer is 18.", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_format_answer_line(completion, line, partial):
    assert format_answer_line([completion]) == [line]
    assert format_answer_line_partial([completion]) == [partial]


@pytest.mark.parametrize(
    "completion,truncated,worked",
    [
        ("9 * 2 = 18\n#### 18", False, 1.0),
        ("She has 3 + 4 = 7 apples, 7 * 2 = 14.\nSo 14 - 1 = 13\n#### 13", False, 1.0),
        ("1,200 / 3 = 400\n#### 400.0", False, 1.0),
        ("9 * 2 = 18\n#### 18", True, 0.0),  # cut at the cap
        ("#### 18", False, 0.0),  # the bare answer the main job collapsed to
        ("The answer is 18.\n#### 18", False, 0.0),  # words, no equation
        ("9 * 2 = 18\n#### 19", False, 0.0),  # the answer is not the work's result
        ("9 * 2 = 19\n#### 19", False, 1.0),  # wrong work still ends in its own result
        ("#### 18\n9 * 2 = 18", False, 0.0),  # work after the answer line
        ("9 * 2 = 18\n#### 18 dollars", False, 0.0),
        ("", False, 0.0),
    ],
)
def test_worked_answer_line_pays_only_an_answer_that_ends_written_work(completion, truncated, worked):
    assert worked_answer_line([completion], truncated=[truncated]) == [worked]
    assert format_answer_line([completion]) == [1.0] or worked == 0.0  # it never pays more than the plain line


@pytest.mark.parametrize(
    "completion,full,partial",
    [
        ("<think>9 * 2 = 18</think>\n#### 18", 1.0, 1.0),
        ("  <think>\nreasoning\n</think><answer>18</answer>", 1.0, 1.0),
        ("<think>9 * 2 = 18</think>", 0.0, 0.75),  # no answer
        ("<think> </think>18", 0.0, 0.75),  # no reasoning
        ("9 * 2 = 18</think>18", 0.0, 0.5),  # chat template ate <think>
        ("Sure! <think>9 * 2 = 18</think>18", 0.0, 0.5),  # does not start with <think>
        ("<think>9 * 2 = 18\n#### 18", 0.0, 0.25),  # never closed
        ("<think>a</think>b<think>c</think>d", 0.0, 0.0),  # two blocks
        ("</think>18<think>", 0.0, 0.25),  # tags reversed: only the answer part counts
        ("#### 18", 0.0, 0.0),
    ],
)
def test_format_think(completion, full, partial):
    assert format_think([completion]) == [full]
    assert format_think_partial([completion]) == [partial]


def test_load_reward_by_name_dotted_path_and_file():
    assert load_reward("gsm8k_correct") is gsm8k_correct
    assert load_reward("rewards.format:format_think") is format_think
    length_penalty = load_reward(f"{MY_REWARD}:length_penalty")
    assert length_penalty(["abcd"], answer=["1"]) == [-0.004]


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "gsm8k_corect",
            "reward 'gsm8k_corect': unknown name (built-ins: gsm8k_correct, arithmetic_steps, format_answer_line, "
            "format_answer_line_partial, format_think, format_think_partial, worked_answer_line; or use "
            "'pkg.module:fn' / 'path/to/file.py:fn'); did you mean 'gsm8k_correct'?",
        ),
        ("zzz", "reward 'zzz': unknown name (built-ins: gsm8k_correct"),
        ("no/such/file.py:fn", "reward 'no/such/file.py:fn': file not found: "),
        ("no_such_pkg.mod:fn", "reward 'no_such_pkg.mod:fn': cannot import 'no_such_pkg.mod': "),
        (
            "rewards.format:nope",
            "reward 'rewards.format:nope': 'rewards.format' has no attribute 'nope'",
        ),
        (
            f"{MY_REWARD}:missing",
            f"reward '{MY_REWARD}:missing': '{MY_REWARD}' has no attribute 'missing'",
        ),
        (
            f"{MY_REWARD}:NOT_CALLABLE",
            f"reward '{MY_REWARD}:NOT_CALLABLE': 'NOT_CALLABLE' is not callable (got int)",
        ),
    ],
)
def test_load_reward_errors(spec, message):
    with pytest.raises(ValueError) as info:
        load_reward(spec)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text
    if spec == "zzz":
        assert "did you mean" not in text


def _constant(value):
    return lambda completions, **_: [value] * len(completions)


def test_compute_rewards_weights_and_none():
    fns = {
        "correct": gsm8k_correct,
        "format": format_answer_line,
        "maybe": lambda completions, **_: [None, 0.5, True],
    }
    totals, raw, errors = compute_rewards(
        fns,
        {"correct": 1.0, "format": 0.5},  # "maybe" defaults to weight 1.0
        ["#### 18", "The answer is 18", "#### 7"],
        answer=["18", "18", "18"],
        prompts=["q1", "q2", "q3"],
    )
    assert totals == [1.5, 1.5, 1.5]
    assert raw["correct"] == [1.0, 1.0, 0.0]
    assert raw["format"] == [1.0, 0.0, 1.0]
    assert math.isnan(raw["maybe"][0]) and raw["maybe"][1:] == [0.5, 1.0]
    assert errors == {"correct": 0, "format": 0, "maybe": 0}


def _raises(completions, **_):
    raise KeyError("solution")


@pytest.mark.parametrize(
    "fn,message",
    [
        (_raises, "reward 'bad' raised KeyError: 'solution'"),
        (lambda completions, **_: [1.0], "reward 'bad' returned 1 scores for 2 completions"),
        (lambda completions, **_: 1.0, "reward 'bad' returned a float, not a list"),
        (_constant("1.0"), "reward 'bad' returned '1.0' at index 0"),
        (lambda completions, **_: [1.0, math.nan], "reward 'bad' returned nan at index 1"),
        (_constant(math.inf), "reward 'bad' returned inf at index 0"),
        (_constant(10**400), "reward 'bad' returned 1000000"),
        (_constant(10**5000), "reward 'bad' returned a huge int at index 0"),
    ],
)
def test_compute_rewards_errors(fn, message):
    fns = {"good": _constant(1.0), "bad": fn}
    with pytest.raises(RewardError) as info:
        compute_rewards(fns, {}, ["a", "b"])
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)

    totals, raw, errors = compute_rewards(fns, {"bad": 2.0}, ["a", "b"], on_error="zero")
    assert totals == [1.0, 1.0]
    assert raw["bad"] == [0.0, 0.0]
    assert errors == {"good": 0, "bad": 1}


def test_compute_rewards_rejects_bad_arguments():
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'zero'"):
        compute_rewards({}, {}, ["a"], on_error="ignore")
    with pytest.raises(ValueError, match=r"weights name rewards that are not in fns: \['typo'\]"):
        compute_rewards({"good": _constant(1.0)}, {"typo": 1.0}, ["a"])


def test_a_truncated_completion_is_not_graded_by_its_last_number():
    # Cut at the token cap, "... 3 + 15 = 18" stops mid-reasoning on the gold number by luck;
    # an explicit answer line still counts, cut or not.
    mid = "She has 16 - 3 - 4 = 9 eggs left, and 3 + 15 = 18"
    line = "16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18"
    assert gsm8k_correct([mid, mid, line], answer=["18"] * 3, truncated=[False, True, True]) == [1.0, 0.0, 1.0]
    assert gsm8k_correct([mid], answer=["18"]) == [1.0]  # no truncated column: graded as before


QUESTION = "Tom has 120 books and buys 3 boxes of 4 books each."


@pytest.mark.parametrize("completion, score", [
    ("3 * 4 = 12\n120 + 12 = 132\n#### 132", 1.0),  # right and grounded, the second on a result
    ("3 x 4 = 12 and 120 + 12 = 133", 0.5),  # x multiplies; the second sum is wrong
    ("120 - 90 = 10", 0.0),  # wrong
    ("1 + 1 = 2, so 120 + 3 = 123", 0.5),  # the first is right but unrelated to the question
    ("The answer is 132.", 0.0),  # no equation: nothing to check
    ("$120 / 4 = $30", 1.0),  # currency signs
    ("1,200 + 5 = 1,205", 0.0),  # neither 1,200 nor 5 is in the question
    ("(120 + 3) * 4 = 492", 1.0),
    ("12 = 12 and 3 ** 4 = 81 and 4 / 0 = 1", 0.0),  # no operator; power and /0 are not checked
])
def test_arithmetic_steps_by_hand(completion, score):
    assert arithmetic_steps([completion], question=[QUESTION]) == [score]


def test_arithmetic_steps_gives_nothing_to_a_truncated_completion():
    text = "3 * 4 = 12"
    assert arithmetic_steps([text, text], question=[QUESTION] * 2, truncated=[False, True]) == [1.0, 0.0]
    assert REGISTRY["arithmetic_steps"] is arithmetic_steps
