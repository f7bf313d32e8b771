"""rlkd.eval.compare: the paired McNemar comparison of two predictions.jsonl files.

Importing rlkd.eval pulls in transformers and vLLM (~25 s on a busy CPU, paid once per session);
the tests themselves only read and write small files.
"""

import json
import math

import pytest

from rlkd.compose import load_config
from rlkd.errors import ConfigError
from rlkd.scoring import read_predictions
from rlkd.stats import mcnemar_exact
from rlkd.tasks.eval import compare, evaluate

# Paired outcomes (a correct, b correct) -> how many questions: b01 = 7, b10 = 2, n = 18.
COUNTS = {(True, True): 6, (False, False): 3, (False, True): 7, (True, False): 2}
# Two-sided exact p for 7 vs 2 discordant: 2 * (C(9,0) + C(9,1) + C(9,2)) / 2**9.
P_VALUE = 2 * (1 + 9 + 36) / 512


def paired_outcomes() -> dict[str, tuple[bool, bool]]:
    outcomes, i = {}, 0
    for pair, count in COUNTS.items():
        for _ in range(count):
            outcomes[f"gsm8k-test-{i}"] = pair
            i += 1
    return outcomes


def row(qid, correct: bool) -> dict:
    """A predictions.jsonl row as rlkd.eval.score writes it."""
    return {
        "id": qid,
        "question": f"question {qid}",
        "gold": "5",
        "completion": "... #### 5" if correct else "... #### 4",
        "parsed": "5" if correct else "4",
        "correct": correct,
        "num_tokens": 12,
        "truncated": False,
    }


def write_jsonl(path, rows, blank_lines: bool = False) -> str:
    lines = [json.dumps(r) for r in rows]
    if blank_lines:
        lines = ["", *lines[:1], "   ", *lines[1:], ""]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def prediction_files(tmp_path):
    """a.jsonl and b.jsonl with the COUNTS pairing plus ids only one of them answered."""
    outcomes = paired_outcomes()
    rows_a = [row(qid, a) for qid, (a, _) in outcomes.items()]
    # b in reverse order: pairing goes by id, not by position.
    rows_b = [row(qid, b) for qid, (_, b) in reversed(outcomes.items())]
    # Unshared ids that would change every count if they were paired.
    rows_a += [row("only-a-1", True), row("only-a-2", True)]
    rows_b += [row("only-b-1", True), row("only-b-2", True), row("only-b-3", True)]
    path_a = write_jsonl(tmp_path / "a.jsonl", rows_a, blank_lines=True)
    path_b = write_jsonl(tmp_path / "b.jsonl", rows_b)
    return path_a, path_b, outcomes


def one_line(message: str) -> str:
    assert message and "\n" not in message, repr(message)
    return message


def test_compare_counts_discordant_pairs(prediction_files, tmp_path):
    path_a, path_b, outcomes = prediction_files
    result = compare(path_a, path_b)
    a = [pair[0] for pair in outcomes.values()]
    b = [pair[1] for pair in outcomes.values()]
    expected = mcnemar_exact(a, b)

    assert (result["b01"], result["b10"], result["n"]) == (7, 2, 18)
    assert {k: result[k] for k in expected} == expected
    assert math.isclose(result["p_value"], P_VALUE, rel_tol=1e-12)
    assert math.isclose(result["accuracy_a"], (6 + 2) / 18)
    assert math.isclose(result["accuracy_b"], (6 + 7) / 18)
    assert not (tmp_path / "comparison.json").exists()


def test_compare_is_antisymmetric(prediction_files):
    path_a, path_b, _ = prediction_files
    ab, ba = compare(path_a, path_b), compare(path_b, path_a)
    assert (ba["b01"], ba["b10"]) == (ab["b10"], ab["b01"])
    assert (ba["accuracy_a"], ba["accuracy_b"]) == (ab["accuracy_b"], ab["accuracy_a"])
    assert ba["p_value"] == ab["p_value"]


def test_compare_writes_comparison_json(prediction_files, tmp_path, capsys):
    path_a, path_b, _ = prediction_files
    out = tmp_path / "comparison.json"
    result = compare(path_a, path_b, out=out)
    assert json.loads(out.read_text()) == result
    printed = capsys.readouterr().out
    assert "Paired comparison" in printed and "McNemar exact p" in printed


def test_evaluate_with_eval_compare_only_compares(prediction_files, tmp_path):
    """`python -m rlkd.eval eval.compare=[A,B]`: no model is loaded, the run dir gets the json."""
    path_a, path_b, _ = prediction_files
    cfg = load_config("eval_gsm8k", [f"eval.compare=['{path_a}','{path_b}']"])
    assert cfg.eval.compare == [path_a, path_b]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = evaluate(cfg, run_dir)
    assert (result["b01"], result["b10"]) == (7, 2)
    assert json.loads((run_dir / "comparison.json").read_text()) == result


def test_read_predictions_skips_blank_lines_and_keeps_bools(prediction_files):
    path_a, _, outcomes = prediction_files
    rows = read_predictions(path_a)
    assert rows == {
        **{qid: a for qid, (a, _) in outcomes.items()},
        "only-a-1": True,
        "only-a-2": True,
    }
    assert all(type(v) is bool for v in rows.values())


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"id": "q3", "correct": tru',  # truncated JSON
        '{"id": "q3"}',  # no "correct"
        '{"correct": true, "question": "q"}',  # no "id"
        "not json at all",
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line):
    good = [json.dumps(row(f"q{i}", True)) for i in range(2)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good[0], "", bad_line, good[1]]) + "\n")
    other = write_jsonl(tmp_path / "other.jsonl", [row("q0", False)])
    with pytest.raises(ConfigError) as info:
        compare(other, str(path))
    assert one_line(str(info.value)).startswith(f"{path}:3: ")


@pytest.mark.parametrize("bad_line", ["[1, 2]", "null", '{"id": [1], "correct": true}'])
def test_valid_json_that_is_not_a_row_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row("q0", True)) + "\n" + bad_line + "\n")
    with pytest.raises(ConfigError, match=r":2: "):
        read_predictions(str(path))


@pytest.mark.parametrize("which", ["a", "b"])
def test_missing_file(prediction_files, tmp_path, which):
    path_a, path_b, _ = prediction_files
    missing = str(tmp_path / "nope" / "predictions.jsonl")
    args = (missing, path_b) if which == "a" else (path_a, missing)
    with pytest.raises(ConfigError) as info:
        compare(*args)
    message = one_line(str(info.value))
    assert "no such predictions file" in message and missing in message


def test_no_shared_ids(tmp_path):
    path_a = write_jsonl(tmp_path / "a.jsonl", [row("q1", True), row("q2", False)])
    path_b = write_jsonl(tmp_path / "b.jsonl", [row("q3", True), row("q4", True)])
    with pytest.raises(ConfigError) as info:
        compare(path_a, path_b, out=tmp_path / "comparison.json")
    message = one_line(str(info.value))
    assert "share no question ids" in message and path_a in message and path_b in message
    assert not (tmp_path / "comparison.json").exists()


def test_no_discordant_pairs_gives_p_one(tmp_path):
    rows = [row("q1", True), row("q2", False)]
    path_a = write_jsonl(tmp_path / "a.jsonl", rows)
    path_b = write_jsonl(tmp_path / "b.jsonl", rows)
    result = compare(path_a, path_b)
    assert (result["b01"], result["b10"], result["p_value"]) == (0, 0, 1.0)
    assert result["accuracy_a"] == result["accuracy_b"] == 0.5


def test_score_grades_in_order_across_chunks():
    from rlkd.config import DataConfig
    from rlkd.scoring import score
    from rlkd.types import Example, Generation, SamplingSpec

    class Tok:  # no chat template: build_prompt's plain "Question: ..." format
        chat_template = None

    def generate(prompts, spec):
        # Answers "#### <question number>" so a shuffled chunk order would be graded wrong.
        return Generation([[1]] * len(prompts), [[1, 2]] * len(prompts), [[-0.1, -0.1]] * len(prompts),
                          [f"#### {p.split('Q')[-1].split()[0]}" for p in prompts], [False] * len(prompts), 1.0)

    examples = [Example(f"x:{i}", f"Q{i} ?", str(i if i % 3 else -1), "") for i in range(10)]
    preds, m = score(generate, Tok(), examples, DataConfig(instruction=""), SamplingSpec(), chunk=4)
    assert [p["correct"] for p in preds] == [bool(i % 3) for i in range(10)]
    assert m["num_correct"] == 6 and m["generate_seconds"] == 3.0  # three chunks, one after another
