"""CoT sample filters, selection and the filter report, on hand-made samples."""

import json
import math

import pytest
from transformers import AutoTokenizer

from rlkd.compose import load_config
from rlkd.config import FilterConfig, Select
from rlkd.errors import ConfigError
from rlkd.filters import (
    SAMPLE_FILTERS,
    apply_filters,
    jaccard,
    report_markdown,
    strip_calculator,
    trigrams,
)
from rlkd.tasks.cot import gold_samples, plot_lengths, read_samples, teacher_prompt, write_outputs
from rlkd.types import Example

GOOD = "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = 18 dollars.\n#### 18"


def sample(text=GOOD, qid="q1", gold="18", n=None, lp=-0.2, t=0.5, truncated=False, gold_tokens=20):
    return {"id": qid, "question": "How much?", "gold": gold, "text": text,
            "num_tokens": n if n is not None else len(text.split()), "gold_tokens": gold_tokens,
            "mean_logprob": lp, "min_logprob": lp, "temperature": t, "prompt_mode": "plain",
            "sample_index": 0, "truncated": truncated, "teacher": "m", "seed": 0}


def verdicts(samples, **cfg):
    kept, report = apply_filters(samples, FilterConfig(dedup_jaccard=0, max_per_question=0, **cfg))
    return [s["drop_reason"] for s in samples], report


@pytest.mark.parametrize(("bad", "cfg", "reason"), [
    (sample(GOOD.replace("#### 18", "#### 17")), {}, "correct"),
    (sample(GOOD.replace("\n#### 18", " so the answer is 18.")), {}, "answer_line"),
    (sample(GOOD.replace("#### 18", "#### 18 dollars")), {}, "answer_line"),
    (sample(n=2), {"min_tokens": 3}, "length"),
    (sample(n=500), {"max_tokens": 300}, "length"),
    (sample(truncated=True), {}, "truncated"),
    (sample(n=90, gold_tokens=30), {"max_gold_ratio": 2.0}, "concise"),
    (sample(lp=-1.3), {"min_mean_logprob": -0.5}, "confidence"),
])
def test_each_filter_drops_its_failure_case_and_keeps_the_good_sample(bad, cfg, reason):
    reasons, report = verdicts([sample(), bad], **cfg)
    assert reasons == [None, reason]
    assert report["rejected_by_filter"][reason] == 1
    assert report["kept"] == 1


def test_switched_off_filters_keep_everything():
    bad = [sample(GOOD.replace("#### 18", "#### 17")), sample(GOOD.replace("#### 18", "")),
           sample(truncated=True), sample(lp=-3.0)]
    reasons, _ = verdicts(bad, correct=False, answer_line=False, drop_truncated=False, min_mean_logprob=0.0)
    assert reasons == [None] * 4


def test_confidence_ignores_gold_rationales_without_logprobs():
    reasons, _ = verdicts([sample(lp=float("nan")), sample(lp=None)], min_mean_logprob=-0.1)
    assert reasons == [None, None]


def test_boxed_answer_counts_as_correct_but_not_as_an_answer_line():
    s = sample("9 * 2 = 18, so \\boxed{18}")
    reasons, report = verdicts([s], answer_line=False)
    assert reasons == [None]
    reasons, report = verdicts([s])
    assert reasons == ["answer_line"] and report["rejected_by_filter"]["correct"] == 0


def test_near_duplicates_are_dropped_and_distinct_samples_kept():
    a = sample(GOOD)
    b = sample(GOOD.replace("She sells", "Janet sells"))  # one word changed
    c = sample("Eggs left: 16 - 7 = 9. Money: 9 x $2 = $18.\n#### 18")
    kept, report = apply_filters([a, b, c], FilterConfig(dedup_jaccard=0.7, max_per_question=0, select=Select.first))
    assert [s["text"] for s in kept] == [a["text"], c["text"]]
    assert report["dropped_near_duplicate"] == 1
    assert jaccard(trigrams(a["text"]), trigrams(b["text"])) >= 0.7 > jaccard(trigrams(a["text"]), trigrams(c["text"]))


@pytest.mark.parametrize(("select", "expect"), [(Select.shortest, "short"), (Select.confident, "sure"),
                                                (Select.first, "first")])
def test_selection_rule_per_question(select, expect):
    texts = {"first": "Step one: 16 - 7 = 9 eggs; 9 * 2 = 18 dollars.\n#### 18",
             "short": "9 * 2 = 18\n#### 18",
             "sure": "Janet has 9 eggs left and earns 9 * 2 = 18.\n#### 18"}
    samples = [sample(texts["first"], n=30, lp=-0.5), sample(texts["short"], n=8, lp=-0.6),
               sample(texts["sure"], n=20, lp=-0.1)]
    kept, report = apply_filters(samples, FilterConfig(select=select, max_per_question=1))
    assert [s["text"] for s in kept] == [texts[expect]]
    assert report["dropped_per_question_cap"] == 2


def test_keep_up_to_m_and_coverage():
    samples = [sample(f"Way {i}: {'x ' * i} 9 * 2 = 18\n#### 18", qid="q1", n=10 + i) for i in range(4)]
    samples += [sample(GOOD.replace("18", "17"), qid="q2"), sample(GOOD, qid="q3", gold="5")]
    kept, report = apply_filters(samples, FilterConfig(max_per_question=2, dedup_jaccard=0))
    assert [s["num_tokens"] for s in kept] == [10, 11]
    assert report["questions"] == 3 and report["questions_covered"] == 1
    assert report["coverage"] == pytest.approx(1 / 3)
    # Every drop is attributed exactly once.
    assert (sum(report["dropped_first_by"].values()) + report["dropped_near_duplicate"]
            + report["dropped_per_question_cap"]) == report["dropped"] == len(samples) - len(kept)
    md = report_markdown(report, FilterConfig(max_per_question=2))
    assert "| correct | 2 | 2 |" in md and "coverage: 33.3%" in md
    assert set(report["rejected_by_filter"]) == set(SAMPLE_FILTERS)


def test_strip_calculator():
    assert strip_calculator("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"
    assert strip_calculator("no annotations <b>") == "no annotations <b>"


@pytest.fixture(scope="module")
def tokenizer():
    from rlkd.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def test_gold_samples_and_primed_prompt(tokenizer):
    ex = Example("gsm8k:train:0", "Natalia sold 48 clips...", "72", "48/2 = <<48/2=24>>24\n48+24 = <<48+24=72>>72")
    cfg = load_config("cot_gsm8k", ["cot.prompt_mode=gold"])
    (s,) = gold_samples([ex], tokenizer, cfg)
    assert s["text"] == "48/2 = 24\n48+24 = 72\n#### 72" and s["prompt_mode"] == "gold"
    assert s["num_tokens"] == s["gold_tokens"] > 5 and math.isnan(s["mean_logprob"])
    kept, _ = apply_filters([s], cfg.filter)
    assert kept == [s]  # a gold rationale passes every default filter
    primed = teacher_prompt(tokenizer, ex, load_config("cot_gsm8k", ["cot.prompt_mode=gt_primed"]))
    plain = teacher_prompt(tokenizer, ex, cfg)
    assert "The correct final answer is 72." in primed and "72" not in plain


def test_outputs_and_refilter_round_trip(tmp_path):
    samples = [sample(), sample(GOOD.replace("18", "17"), qid="q2"), sample(qid="q3", t=0.3)]
    cfg = load_config("cot_gsm8k")
    kept, report = apply_filters(samples, cfg.filter)
    write_outputs(samples, kept, report, cfg, tmp_path)
    assert (tmp_path / "lengths.png").stat().st_size > 1000
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 2
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "kept.parquet"), split="train")
    assert ds["id"] == ["q1", "q3"] and "teacher" in ds.column_names
    again = read_samples(str(tmp_path))
    kept2, report2 = apply_filters(again, cfg.filter)
    assert [s["id"] for s in kept2] == ["q1", "q3"] and report2["kept"] == report["kept"]


def test_read_samples_names_the_bad_line(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text(json.dumps(sample()) + "\n{oops\n")
    with pytest.raises(ConfigError, match=r"samples.jsonl:2: not valid JSON"):
        read_samples(str(p))
    p.write_text(json.dumps({"id": "q"}) + "\n")
    with pytest.raises(ConfigError, match=r"samples.jsonl:1: missing field\(s\) gold, text, num_tokens"):
        read_samples(str(p))
    with pytest.raises(ConfigError, match="no such file"):
        read_samples(str(tmp_path / "nope.jsonl"))


def test_plot_handles_all_dropped(tmp_path):
    s = sample(truncated=True)
    apply_filters([s], FilterConfig())
    assert plot_lengths([s], tmp_path / "l.png").exists()


def test_trim_after_answer_keeps_the_first_answer_line():
    from rlkd.tasks.cot import trim_after_answer

    assert trim_after_answer("9 * 2 = 18\n#### 18\nThe answer is: 18") == "9 * 2 = 18\n#### 18"
    assert trim_after_answer("#### 1,234.5\n\nmore") == "#### 1,234.5"
    assert trim_after_answer("no answer line") == "no answer line"
    assert trim_after_answer("#### \n#### 7\nz") == "#### \n#### 7"
