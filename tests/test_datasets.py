"""The dataset registry (data.name) and MAWPS + ASDiv-A: every row loads, its gold rationale
(the equation written as steps) computes its answer, and its decimal and fraction answers grade
right in every form a model writes them."""

import json
import re
from fractions import Fraction

import pytest

from rlkd.answer import answers_match, gold_answer, is_correct
from rlkd.compose import load_config
from rlkd.data import DATASETS, gold_text, load_split
from rlkd.equations import equation_steps, evaluate, format_number
from rlkd.errors import ConfigError

MAWPS = DATASETS["mawps_asdiv_a"].folder


def _rows(split):
    return [json.loads(line) for line in (MAWPS / f"{split}.jsonl").read_text().splitlines()]


def _reference_value(equation: str) -> Fraction:
    """Python's own arithmetic over exact fractions: independent of rlkd.equations' parser."""
    assert re.fullmatch(r"[\d.\s+\-*/()]+", equation), equation
    return eval(re.sub(r"\d+(?:\.\d*)?|\.\d+", lambda m: f"Fraction('{m.group()}')", equation))


@pytest.mark.parametrize("name, sizes", [("gsm8k", (7473, 1319)), ("mawps_asdiv_a", (2341, 619)),
                                          ("arith", None), ("muldiv", (1000, 400))])
def test_every_named_dataset_loads_both_splits(name, sizes):
    cfg = load_config(None, [f"data.name={name}"]).data
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    if sizes:
        assert (len(train), len(test)) == sizes
    assert all(ex.rationale and ex.answer for ex in train + test)


def test_unknown_dataset_name_is_a_one_line_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"data.name=mawps is not a dataset rlkd knows .*did you mean"):
        load_config(None, ["data.name=mawps"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_equation_steps_compute_the_gold_answer(split):
    rows, inexact = _rows(split), 0
    for row in rows:
        value = evaluate(row["equation"])
        assert value == _reference_value(row["equation"])
        gold = gold_answer(row["answer"])
        last = equation_steps(row["equation"])[-1].rpartition("=")[2].strip()
        assert Fraction(last) == Fraction(format_number(value))
        if not answers_match(last, gold):
            # Equations over already-rounded inputs ((0.333333 + 0.333333) + 0.083333 for 0.75).
            assert abs(value - Fraction(gold)) < Fraction(1, 10**3), (row["equation"], gold)
            inexact += 1
    assert inexact < len(rows) / 50


def test_steps_are_written_innermost_first():
    assert equation_steps("( 8 + 2 ) * 3") == ["8 + 2 = 10", "10 * 3 = 30"]
    assert equation_steps("8 - 2") == ["8 - 2 = 6"]
    assert equation_steps("12 / ( 2 * 3 )") == ["2 * 3 = 6", "12 / 6 = 2"]
    assert equation_steps("28.3 * 5") == ["28.3 * 5 = 141.5"]
    with pytest.raises(ValueError, match="divides by zero"):
        equation_steps("1 / ( 2 - 2 )")
    with pytest.raises(ValueError, match="unexpected"):
        equation_steps("2 ** 3")


def test_gold_rationale_is_the_equation_as_steps():
    cfg = load_config(None, ["data.name=mawps_asdiv_a"]).data
    ex = load_split(cfg, "train")[0]
    assert gold_text(ex) == "8 - 2 = 6\n#### 6"


def _forms(gold: str) -> list[str]:
    value = Fraction(gold)
    forms = [gold, f"{gold}0"]
    if gold.startswith("0."):
        forms.append(gold[1:])  # .5
    if len(gold.partition(".")[2]) >= 3:  # rounded by the dataset: the exact fraction
        value = value.limit_denominator(100)
    if value.denominator != 1:
        forms.append(f"{value.numerator}/{value.denominator}")
    return forms


@pytest.mark.parametrize("split", ["train", "test"])
def test_decimal_and_fraction_answers_grade_right_on_the_datasets_own_rows(split):
    decimals = [gold_answer(r["answer"]) for r in _rows(split) if "." in r["answer"]]
    assert len(decimals) > 20
    for gold in decimals:
        for form in _forms(gold):
            assert is_correct(f"So the answer is {form}.\n#### {form}", gold), (form, gold)
        wrong = str(Fraction(gold) + 1)
        assert not is_correct(f"#### {wrong}", gold)


def test_muldiv_answers_are_the_product_or_quotient_of_the_question_numbers():
    cfg = load_config(None, ["data.name=muldiv"]).data
    for ex in load_split(cfg, "train") + load_split(cfg, "test"):
        x, y = (int(n) for n in re.findall(r"\d+", ex.question))
        expected = x * y if ex.question.startswith("Each") else x // y
        assert ex.question.startswith("Each") or x % y == 0, ex.question
        assert ex.answer == str(expected), ex.question
        assert expected >= 12  # two-digit operands: never a one-digit fact the model knows
