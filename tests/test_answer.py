"""Tests for rlkd.answer: gold parsing, answer extraction and matching on realistic completions."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import GSM8K_DIR

from rlkd.answer import answers_match, extract_answer, gold_answer, is_correct

GSM8K_TEST = GSM8K_DIR / "test.jsonl"

JANET = (
    "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4.\n"
    "So she has 16 - 3 - 4 = 9 eggs left to sell.\n"
    "She sells each egg for $2, so she makes 9 * 2 = $18 every day."
)
ROBE = "Blue fiber: 2 bolts. White fiber is half of that: 2 / 2 = 1 bolt.\nTotal: 2 + 1 = 3 bolts."
HOUSE = (
    "The cost of the house and repairs is 80,000 + 50,000 = $130,000.\n"
    "The value increased by 80,000 * 1.5 = $120,000, so the new value is $200,000.\n"
    "Profit: 200,000 - 130,000 = $70,000."
)

# (completion, gold, extracted answer, correct?)
CASES = [
    # GSM8K's own format, with real rationales from the test set.
    (f"{JANET}\n#### 18", "18", "18", True),
    (f"{JANET}\n#### 16", "18", "16", False),
    (f"{ROBE}\n#### 3", "3", "3", True),
    (f"{HOUSE}\n#### 70000", "70000", "70000", True),
    (f"{HOUSE}\n#### 70,000", "70000", "70000", True),
    (f"{HOUSE}\n#### $70,000.", "70000", "70000", True),
    (f"{HOUSE}\n#### 130000", "70000", "130000", False),
    ("#### 18", "18", "18", True),
    ("####18", "18", "18", True),
    ("#### -3", "-3", "-3", True),
    ("#### 18\nWait, I made a mistake.\n#### 20", "20", "20", True),
    ("#### 9 * 2 = 18", "18", "18", True),
    # "The answer is ..." phrasings.
    (f"{JANET}\nThe answer is 18.", "18", "18", True),
    (f"{JANET}\nThe answer is 17.", "18", "17", False),
    ("The final answer is $18.00", "18", "18.00", True),
    ("The final answer is $18.50", "18", "18.50", False),
    ("So the answer is: 1,234 apples.", "1234", "1234", True),
    ("The answer is 16 - 3 - 4 = 9.", "9", "9", True),
    ("The answer is 0.5. Let me double check: 1/2 = 0.5.", "0.5", "0.5", True),
    ("**Answer:** 18", "18", "18", True),
    ("**Answer**: 18 dollars", "18", "18", True),
    ("Answer: -3", "-3", "-3", True),
    ("Final answer = 42", "42", "42", True),
    ("The answer is below.\nShe makes 9 * 2 = 18 dollars.", "18", "18", True),
    # LaTeX.
    (r"She makes $9 \times 2 = 18$ dollars, so the answer is $\boxed{18}$.", "18", "18", True),
    (r"\boxed{18}", "18", "18", True),
    (r"\boxed{\$18.00}", "18", "18.00", True),
    (r"\boxed{18 \text{ dollars}}", "18", "18", True),
    (r"\boxed{1,234}", "1234", "1234", True),
    (r"\boxed{\frac{1}{2}}", "0.5", "1/2", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", "3/4", True),
    (r"\boxed{3 \times 6}", "18", r"3 \times 6", True),
    (r"\boxed{2 \times 6}", "18", r"2 \times 6", False),
    (r"The probability is $\frac{1}{2}$", "0.5", "1/2", True),
    (r"\fbox{7}", "7", "7", True),
    # Answer tags.
    ("<think>9 * 2 = 18</think>\n<answer>18</answer>", "18", "18", True),
    ("<think>16 - 3 - 4 = 9</think><answer>#### 18</answer>", "18", "18", True),
    ("<answer>The answer is $18.</answer> I think 20 is wrong.", "18", "18", True),
    ("<answer>17</answer>", "18", "17", False),
    (r"<answer>\frac{1}{2}</answer>", "1/2", "1/2", True),
    # Plain last-number fallback and trailing punctuation.
    ("18 dollars", "18", "18", True),
    ("She makes 18.", "18", "18", True),
    ("She makes 18!", "18", "18", True),
    ("1,234", "1234", "1234", True),
    ("-3", "-3", "-3", True),
    ("0.5", "1/2", "0.5", True),
    ("1/2", "0.5", "1/2", True),
    ("The temperature fell to \u22123 degrees.", "-3", "-3", True),
    ("It is 25%.", "25", "25", True),
    (ROBE, "3", "3", True),
    # No answer at all.
    ("", "18", None, False),
    ("I don't know.", "18", None, False),
    ("<answer></answer>", "18", None, False),
]


@pytest.mark.parametrize("completion,gold,extracted,correct", CASES)
def test_extract_and_score(completion, gold, extracted, correct):
    assert extract_answer(completion) == extracted
    assert is_correct(completion, gold) is correct


def test_enough_realistic_cases():
    assert len(CASES) >= 40
    assert 0 < sum(c[3] for c in CASES) < len(CASES)


@pytest.mark.parametrize(
    "pred,gold,match",
    [
        ("18.00", "18", True),
        ("18", "18.0", True),
        ("0.5", "1/2", True),
        (r"\frac{1}{2}", "0.5", True),
        ("$1,234", "1234", True),
        ("18.", "18", True),
        ("17.99", "18", False),
        ("-18", "18", False),
        ("1/3", "0.333333", True),  # a gold of 2+ places may be rounded: finer values round to it
        ("83.3333", "83.33", True),
        ("83.34", "83.33", False),
        ("18.4", "18", False),
        ("0.3333", "0.333333", False),  # ... but not a coarser rounding of it
        ("0.33", "0.333333", False),
        ("0.31", "0.3", False),  # a 1-place gold is exact on the fast path: no float fuzz
        (".5", "0.5", True),
        (r"3 \times 6", "18", True),  # math-verify fallback
        (r"\sqrt{324}", "18", True),
        ("x", "18", False),
        (None, "18", False),
        ("", "18", False),
        ("1/0", "18", False),
    ],
)
def test_answers_match(pred, gold, match):
    assert answers_match(pred, gold) is match


def test_answers_match_from_threads():
    # math-verify's own signal-based timeouts raise off the main thread; ours must not.
    def score(i):
        return answers_match(r"3 \times 6", "18") and is_correct(f"#### {i}", str(i))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(score, range(20)))


def test_gold_answer_on_every_gsm8k_test_row():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    assert len(rows) == 1319
    golds = [gold_answer(row["answer"]) for row in rows]
    assert golds[:3] == ["18", "3", "70000"]
    # The gold's own final line must score as correct against itself.
    for row, gold in zip(rows[:50], golds[:50], strict=True):
        assert is_correct(row["answer"], gold)


@pytest.mark.parametrize(
    "field,gold",
    [("#### 1,000", "1000"), ("a\n####  -7 \n", "-7"), ("#### 1 #### 2", "2"), ("#### 2.5", "2.5")],
)
def test_gold_answer_normalises(field, gold):
    assert gold_answer(field) == gold


@pytest.mark.parametrize(
    "field,message",
    [
        ("She makes 18 dollars.", "no '####'"),
        ("", "no '####'"),
        ("#### eighteen", "not a number: 'eighteen'"),
        ("####", "not a number: ''"),
        ("#### 18 dollars", "not a number: '18 dollars'"),
    ],
)
def test_gold_answer_rejects_bad_rows(field, message):
    with pytest.raises(ValueError, match=message):
        gold_answer(field)
