"""Tests for rlkd.data: loading and validating GSM8K, prompt building and the prompt sampler."""

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import datasets
import pytest
from conftest import GSM8K_DIR
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from rlkd.config import DataConfig
from rlkd.data import PromptSampler, build_prompt, load_split, solution_steps, training_pool
from rlkd.errors import DataError
from rlkd.types import Example

needs_gsm8k = pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="no local GSM8K copy")

GOOD = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "What is 1,000 * 2?", "answer": "1000 * 2 = 2000\n#### 2,000"},
]
BAD = {
    "bad_json": ('{"question": "q", "answer": "#### 1"', "not valid JSON"),
    "missing_question": (json.dumps({"answer": "x\n#### 1"}), "missing or empty 'question'"),
    "empty_answer": (json.dumps({"question": "q", "answer": " "}), "missing or empty 'answer'"),
    "no_hashes": (json.dumps({"question": "q", "answer": "it is 4"}), "no '####'"),
    "non_numeric_gold": (json.dumps({"question": "q", "answer": "#### four"}), "not a number"),
    "not_an_object": (json.dumps(["q", "#### 1"]), "expected a JSON object"),
}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def good_lines() -> list[str]:
    return [json.dumps(row) for row in GOOD]


@needs_gsm8k
def test_real_gsm8k_splits():
    cfg = DataConfig(path=str(GSM8K_DIR))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].answer == "18" and test[0].question.startswith("Janet")
    assert test[0].rationale.endswith("18 every day at the farmer’s market.")
    assert (train[0].id, test[-1].id) == ("gsm8k:train:0", "gsm8k:test:1318")
    assert all(ex.rationale and "####" not in ex.rationale for ex in train + test)
    assert len({ex.id for ex in train}) == len(train)


@needs_gsm8k
def test_single_file_ignores_split_and_limit_keeps_first():
    cfg = DataConfig(path=str(GSM8K_DIR / "test.jsonl"))
    full, first = load_split(cfg, "train"), load_split(cfg, "train", limit=5)
    assert len(full) == 1319 and first == full[:5]


def test_local_directory_and_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ["", *good_lines(), "   "])  # blank lines skipped
    by_dir = load_split(DataConfig(path=str(tmp_path)), "train")
    by_file = load_split(DataConfig(path=str(tmp_path / "train.jsonl")), "ignored")
    assert by_dir == by_file
    assert by_dir[1] == Example(
        id=f"{tmp_path.name}:train:1",
        question="What is 1,000 * 2?",
        answer="2000",
        rationale="1000 * 2 = 2000",
    )


def test_parquet_directory_and_file(tmp_path):
    rows = [*GOOD, {"question": "q", "answer": "no gold here"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "test.parquet"))
    with pytest.raises(DataError, match=rf"^{tmp_path}/test.parquet:row 2: .*no '####'"):
        load_split(DataConfig(path=str(tmp_path)), "test")
    cfg = DataConfig(path=str(tmp_path / "test.parquet"), skip_bad_rows=True)
    examples = load_split(cfg, "any")
    assert [ex.answer for ex in examples] == ["5", "2000"]
    assert examples[0].id == f"{tmp_path.name}:test:0"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_names_file_and_line(tmp_path, case):
    line, what = BAD[case]
    path = write_jsonl(tmp_path / "train.jsonl", [good_lines()[0], "", line])
    with pytest.raises(DataError) as err:
        load_split(DataConfig(path=str(path)), "train")
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and what in message
    assert "\n" not in message


def test_skip_bad_rows_warns_once_with_count(tmp_path, caplog):
    bad = [line for line, _ in BAD.values()]
    path = write_jsonl(
        tmp_path / "train.jsonl", [bad[0], good_lines()[0], *bad[1:], good_lines()[1]]
    )
    with caplog.at_level(logging.WARNING, logger="rlkd.data"):
        examples = load_split(DataConfig(path=str(path), skip_bad_rows=True), "train")
    # Ids keep the row index, so they do not depend on which rows were skipped.
    assert [ex.id for ex in examples] == [f"{tmp_path.name}:train:1", f"{tmp_path.name}:train:7"]
    assert len(caplog.records) == 1
    assert f"skipped {len(bad)} bad rows" in caplog.records[0].getMessage()


def test_missing_path_lists_what_is_there(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", good_lines())
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path}/nope does not exist; .*sub/, train.jsonl"):
        load_split(DataConfig(path=str(tmp_path / "nope")), "train")
    with pytest.raises(DataError, match=r"no test.jsonl or test.parquet; .*train.jsonl"):
        load_split(DataConfig(path=str(tmp_path)), "test")
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_split(DataConfig(path=str(tmp_path / "data.csv")), "train")


def test_empty_result_is_an_error(tmp_path):
    empty = write_jsonl(tmp_path / "a.jsonl", ["", " "])
    with pytest.raises(DataError, match=f"^{empty}: no valid examples"):
        load_split(DataConfig(path=str(empty)), "a")
    only_bad = write_jsonl(tmp_path / "b.jsonl", [BAD["no_hashes"][0]])
    with pytest.raises(DataError, match="no valid examples"):
        load_split(DataConfig(path=str(only_bad), skip_bad_rows=True), "b")


def test_unreachable_hub_fails_fast(monkeypatch):
    # A refused local port stands in for the hub, so the test never downloads even when online.
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_split(DataConfig(hub_id="openai/gsm8k"), "test")
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "cannot reach the Hugging Face hub" in message and "openai/gsm8k" in message
    assert "data.path=<local dir>" in message and "\n" not in message


TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>default\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A small local model's tokenizer if one is materialised, else a tiny built one."""
    cache = Path(os.environ.get("RLKD_CACHE_DIR") or Path.home() / ".cache/rlkd")
    for model_dir in sorted(cache.glob("models/*/")):
        if (model_dir / "tokenizer.json").is_file():
            tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
            if tok.chat_template:
                return tok
    return tiny_tokenizer(TEMPLATE)


def test_build_prompt_with_and_without_system(chat_tokenizer):
    question = "What is 2 + 3?"
    cfg = DataConfig(system_prompt="You are a careful tutor.", instruction="Think.")
    with_system = build_prompt(chat_tokenizer, question, cfg)
    assert with_system == chat_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You are a careful tutor."},
            {"role": "user", "content": f"Think.\n\n{question}"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "You are a careful tutor." in with_system
    default = build_prompt(chat_tokenizer, question, DataConfig(instruction="Think."))
    assert "You are a careful tutor." not in default and f"Think.\n\n{question}" in default
    bare = build_prompt(chat_tokenizer, question, DataConfig(instruction=""))
    assert question in bare and "Think." not in bare


def test_build_prompt_exact_template_and_fallback():
    chat = tiny_tokenizer(TEMPLATE)
    prompt = build_prompt(chat, "Q?", DataConfig(instruction="Solve."))
    assert prompt == "<|system|>default\n<|user|>Solve.\n\nQ?\n<|assistant|>"
    plain = tiny_tokenizer(None)
    assert build_prompt(plain, "Q?", DataConfig(instruction="Solve.")) == (
        "Solve.\n\nQuestion: Q?\nAnswer:"
    )
    assert build_prompt(plain, "Q?", DataConfig(instruction="")) == "Question: Q?\nAnswer:"
    cfg = DataConfig(system_prompt="Be brief.", instruction="Solve.")
    assert build_prompt(plain, "Q?", cfg) == "Be brief.\n\nSolve.\n\nQuestion: Q?\nAnswer:"


def test_fewshot_examples_come_before_the_question_as_earlier_turns():
    shots = [["Q1?", "A1"], ["Q2?", "A2"]]
    chat = tiny_tokenizer(TEMPLATE)
    assert build_prompt(chat, "Q?", DataConfig(instruction="Solve.", fewshot=shots, system_prompt="S")) == (
        "<|system|>S\n<|user|>Solve.\n\nQ1?\n<|assistant|>A1\n<|user|>Solve.\n\nQ2?\n<|assistant|>A2\n"
        "<|user|>Solve.\n\nQ?\n<|assistant|>")
    assert build_prompt(tiny_tokenizer(None), "Q?", DataConfig(instruction="Solve.", fewshot=shots)) == (
        "Solve.\n\nQuestion: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q?\nAnswer:")


def examples(n: int) -> list[Example]:
    return [Example(id=f"t:{i}", question=f"q{i}", answer=str(i), rationale="") for i in range(n)]


def test_sampler_is_deterministic_and_covers_each_epoch():
    pool = examples(10)
    a, b = PromptSampler(pool, seed=3), PromptSampler(pool, seed=3)
    stream = a.next(3) + a.next(3) + a.next(3) + a.next(3) + a.next(8)  # crosses epoch 0 -> 1 -> 2
    assert stream == b.next(20)
    assert Counter(ex.id for ex in stream[:10]) == Counter(ex.id for ex in pool)
    assert Counter(ex.id for ex in stream[10:]) == Counter(ex.id for ex in pool)
    assert stream[:10] != stream[10:]  # reshuffled per epoch
    assert stream[:10] != PromptSampler(pool, seed=4).next(10)
    assert a.state_dict() == {"epoch": 1, "cursor": 10, "seed": 3, "num_examples": 10}
    assert PromptSampler(pool, seed=0).next(0) == []


def test_sampler_resume_continues_identically():
    pool = examples(7)
    original = PromptSampler(pool, seed=11)
    original.next(5)
    state = json.loads(json.dumps(original.state_dict()))  # survives a checkpoint file
    resumed = PromptSampler(pool, seed=999)
    resumed.load_state_dict(state)
    assert resumed.next(17) == original.next(17)
    with pytest.raises(ValueError, match="7 examples"):
        PromptSampler(examples(8), seed=11).load_state_dict(state)


@needs_gsm8k
@pytest.mark.parametrize("split, n", [("train", 7473), ("test", 1319)])
def test_default_is_the_shipped_gsm8k(split, n):
    # No data.path and no hub id: the copy inside the package, row for row the same examples
    # (same ids, so predictions compare) as the reference copy beside the checkout.
    shipped = load_split(DataConfig(), split)
    reference = load_split(DataConfig(path=str(GSM8K_DIR)), split)
    assert len(shipped) == n and shipped == reference
    assert shipped[0].id == f"gsm8k:{split}:0"


def test_max_solution_steps_keeps_short_gold_solutions(tmp_path):
    # Steps are counted by hand here: one line per calculation, blank lines ignored.
    rows = [{"question": "q1", "answer": "a = 1\nb = 2\n#### 2"},
            {"question": "q2", "answer": "a = 1\n\nb = 2\nc = 3\n#### 3"},
            {"question": "q3", "answer": "a = 1\n#### 1"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_split(DataConfig(path=str(tmp_path)), "train")
    assert [solution_steps(ex) for ex in examples] == [2, 3, 1]
    assert [ex.question for ex in training_pool(DataConfig(max_solution_steps=2), examples)] == ["q1", "q3"]
    assert training_pool(DataConfig(), examples) == examples
    with pytest.raises(DataError, match="data.max_solution_steps=1 keeps none of the 2"):
        training_pool(DataConfig(max_solution_steps=1), examples[:2])


def test_real_gsm8k_step_counts():
    # GSM8K's published solution-length histogram starts at 2 steps; 55% of train has 2-3.
    train = load_split(DataConfig(), "train")  # the shipped copy
    short = [ex for ex in train if solution_steps(ex) <= 3]
    assert min(solution_steps(ex) for ex in train) >= 1
    assert 0.5 < len(short) / len(train) < 0.6
