"""rlkd.tasks.study_report: the arithmetic check on real-looking rationales, and the table, statistics
and figures built from hand-made evaluation files."""

import json
import time

import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text

from rlkd import arithmetic_claims as ac
from rlkd.stats import mcnemar_exact, wilson_interval
from rlkd.tasks import study_report as sr

# --- arithmetic check --------------------------------------------------------------------------


def verdicts(text: str) -> list[tuple[str, str, bool]]:
    return [(c.lhs, c.rhs, c.correct) for c in ac.arithmetic_claims(text)]


@pytest.mark.parametrize("text, expected", [
    ("2 + 3 = 5", [("2 + 3", "5", True)]),
    ("2 + 3 = 6", [("2 + 3", "6", False)]),
    ("3 + 4 + 5 = 12", [("3 + 4 + 5", "12", True)]),  # the whole left side, not just 4 + 5
    ("She pays $1,200 + $350 = $1,550 in total.", [("$1,200 + $350", "$1,550", True)]),
    ("Each gets 10 / 3 = 3.33 pies", [("10 / 3", "3.33", True)]),  # rounding
    ("Each gets 10 / 3 = 3.4 pies", [("10 / 3", "3.4", False)]),  # beyond rounding
    ("The discount is 50 * 20% = 10 dollars", [("50 * 20%", "10", True)]),
    ("3 - 5 = -2", [("3 - 5", "-2", True)]),
    ("(3 + 4) * 2 = 14 and 2 × (3 + 4) = 15", [("(3 + 4) * 2", "14", True), ("2 × (3 + 4)", "15", False)]),
    ("7 ÷ 2 = 3.5, 3 x 4 = 12, 0.5 * 8 = 4", [("7 ÷ 2", "3.5", True), ("3 x 4", "12", True), ("0.5 * 8", "4", True)]),
    ("1/2 + 1/4 = 3/4 of the cake", [("1/2 + 1/4", "3/4", True)]),
    ("He spent 5 / 0 = 0 hours", [("5 / 0", "0", False)]),
    # A running total: every `=` is a claim about what stands since the previous one.
    ("2 + 3 = 5 * 2 = 10", [("2 + 3", "5 * 2", True), ("5 * 2", "10", True)]),
    ("2 + 3 = 6 * 2 = 12", [("2 + 3", "6 * 2", False), ("6 * 2", "12", True)]),
    # Written left to right without precedence: (10 - 2) * 3.
    ("10 - 2 * 3 = 24", [("10 - 2 * 3", "24", True)]),
    ("-3 + 5 = 2", [("-3 + 5", "2", True)]),
    # No claims: times, units glued to numbers, a lone number on the left, list commas.
    ("At 3:00 + 2 = 5 o'clock", []),
    ("5kg * 2 = 10kg", []),
    ("12 = 3 * 4", []),
    ("items 2,3 + 4 = 7", []),
    ("Let x = 5 and 2x + 3 = 13", []),
])
def test_arithmetic_claims(text, expected):
    assert verdicts(text) == expected


def test_gsm8k_rationale_with_calculator_annotations_counts_each_claim_once():
    gold = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert verdicts(gold) == [("48/2", "24", True), ("48+24", "72", True)]
    wrong = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute. 0.2 x 50 = $<<0.2*50=12>>12.\n#### 12"
    assert verdicts(wrong) == [("12/60", "0.2", True), ("0.2*50", "12", False)]


def test_model_rationale_error_rate():
    rationales = [
        "Janet's ducks lay 16 eggs. She eats 3 and bakes 4, so 16 - 3 - 4 = 9 eggs are left.\n"
        "She sells them at $2 each: 9 * 2 = $18.\n#### 18",
        "The robe takes 2 bolts of blue fiber and 2 / 2 = 1 bolt of white.\nIn total 2 + 1 = 4 bolts.\n#### 4",
        "He has no arithmetic here.\n#### 7",
    ]
    assert ac.arithmetic_errors(rationales) == (1, 4)


def test_hostile_text_is_checked_quickly():
    # Long chains of numbers and operators must not make the regexes backtrack for ever; a
    # left side longer than the window is no claim.
    text = "1 + " * 20000 + "1 = 20001 " + "( " * 20000 + "1 = " * 5000 + "7 and 2 + 2 = 4"
    start = time.perf_counter()
    assert verdicts(text) == [("2 + 2", "4", True)]
    assert time.perf_counter() - start < 5


# --- table and figures -------------------------------------------------------------------------

N = 20


def write_eval(tmp_path, name: str, correct: list[bool], tokens: float, completion: str = "2 + 2 = 4\n#### 4"):
    """A fake evaluation directory as rlkd.eval writes it, with a model dir of known size."""
    model = tmp_path / f"{name}-model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    (model / "tokenizer.json").write_bytes(b"\0" * (1 << 20))  # not weights: not counted
    run = tmp_path / f"eval-{name}"
    run.mkdir()
    preds = [{"id": f"q{i}", "correct": c, "completion": completion, "num_tokens": int(tokens)}
             for i, c in enumerate(correct)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    k = sum(correct)
    lo, hi = wilson_interval(k, N)
    (run / "metrics.json").write_text(json.dumps({
        "model": str(model), "accuracy": k / N, "accuracy_ci_low": lo, "accuracy_ci_high": hi,
        "num_samples": N, "num_correct": k, "mean_completion_tokens": tokens, "tokens_per_s": 250.0,
        "latency_per_sample_s": 0.125, "peak_memory_gb": 2.5, "parameters": 81_400_000}))
    return run


@pytest.fixture
def results(tmp_path):
    data = tmp_path / "cot-plain"
    data.mkdir()
    (data / "filter_report.json").write_text(json.dumps({"kept": 6, "samples": 24, "coverage": 0.5, "questions": 12}))
    (data / "filter_report.md").write_text("# Filter report\n\n- kept: 6\n")
    outcomes = {
        "teacher": ([True] * 12 + [False] * 8, 100.0),
        "no_kd": ([True] * 2 + [False] * 18, 150.0),
        "answer_only": ([False] * 2 + [True] * 4 + [False] * 14, 5.0),
        "cot_correct": ([True] * 10 + [False] * 10, 80.0),
    }
    rows = [sr.Row(key, key, write_eval(tmp_path, key, c, t, "2 + 2 = 5\n3 * 3 = 9\n#### 4" if key == "cot_correct"
                                        else "2 + 2 = 4\n#### 4"), "vLLM, float32",
                   data if key == "cot_correct" else None) for key, (c, t) in outcomes.items()]
    return [sr.load_result(r) for r in rows], outcomes


def test_every_cell_is_filled_and_says_the_right_thing(results):
    loaded, outcomes = results
    rows = {r["model"]: r for r in sr.table_rows(loaded)}
    for row in rows.values():
        assert set(row) == set(sr.COLUMNS) and all(row.values()), row
    cot = rows["cot_correct"]
    assert cot["accuracy [95% CI]"].startswith("50.0% [") and cot["accuracy [95% CI]"].endswith("(10/20)")
    p_nokd = mcnemar_exact(outcomes["no_kd"][0], outcomes["cot_correct"][0])["p_value"]
    assert cot["p vs no-KD"] == f"{p_nokd:.3g}"
    # answer_only (4/20) beats no_kd (2/20): it is the best baseline.
    p_best = mcnemar_exact(outcomes["answer_only"][0], outcomes["cot_correct"][0])["p_value"]
    assert cot["p vs best baseline"] == f"{p_best:.3g}"
    assert rows["answer_only"]["p vs best baseline"] == "ref" and rows["no_kd"]["p vs no-KD"] == "ref"
    assert cot["params (M)"] == "81.4" and cot["disk (MB)"] == "3.0"
    assert cot["latency/sample (s)"] == "0.125" and cot["tokens/s"] == "250" and cot["peak memory (GiB)"] == "2.50"
    assert cot["mean tokens"] == "80.0" and cot["length / teacher"] == "0.80"
    assert rows["teacher"]["length / teacher"] == "1.00"
    assert cot["arithmetic errors"] == "50.0% (20/40)" and rows["no_kd"]["arithmetic errors"] == "0.0% (0/20)"
    assert cot["training data"] == "6/24 kept, 50% of 12 q" and rows["no_kd"]["training data"] == "none"


def test_missing_references_read_n_a(results):
    loaded, _ = results
    alone = [r for r in loaded if r.row.key == "cot_correct"]
    row = sr.table_rows(alone)[0]
    assert row["p vs no-KD"] == row["p vs best baseline"] == row["length / teacher"] == "n/a"


def test_markdown_table_escapes_pipes():
    text = sr.markdown_table([{"a": "x|y", "b": "2"}], ("a", "b"))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 2 |"]


def test_figures_are_written(results, tmp_path):
    loaded, _ = results
    curves = tmp_path / "metrics.jsonl"
    curves.write_text("".join(json.dumps({"step": s, "train/loss": 2.0 / s}) + "\n" for s in range(1, 5)))
    rows = [sr.Row("cot_correct", "cot", tmp_path, "vLLM", curves=curves, curve_kind="sft")]
    for path in (sr.accuracy_figure(loaded, tmp_path / "a.png", "t"),
                 sr.efficiency_figure(loaded, tmp_path / "e.png", "t"),
                 sr.training_figure(rows, tmp_path / "t.png", "t"),
                 sr.training_figure([], tmp_path / "empty.png", "t")):
        assert path.stat().st_size > 3000


def test_seed_summary(results):
    loaded, _ = results
    rows = {r["model"]: r for r in sr.seed_summary({0: loaded, 1: loaded[:2]})}
    assert rows["teacher"]["seeds"] == "2" and rows["teacher"]["sd"] == "0.0%"
    assert rows["cot_correct"]["per seed"] == "50.0%" and rows["cot_correct"]["sd"] == "n/a"


def test_point_labels_never_overlap():
    # Eight variants at one parameter count and accuracy, two more close by: every name is
    # shown, and no two labels cover each other.
    fig, ax = plt.subplots(figsize=(5, 4))
    names = [f"variant_{i}" for i in range(10)]
    points = [(134.5, 0.02)] * 8 + [(135.0, 0.021), (134.0, 0.019)]
    ax.scatter(*zip(*points, strict=True))
    notes = sr.place_labels(ax, points, names)
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(n, renderer) for n in notes]  # the texts, without leader lines
    assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    shown = " ".join(n.get_text().replace("\n", " ") for n in notes)
    assert all(name in shown for name in names)
    plt.close(fig)
