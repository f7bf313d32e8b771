"""One GRPO step's rollouts: draw prompts, sample groups, score them, keep the groups that teach.

With `grpo.dynamic_sampling` (DAPO, Yu et al. 2025) a group whose completions all score alike,
whose advantages are therefore all 0 and whose gradient is exactly 0, is replaced by the group
of a further prompt, until `grpo.prompts_per_step` groups carry signal or
`grpo.max_sampling_rounds` generate calls have run. The batch keeps its shape either way: a step
short of signal is filled with zero-signal groups (which cost the learner nothing) and says so in
`sampling/groups_short`. Every draw goes through the `PromptSampler`, so resuming from its state
replays the extra draws exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from rewards import RewardError, compute_rewards
from rlkd.config import Config, OnError, Overlong
from rlkd.data import PromptSampler, build_prompt
from rlkd.losses import overlong_penalty
from rlkd.types import Episodes, Example, Generation, SamplingSpec

SEED_STRIDE = 10_000_019  # seed offset of each further sampling round of a step (prime)
MAX_OVERSAMPLE = 4  # a later round draws at most this many times prompts_per_step prompts


@dataclass
class Rollouts:
    """The groups a step trains on, laid out prompt-major (completion i is of prompt i // G)."""

    examples: list[Example]
    prompts: list[str]
    gen: Generation
    rewards_N: list[float]
    metrics: dict[str, float] = field(default_factory=dict)  # reward/*, sampling/*, completion/*


def repeat_each(items: list, n: int) -> list:
    """[a, b] -> [a, a, b, b] for n=2: per-prompt values laid out per completion."""
    return [x for x in items for _ in range(n)]


def reward_columns(examples: list[Example], prompts: list[str], n: int, truncated: list[bool],
                   completion_tokens: list[int]) -> dict[str, list]:
    """The columns every reward receives, for `n` completions per example laid out prompt-major."""
    return {"prompts": repeat_each(prompts, n), "answer": repeat_each([ex.answer for ex in examples], n),
            "question": repeat_each([ex.question for ex in examples], n), "truncated": truncated,
            "completion_tokens": completion_tokens}


def score(cfg: Config, reward_fns: dict[str, Callable], reward_weights: dict[str, float],
          examples: list[Example], prompts: list[str], gen: Generation):
    """(total reward per completion, raw scores per function, error counts, overlong metrics);
    the total includes the overlong penalty when grpo.overlong=penalty."""
    G = cfg.grpo.group_size
    rewards_N, per_fn, errors = compute_rewards(
        reward_fns, reward_weights, gen.texts, on_error=cfg.rewards.on_error.value,
        **reward_columns(examples, prompts, G, gen.truncated, gen.policy_tokens()))
    failures = gen.episodes.failures if gen.episodes else []
    if any(failures):  # a tool's own failure is handled like a reward's (rewards.on_error)
        i = next(i for i, f in enumerate(failures) if f)
        if cfg.rewards.on_error == OnError.raise_:
            raise RewardError(f"environment '{cfg.rollout.environment}': {failures[i]} (episode {i} of the "
                              "batch; rewards.on_error=zero scores such episodes 0 and goes on)")
        rewards_N = [0.0 if f else r for r, f in zip(rewards_N, failures, strict=True)]
    g, lengths = cfg.grpo, torch.tensor([len(c) for c in gen.completion_ids])
    penalty_N, over = overlong_penalty(lengths, cfg.rollout.max_new_tokens, g.overlong_buffer, g.overlong_penalty)
    if g.overlong == Overlong.penalty:
        rewards_N = [r + p for r, p in zip(rewards_N, penalty_N.tolist(), strict=True)]
    return rewards_N, per_fn, errors, over


def varied_groups(rewards_N: list[float], group_size: int) -> list[bool]:
    """Per group: do its completions' rewards differ (is there any gradient)?"""
    groups = [rewards_N[i:i + group_size] for i in range(0, len(rewards_N), group_size)]
    return [max(r) != min(r) for r in groups]


def example_rows(examples: list[Example]) -> list[dict]:
    """What an environment's reset(row) receives: the example's fields."""
    return [asdict(ex) for ex in examples]


def tool_metrics(episodes: Episodes, policy_tokens: list[int]) -> dict[str, float]:
    """Per sampled episode: turns, tool calls, the share that called a tool at all, tool errors
    and failures (counts), and the tools' share of the completion tokens."""
    n, tool = max(len(episodes.turns), 1), sum(episodes.tool_tokens)
    return {"tool/turns_mean": sum(episodes.turns) / n, "tool/calls_mean": sum(episodes.tool_calls) / n,
            "tool/call_rate": sum(c > 0 for c in episodes.tool_calls) / n,
            "tool/errors": float(sum(episodes.tool_errors)), "tool/failures": float(sum(bool(f) for f in episodes.failures)),
            "tool/tokens_frac": tool / max(tool + sum(policy_tokens), 1)}


def reward_metrics(reward_fns: dict[str, Callable], texts: list[str], rewards_N: list[float],
                   per_fn: dict[str, list[float]], errors: dict[str, int]) -> dict[str, float]:
    """Means over every sampled completion, and per answer-parsing reward (one with a `parse`
    attribute, like gsm8k_correct) the fraction of completions with no answer at all."""
    out = {"reward/total_mean": sum(rewards_N) / max(len(rewards_N), 1)}
    for name, scores in per_fn.items():
        finite = [s for s in scores if s == s]
        out[f"reward/{name}"] = sum(finite) / max(len(finite), 1)
        parse = getattr(reward_fns[name], "parse", None)
        if parse is not None:
            out[f"reward/{name}_unparsed"] = sum(parse(t) is None for t in texts) / max(len(texts), 1)
        if errors.get(name):
            out[f"reward_errors/{name}"] = errors[name]
    return out


def sample_step(cfg: Config, sampler: PromptSampler, tokenizer, generate: Callable[[list[str], SamplingSpec], Generation],
                reward_fns: dict[str, Callable], reward_weights: dict[str, float], spec: SamplingSpec,
                step: int) -> Rollouts:
    """The step's prompts_per_step groups, resampled for signal under grpo.dynamic_sampling."""
    g, G, P = cfg.grpo, cfg.grpo.group_size, cfg.grpo.prompts_per_step
    kept, spare = [], []  # (example, prompt, generation of one group, its rewards)
    texts, all_rewards, per_fn_all, errors_all, over_all = [], [], {}, {}, []
    episodes_all, policy_tokens = [], []
    drawn = rounds = tokens = signal = 0
    seconds = 0.0
    while True:
        if rounds == 0:
            n = P
        else:  # as many as the keep rate so far says are missing, within bounds
            rate = max(len(kept) / drawn, 1 / MAX_OVERSAMPLE)
            n = min(math.ceil((P - len(kept)) / rate), MAX_OVERSAMPLE * P)
        examples = sampler.next(n)
        prompts = [build_prompt(tokenizer, ex.question, cfg.data) for ex in examples]
        spec.seed = cfg.run.seed * 1_000_003 + step + SEED_STRIDE * rounds
        gen = generate(prompts, spec, example_rows(examples)) if spec.environment else generate(prompts, spec)
        rewards_N, per_fn, errors, over = score(cfg, reward_fns, reward_weights, examples, prompts, gen)
        rounds, drawn, tokens, seconds = rounds + 1, drawn + n, tokens + gen.num_tokens, seconds + gen.seconds
        texts += gen.texts
        episodes_all += [gen.episodes] if gen.episodes else []
        policy_tokens += gen.policy_tokens()
        all_rewards += rewards_N
        over_all.append((len(rewards_N), over))
        for name, scores in per_fn.items():
            per_fn_all[name] = per_fn_all.get(name, []) + scores
        for name, count in errors.items():
            errors_all[name] = errors_all.get(name, 0) + count
        for j, varies in enumerate(varied_groups(rewards_N, G)):
            group = (examples[j], prompts[j], _slice(gen, j, G), rewards_N[j * G:(j + 1) * G])
            (kept if varies or not g.dynamic_sampling else spare).append(group)
            signal += varies
        if not g.dynamic_sampling or len(kept) >= P or rounds >= g.max_sampling_rounds:
            break
    chosen = (kept + spare)[:P]
    out = Rollouts([c[0] for c in chosen], [c[1] for c in chosen], Generation.concat([c[2] for c in chosen]),
                   [r for c in chosen for r in c[3]])
    out.gen.seconds = seconds
    m = reward_metrics(reward_fns, texts, all_rewards, per_fn_all, errors_all)
    if episodes_all:  # every sampled episode, as the reward means
        m.update(tool_metrics(Episodes.concat(episodes_all), policy_tokens))
    total = sum(n for n, _ in over_all)
    m["completion/overlong_frac"] = sum(n * o["overlong_frac"] for n, o in over_all) / max(total, 1)
    m["sampling/prompts_drawn"] = float(drawn)
    m["sampling/rounds"] = float(rounds)
    m["sampling/groups_with_signal"] = float(min(signal, P))
    m["sampling/groups_short"] = float(max(P - signal, 0)) if g.dynamic_sampling else 0.0
    m["sampling/tokens_generated"] = float(tokens)
    out.metrics = m
    return out


def _slice(gen: Generation, j: int, G: int) -> Generation:
    """Group j of a prompt-major generation."""
    s = slice(j * G, (j + 1) * G)
    return Generation([gen.prompt_ids[j]], gen.completion_ids[s], gen.logprobs[s], gen.texts[s],
                      gen.truncated[s], gen.seconds, gen.loss_masks[s],
                      gen.episodes.select(list(range(j * G, (j + 1) * G))) if gen.episodes else None,
                      gen.policy_versions[s])
