"""Everything a training run reads from the user, loaded and checked before Ray, vLLM or
DeepSpeed start: a bad model, data file, reward or length is a one-line InputError."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import AutoTokenizer

from environments import load_environment, tool_prompt, tools_of
from rewards import compute_rewards, load_reward
from rlkd.config import Config, DataConfig
from rlkd.data import build_prompt, encode_prompt, load_split, split_held_out, training_pool
from rlkd.errors import InputError
from rlkd.lora import check_lora
from rlkd.models import resolve_model
from rlkd.sampling import reward_columns
from rlkd.types import EnvironmentSpec, Example


@dataclass
class Inputs:
    model_path: str
    tokenizer: object
    train_set: list[Example]
    eval_set: list[Example]
    reward_fns: dict[str, Callable]
    reward_weights: dict[str, float]
    data: DataConfig
    """cfg.data as prompts use it: with an environment, its tools join the system prompt."""
    environment: EnvironmentSpec | None = None


def reward_name(spec: str) -> str:
    """Metric name of a reward: `path/to/file.py:fn` and `pkg.mod:fn` are logged as `fn`."""
    return spec.rsplit(":", 1)[-1]


def load_inputs(cfg: Config) -> Inputs:
    t = cfg.trainer
    model_path = str(resolve_model(cfg.model.name, cfg.model.cache_dir or None))
    check_context(model_path, cfg.model.max_model_len)
    check_lora(model_path, cfg.learner.lora)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    environment, data = load_environment_spec(cfg)
    cfg = replace(cfg, data=data)
    train_set, held_out = split_held_out(cfg.data, load_split(cfg.data, cfg.data.split))
    train_set = training_pool(cfg.data, train_set)
    eval_set = []
    if t.eval_every:
        eval_set = (held_out[:t.eval_samples] if held_out
                    else load_split(cfg.data, cfg.data.eval_split, limit=t.eval_samples))
    check_prompt_lengths(tokenizer, train_set, cfg, "rollout.max_new_tokens", cfg.rollout.max_new_tokens)
    check_prompt_lengths(tokenizer, eval_set, cfg, "eval.max_new_tokens", cfg.eval.max_new_tokens)
    reward_fns = {reward_name(spec): load_reward(spec) for spec in cfg.rewards.funcs}
    if len(reward_fns) != len(cfg.rewards.funcs):
        raise InputError(f"rewards.funcs={cfg.rewards.funcs} names one function twice")
    reward_weights = dict(zip(reward_fns, cfg.rewards.weights, strict=True))
    check_rewards(reward_fns, reward_weights, train_set, tokenizer, cfg)
    return Inputs(model_path, tokenizer, train_set, eval_set, reward_fns, reward_weights, data, environment)


def load_environment_spec(cfg: Config) -> tuple[EnvironmentSpec | None, DataConfig]:
    """rollout.environment loaded and checked (one-line InputError), and the data config whose
    system prompt tells the model its tools."""
    ro = cfg.rollout
    if not ro.environment:
        return None, cfg.data
    cls = load_environment(ro.environment)
    tools = {name: list(t.params) for name, t in tools_of(cls, ro.environment).items()}
    system = "\n\n".join(t for t in (cfg.data.system_prompt, tool_prompt(cls)) if t)
    # A small model copies a call it was shown far more often than one it was told about
    # (SmolLM2-135M on muldiv: ~5% of samples call the tool from the description alone, with
    # one demonstration turn ~80%).
    fewshot = cfg.data.fewshot or [list(pair) for pair in getattr(cls, "demonstrations", [])]
    return (EnvironmentSpec(ro.environment, ro.max_turns, ro.tool_timeout_s, tools),
            replace(cfg.data, system_prompt=system, fewshot=fewshot))


def check_context(model_path: str, max_model_len: int) -> None:
    """vLLM refuses a context longer than the model's positions, but only after start-up."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    limit = config.get("max_position_embeddings")
    if limit and max_model_len > limit:
        raise InputError(
            f"model.max_model_len={max_model_len} exceeds the model's context of {limit} tokens "
            f"({model_path}/config.json max_position_embeddings)"
        )


def check_prompt_lengths(tokenizer, examples: list[Example], cfg: Config, key: str,
                         max_new_tokens: int) -> None:
    """Every prompt plus `max_new_tokens` must fit in model.max_model_len; names the longest."""
    if not examples:
        return
    prompts = [build_prompt(tokenizer, ex.question, cfg.data) for ex in examples]
    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]  # the ids vLLM receives
    longest = max(range(len(examples)), key=lengths.__getitem__)
    room = cfg.model.max_model_len - lengths[longest]
    if max_new_tokens > room:
        raise InputError(
            f"{key}={max_new_tokens} does not fit: example {examples[longest].id} has a "
            f"{lengths[longest]}-token prompt and model.max_model_len={cfg.model.max_model_len}; "
            f"lower {key} to <= {max(room, 0)} or raise model.max_model_len"
        )


# Completions a reward must score without failing: an answer line, prose, nothing at all.
PLACEHOLDER_COMPLETIONS = ("The answer is 42.\n#### 42", "I am not sure.", "")


def check_rewards(reward_fns: dict[str, Callable], reward_weights: dict[str, float], examples: list[Example],
                  tokenizer, cfg: Config) -> None:
    """Call every reward once on real dataset rows with placeholder completions, before any
    actor starts: one that raises, returns the wrong number of scores, NaN or a non-number
    stops the run in seconds with the message it would get mid-run (RewardError)."""
    rows = examples[:2]
    completions = [c for _ in rows for c in PLACEHOLDER_COMPLETIONS]
    k = len(PLACEHOLDER_COMPLETIONS)
    prompts = [build_prompt(tokenizer, ex.question, cfg.data) for ex in rows]
    lengths = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in completions]
    compute_rewards(reward_fns, reward_weights, completions, on_error="raise",
                    **reward_columns(rows, prompts, k, [False] * len(completions), lengths))
