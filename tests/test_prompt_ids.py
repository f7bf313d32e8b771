"""One tokenization of a prompt on every path, checked with a tokenizer that adds a BOS.

SmolLM2 and Qwen add no BOS, so paths that tokenized differently (vLLM's text path with special
tokens, SFT without) agreed by luck. Built from the embedded tokenizer with add_bos_token=True
(its BOS is <|im_start|>, which its chat template also writes first), every path must give the
same ids: one BOS, then the prompt's text.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.actors.rollout import token_prompts
from rlkd.compose import load_config
from rlkd.config import DataConfig
from rlkd.data import build_prompt, encode_prompt
from rlkd.errors import InputError
from rlkd.models import resolve_model
from rlkd.preflight import check_prompt_lengths
from rlkd.tasks.quantize import TransformersGenerator
from rlkd.tasks.sft import SFTExample, tokenize
from rlkd.types import Example, SamplingSpec

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def bos_tok(model_path):
    tok = AutoTokenizer.from_pretrained(model_path, add_bos_token=True)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer really adds one
    return tok


def one_bos_then_text(tok, text: str) -> list[int]:
    """The expected ids, built by hand: the BOS once, then the text without any leading BOS."""
    return [tok.bos_token_id, *tok(text.removeprefix(tok.bos_token), add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("templated", [True, False])
def test_every_path_gives_the_same_ids(bos_tok, model_path, templated):
    data = DataConfig() if templated else DataConfig(instruction="")
    if not templated:
        bos_tok = AutoTokenizer.from_pretrained(model_path, add_bos_token=True)
        bos_tok.chat_template = None  # a base model's plain "Question: ... Answer:" prompt
    prompt = build_prompt(bos_tok, QUESTION, data)
    expected = one_bos_then_text(bos_tok, prompt)
    if templated:  # vLLM's own text path would have doubled the BOS the template writes
        assert bos_tok(prompt)["input_ids"][:2] == [bos_tok.bos_token_id] * 2
    else:  # and add_special_tokens=False (SFT's old path) would have dropped it
        assert bos_tok(prompt, add_special_tokens=False)["input_ids"][0] != bos_tok.bos_token_id

    assert encode_prompt(bos_tok, prompt) == expected
    # rollout, eval and CoT: what vLLM receives
    assert token_prompts(bos_tok, [prompt])[0]["prompt_token_ids"] == expected
    # SFT
    cfg = load_config("sft_gsm8k", [] if templated else ["data.instruction="])
    batch, _ = tokenize([SFTExample("x", QUESTION, "7")], bos_tok, cfg)
    assert batch.prompt_ids[0] == expected
    # the transformers engine (quantized students)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    gen = TransformersGenerator(model, bos_tok)([prompt], SamplingSpec(n=1, max_tokens=1, temperature=0.0))
    assert gen.prompt_ids[0] == expected
    # the start-up length check counts those same ids
    ex = [Example("x", QUESTION, "7", "")]
    room = cfg.model.max_model_len - len(expected)
    check_prompt_lengths(bos_tok, ex, cfg, "rollout.max_new_tokens", room)
    with pytest.raises(InputError, match=f"has a {len(expected)}-token prompt"):
        check_prompt_lengths(bos_tok, ex, cfg, "rollout.max_new_tokens", room + 1)



def test_a_tokenizer_without_bos_is_left_as_is(model_path):
    tok = AutoTokenizer.from_pretrained(model_path)
    prompt = build_prompt(tok, QUESTION, DataConfig())
    assert encode_prompt(tok, prompt) == tok(prompt)["input_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
