"""rlkd.journal: a Ctrl-C in a long generation loses only the chunk in flight, and a resumed run
ends with what an uninterrupted one gives. Checked through `score` (the eval path) with a
generate whose answers depend on the question, against a straight run written independently."""

import json

import pytest

from rlkd.config import DataConfig
from rlkd.errors import InputError
from rlkd.journal import Journal
from rlkd.scoring import score
from rlkd.types import EnvironmentSpec, Episodes, Example, Generation, SamplingSpec

FP = {"model": "m", "seed": 0}


class Tok:  # no chat template: build_prompt's plain "Question: ..." format
    chat_template = None


def examples(n=10):
    return [Example(f"x:{i}", f"Q{i} ?", str(i if i % 3 else -1), "") for i in range(n)]


def answering(calls, stop_at=None):
    def generate(prompts, spec, rows=None):
        calls.append(spec.first_prompt)
        if spec.first_prompt == stop_at:
            raise KeyboardInterrupt  # as Ctrl-C lands while this chunk is generating
        texts = [f"steps\n#### {p.split('Q')[-1].split()[0]}" for p in prompts]
        gen = Generation([[1]] * len(prompts), [[1, 2, 3]] * len(prompts), [[-0.1] * 3] * len(prompts),
                         texts, [False] * len(prompts), 1.0)
        if spec.environment is not None:  # episodes: question i called the tool i % 3 times
            assert [r["question"] for r in rows] == [p.split("Question: ")[-1].split("\n")[0] for p in prompts]
            calls_ = [int(r["id"].split(":")[1]) % 3 for r in rows]
            gen.loss_masks = [[1, 0, 1] if c else [1, 1, 1] for c in calls_]
            gen.episodes = Episodes(turns=[c + 1 for c in calls_], tool_calls=calls_, tool_errors=[0] * len(rows),
                                    failures=[""] * len(rows), tool_tokens=[int(c > 0) for c in calls_])
        return gen
    return generate


@pytest.mark.parametrize("environment", [None, EnvironmentSpec("calculator", 3, 5.0, {"calculate": ["expression"]})])
def test_an_interrupted_score_resumes_to_the_straight_result(tmp_path, environment):
    spec = SamplingSpec(environment=environment)
    straight, m_straight = score(answering([]), Tok(), examples(), DataConfig(instruction=""), spec, chunk=4)
    path = tmp_path / "j.jsonl"
    first = []
    with pytest.raises(KeyboardInterrupt):
        score(answering(first, stop_at=8), Tok(), examples(), DataConfig(instruction=""), spec, chunk=4,
              journal=Journal(path, FP, resume=False))
    assert first == [0, 4, 8]
    again = []
    journal = Journal(path, FP, resume=True)
    assert journal.rows_done == 8
    preds, m = score(answering(again), Tok(), examples(), DataConfig(instruction=""), spec, chunk=4,
                     journal=journal)
    assert again == [8], "only the chunk in flight is generated again"
    assert preds == straight
    assert m == m_straight
    if environment is not None:  # tool use survived the journal, and lengths are the policy's
        assert [p["tool_calls"] for p in preds] == [i % 3 for i in range(10)]
        assert [p["num_tokens"] for p in preds] == [2 if i % 3 else 3 for i in range(10)]
        assert m["tool_call_rate"] == pytest.approx(0.6)


def test_a_fresh_run_ignores_an_old_journal(tmp_path):
    path = tmp_path / "j.jsonl"
    Journal(path, FP, resume=False).add(0, [{"a": 1}], 2.0)
    assert Journal(path, FP, resume=True).get(0) == ([{"a": 1}], 2.0)
    assert Journal(path, FP, resume=False).get(0) is None
    assert Journal(path, FP, resume=True).get(0) is None  # the fresh run started it over


def test_resume_with_other_settings_names_the_key(tmp_path):
    path = tmp_path / "j.jsonl"
    Journal(path, FP, resume=False)
    with pytest.raises(InputError, match=r"written with seed=0, this run has seed=1"):
        Journal(path, {**FP, "seed": 1}, resume=True)


def test_a_last_line_cut_short_is_generated_again_and_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path, FP, resume=False)
    j.add(0, [{"a": 1}], 1.0)
    j.add(1, [{"a": 2}], 1.0)
    text = path.read_text()
    path.write_text(text[:-7])  # a crash mid-write
    assert sorted(Journal(path, FP, resume=True).chunks) == [0]
    lines = text.splitlines()
    path.write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")
    with pytest.raises(InputError, match=r"j.jsonl:2: not a journal line"):
        Journal(path, FP, resume=True)
    path.write_text(json.dumps({"chunk": 0}) + "\n")
    with pytest.raises(InputError, match="not an rlkd journal"):
        Journal(path, FP, resume=True)
