"""Bad input is a one-line error naming the culprit, raised before Ray, vLLM or DeepSpeed start.

`load_inputs` checks what a run reads (model, data, rewards, lengths); the CLI turns every such
error into one `rlkd: error:` line. Config-level cases (unknown recipe/key, wrong type, batch
divisibility) live in test_config.py; unreachable-hub cases in test_models.py and test_data.py.
"""

import json
import time

import pytest
import ray
from conftest import GSM8K_DIR

from rlkd.compose import load_config
from rlkd.errors import InputError
from rlkd.preflight import load_inputs
from rlkd.train import main

pytestmark = pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="no local GSM8K copy")

# case: (overrides, start of the message); {tmp} is the test's tmp_path, holding bad.jsonl
# (a malformed second row) and empty.jsonl.
CASES = {
    "missing model path": (["model.name=/no/such/model"], "model.name='/no/such/model': no such directory"),
    "model dir without config": (["model.name={tmp}"], "model.name='{tmp}': {tmp} has no config.json"),
    "missing data": (["data.path={tmp}/nope"], "data.path {tmp}/nope does not exist; {tmp} holds: "),
    "malformed row": (["data.path={tmp}/bad.jsonl"], "{tmp}/bad.jsonl:2: not valid JSON"),
    "empty dataset": (["data.path={tmp}/empty.jsonl"], "{tmp}/empty.jsonl: no valid examples"),
    "completion longer than the context left by the prompt": (
        ["rollout.max_new_tokens=900"], "rollout.max_new_tokens=900 does not fit: example gsm8k:train:"),
    "eval completion too long": (
        ["eval.max_new_tokens=1000"], "eval.max_new_tokens=1000 does not fit: example gsm8k:test:"),
    "context beyond the model's": (
        ["model.max_model_len=100000"], "model.max_model_len=100000 exceeds the model's context of 8192"),
    "reward file missing": (["rewards.funcs=[no/such.py:fn]", "rewards.weights=[1]"],
                            "reward 'no/such.py:fn': file not found"),
    "reward listed twice": (["rewards.funcs=[gsm8k_correct,gsm8k_correct]", "rewards.weights=[1,1]"],
                            "rewards.funcs=['gsm8k_correct', 'gsm8k_correct'] names one function twice"),
}


@pytest.fixture(scope="module")
def small_gsm8k(tmp_path_factory):
    """The first 40 rows of each split: the real format, a fraction of the tokenising time."""
    out = tmp_path_factory.mktemp("data") / "gsm8k"
    out.mkdir()
    for split in ("train", "test"):
        lines = (GSM8K_DIR / f"{split}.jsonl").read_text().splitlines()[:40]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _case(name, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    overrides, expected = CASES[name]
    return [o.format(tmp=tmp_path) for o in overrides], expected.format(tmp=tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_load_inputs_errors_name_the_culprit(case, small_gsm8k, tmp_path):
    overrides, expected = _case(case, tmp_path)
    cfg = load_config(None, [f"data.path={small_gsm8k}", "trainer.eval_every=5", *overrides])
    with pytest.raises(InputError) as info:
        load_inputs(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_good_inputs_load(small_gsm8k):
    cfg = load_config(None, [f"data.path={small_gsm8k}", "trainer.eval_samples=8"])
    inputs = load_inputs(cfg)
    assert len(inputs.train_set) == 40 and len(inputs.eval_set) == 8
    assert list(inputs.reward_fns) == ["gsm8k_correct", "format_answer_line"]


@pytest.mark.parametrize("overrides, expected", [
    (["data.path={tmp}/nope"], "data.path {tmp}/nope does not exist"),
    (["rollout.max_new_tokens=900"], "rollout.max_new_tokens=900 does not fit"),
    (["rewards.funcs=[gsm8k_corect]", "rewards.weights=[1]"], "reward 'gsm8k_corect': unknown name"),
    (["trainer.resume={tmp}/ckpt"], "trainer.resume={tmp}/ckpt: no such checkpoint directory"),
    (["run.dir=", "trainer.resume=auto"], "trainer.resume=auto needs run.dir=<the run directory"),
])
def test_cli_prints_one_line_before_starting_ray(overrides, expected, small_gsm8k, tmp_path):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    with pytest.raises(SystemExit) as info:
        main([f"data.path={small_gsm8k}", f"run.dir={tmp_path / 'run'}",
              *overrides])
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"rlkd: error: {expected.format(tmp=tmp_path)}"), message
    assert not ray.is_initialized()


@pytest.mark.parametrize("fn, expected", [
    ("raises", "reward 'raises' raised KeyError: 'score'"),
    ("nan", "reward 'nan' returned nan at index 0"),
    ("short", "reward 'short' returned 1 scores for 6 completions"),
    ("text", "reward 'text' returned 'good' at index 0"),
])
def test_broken_reward_stops_the_cli_in_seconds_before_ray(fn, expected, small_gsm8k, tmp_path):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main([f"data.path={small_gsm8k}", f"run.dir={tmp_path / 'run'}",
              f"rewards.funcs=[tests/data/bad_rewards.py:{fn}]", "rewards.weights=[1]"])
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message == f"rlkd: error: {expected}", message
    assert not ray.is_initialized() and time.perf_counter() - start < 60


def test_eval_cli_checks_lengths_before_starting_vllm(small_gsm8k, tmp_path):
    with pytest.raises(SystemExit) as info:
        main([f"data.path={small_gsm8k}", f"run.dir={tmp_path}", "eval.max_new_tokens=1000"],
             default_recipe="eval_gsm8k", forced=("task=eval",))
    assert info.value.code.startswith(
        "rlkd: error: eval.max_new_tokens=1000 does not fit: example gsm8k:test:"), info.value.code
