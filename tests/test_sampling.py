"""Dynamic sampling, the overlong penalty and the signal guardrails (no actors: the generator is
a scripted stand-in for vLLM, which is not what these tests are about)."""

import pytest
import torch
from test_data import tiny_tokenizer

from rewards import RewardError, load_reward
from rlkd.actors.recovery import SignalGuard
from rlkd.compose import load_config
from rlkd.data import PromptSampler, split_held_out
from rlkd.errors import ConfigError, InputError
from rlkd.losses import overlong_penalty
from rlkd.sampling import SEED_STRIDE, sample_step, varied_groups
from rlkd.types import EnvironmentSpec, Episodes, Example, Generation, SamplingSpec

G = 4


def examples(n: int) -> list[Example]:
    # Questions q0..q{n-1}; answer i. Groups of questions divisible by 3 get mixed answers.
    return [Example(f"t:{i}", f"q{i}", str(i), f"r #### {i}") for i in range(n)]


class ScriptedSampler:
    """Per prompt, G completions: for q divisible by 3 half right and half wrong (reward
    variance), else all wrong, or all with no number at all for odd q (unparsed)."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts: list[str], spec: SamplingSpec) -> Generation:
        self.calls.append((len(prompts), spec.seed))
        texts = []
        for p in prompts:
            q = int(p.rsplit("q", 1)[1].split()[0])
            if q % 3 == 0:
                texts += [f"so #### {q}", "so #### -1"] * (G // 2)
            else:
                texts += ["no idea"] * G if q % 2 else ["so #### -1"] * G
        comps = [[5] * (10 if "no" in t else 3) for t in texts]
        return Generation([[1, 2]] * len(prompts), comps, [[-0.1] * len(c) for c in comps], texts,
                          [len(c) >= 10 for c in comps], seconds=1.0)


def run(overrides, n_examples=30, step=1):
    cfg = load_config(None, [f"grpo.group_size={G}", "rollout.max_new_tokens=10",
                                     "data.instruction=", *overrides])
    fns = {"gsm8k_correct": load_reward("gsm8k_correct")}
    sampler = PromptSampler(examples(n_examples), seed=0)
    gen = ScriptedSampler()
    out = sample_step(cfg, sampler, tiny_tokenizer(None), gen, fns, {"gsm8k_correct": 1.0},
                      SamplingSpec(n=G), step)
    return cfg, sampler, gen, out


def test_without_dynamic_sampling_one_round_trains_every_group():
    cfg, sampler, gen, out = run(["grpo.prompts_per_step=4"])
    assert len(gen.calls) == 1 and gen.calls[0] == (4, cfg.run.seed * 1_000_003 + 1)
    order = PromptSampler(examples(30), seed=0).next(4)
    assert [ex.id for ex in out.examples] == [ex.id for ex in order]
    assert out.metrics["sampling/rounds"] == 1 and out.metrics["sampling/groups_short"] == 0
    expected_signal = sum(int(ex.answer) % 3 == 0 for ex in order)
    assert out.metrics["sampling/groups_with_signal"] == expected_signal


def test_dynamic_sampling_keeps_only_varied_groups_in_draw_order():
    cfg, sampler, gen, out = run(["grpo.prompts_per_step=3", "grpo.dynamic_sampling=true",
                                  "grpo.max_sampling_rounds=8"])
    stream = PromptSampler(examples(30), seed=0)
    drawn = stream.next(int(out.metrics["sampling/prompts_drawn"]))
    # The kept groups are the first three varied prompts of the stream the sampler drew.
    assert [ex.id for ex in out.examples] == [ex.id for ex in drawn if int(ex.answer) % 3 == 0][:3]
    assert all(varied_groups(out.rewards_N, G)) and len(out.rewards_N) == 3 * G
    assert out.metrics["sampling/groups_with_signal"] == 3 and out.metrics["sampling/groups_short"] == 0
    assert sampler.state_dict() == stream.state_dict()  # resume replays the extra draws
    seeds = [s for _, s in gen.calls]
    assert seeds == [cfg.run.seed * 1_000_003 + 1 + SEED_STRIDE * r for r in range(len(seeds))]
    # Later rounds draw what the keep rate so far says is missing, at most 4x prompts_per_step.
    assert all(n <= 12 for n, _ in gen.calls[1:])
    # Rewards are logged over every sampled completion, not only the kept ones.
    texts_total = sum(n for n, _ in gen.calls) * G
    assert out.metrics["reward/gsm8k_correct"] < 0.5 and texts_total > len(out.rewards_N)


def test_dynamic_sampling_out_of_rounds_fills_with_zero_signal_groups_and_says_so():
    _, _, gen, out = run(["grpo.prompts_per_step=4", "grpo.dynamic_sampling=true",
                          "grpo.max_sampling_rounds=1"])
    assert len(gen.calls) == 1 and len(out.examples) == 4
    signal = out.metrics["sampling/groups_with_signal"]
    assert out.metrics["sampling/groups_short"] == 4 - signal
    assert sum(varied_groups(out.rewards_N, G)) == signal  # varied groups come first
    assert all(varied_groups(out.rewards_N, G)[:int(signal)])


def test_unparsed_fraction_counts_completions_without_any_answer():
    _, _, _, out = run(["grpo.prompts_per_step=6"])
    # Odd questions not divisible by 3 answer "no idea" (no number): unparsed, not just wrong.
    qs = [int(ex.answer) for ex in out.examples]
    expected = sum(q % 2 == 1 and q % 3 != 0 for q in qs) / len(qs)
    assert out.metrics["reward/gsm8k_correct_unparsed"] == pytest.approx(expected)


def test_overlong_penalty_and_mask_modes():
    # "no idea" completions are 10 tokens = the cap: truncated.
    _, _, _, plain = run(["grpo.prompts_per_step=6"])
    _, _, _, pen = run(["grpo.prompts_per_step=6", "grpo.overlong=penalty", "grpo.overlong_buffer=4",
                        "grpo.overlong_penalty=0.5"])
    for a, b, cut in zip(plain.rewards_N, pen.rewards_N, plain.gen.truncated, strict=True):
        assert b == pytest.approx(a - 0.5 if cut else a)
    assert pen.metrics["completion/overlong_frac"] == pytest.approx(sum(plain.gen.truncated) / len(plain.gen.truncated))


def test_overlong_penalty_matches_dapo_formula():
    max_len, buffer = 20, 5
    lengths = torch.arange(0, 25)
    out, metrics = overlong_penalty(lengths, max_len, buffer, penalty=2.0)
    for L, v in zip(lengths.tolist(), out.tolist(), strict=True):
        expected = 0.0 if L <= max_len - buffer else (
            2.0 * (max_len - buffer - L) / buffer if L <= max_len else -2.0)
        assert v == pytest.approx(max(expected, -2.0))
    assert metrics["overlong_frac"] == pytest.approx(sum(L > 15 for L in lengths.tolist()) / 25)
    zero, _ = overlong_penalty(torch.tensor([19, 20]), max_len, 0)
    assert zero.tolist() == [0.0, -1.0]
    empty, m = overlong_penalty(torch.zeros(0), max_len, buffer)
    assert empty.numel() == 0 and m["overlong_frac"] == 0.0


def guard(**over):
    cfg = load_config(None, [f"trainer.{k}={v}" for k, v in over.items()])
    return SignalGuard(cfg.trainer, {"gsm8k_correct": None, "format_answer_line": None})


def test_zero_signal_guard_stops_after_consecutive_steps_naming_the_rewards():
    g = guard(max_zero_signal_steps=3)
    flat = {"adv/frac_zero_std_groups": 1.0, "reward/gsm8k_correct": 0.0, "reward/format_answer_line": 0.0,
            "reward/gsm8k_correct_unparsed": 0.85}
    assert g.check(1, flat) is None and g.check(2, flat) is None
    assert g.check(3, {**flat, "adv/frac_zero_std_groups": 0.5}) is None  # the count restarts
    assert g.check(4, flat) is None and g.check(5, flat) is None
    msg = g.check(6, flat)
    assert msg and "3 consecutive steps" in msg and "gsm8k_correct mean 0.000" in msg
    assert "no answer parsed in 85%" in msg and "format_answer_line mean 0.000" in msg and "\n" not in msg
    off = guard(max_zero_signal_steps=0)
    assert all(off.check(s, flat) is None for s in range(50))


def test_logp_mismatch_guard():
    g = guard(max_logp_mismatch=0.3, logp_mismatch_steps=2)
    assert g.check(1, {"train/logp_mismatch": 0.9}) is None
    assert g.check(2, {"train/logp_mismatch": 0.1}) is None
    assert g.check(3, {"train/logp_mismatch": 0.9}) is None
    msg = g.check(4, {"train/logp_mismatch": 0.8})
    assert msg and "logp_mismatch=0.8" in msg and "weights that did not arrive" in msg


def test_held_out_slice_is_the_tail_and_never_trained_on():
    cfg = load_config(None, ["data.held_out=5"])
    train, held = split_held_out(cfg.data, examples(20))
    assert [e.id for e in held] == [f"t:{i}" for i in range(15, 20)] and len(train) == 15
    assert not {e.id for e in train} & {e.id for e in held}
    with pytest.raises(InputError, match="data.held_out=20 leaves nothing"):
        split_held_out(load_config(None, ["data.held_out=20"]).data, examples(20))


@pytest.mark.parametrize("override,message", [
    ("grpo.max_sampling_rounds=0", "grpo.max_sampling_rounds=0 must be >= 1"),
    ("trainer.max_zero_signal_steps=-1", "trainer.max_zero_signal_steps=-1 must be >= 0"),
    ("grpo.overlong=penalty grpo.overlong_buffer=500", "grpo.overlong_buffer=500 exceeds rollout.max_new_tokens=128"),
    ("grpo.overlong=cut", "grpo.overlong"),
    ("data.held_out=-3", "data.held_out=-3 must be >= 0"),
])
def test_bad_sampling_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, override.split())


def test_rewards_see_each_completion_truncation_and_length():
    seen = {}

    def spy(completions, truncated, completion_tokens, **_):
        seen.update(texts=list(completions), truncated=list(truncated), tokens=list(completion_tokens))
        return [0.0] * len(completions)

    cfg = load_config(None, [f"grpo.group_size={G}", "grpo.prompts_per_step=8", "data.instruction="])
    gen = ScriptedSampler()
    sample_step(cfg, PromptSampler(examples(30), seed=0), tiny_tokenizer(None), gen, {"spy": spy}, {"spy": 1.0},
                SamplingSpec(n=G), 1)
    # The scripted sampler gives "no idea" 10 tokens (cut at the cap) and the others 3.
    assert 0 < sum(seen["truncated"]) < len(seen["texts"])
    assert seen["truncated"] == [t == "no idea" for t in seen["texts"]]
    assert seen["tokens"] == [10 if t == "no idea" else 3 for t in seen["texts"]]


class EpisodeSampler:
    """Multi-turn generations: per prompt, G episodes; episode i of a group called the tool i
    times (3 tool tokens each), the last one's tool failed; every answer is right."""

    def __init__(self):
        self.rows = []

    def __call__(self, prompts: list[str], spec: SamplingSpec, rows: list[dict]) -> Generation:
        assert spec.environment is not None
        self.rows += rows
        comps, masks, eps = [], [], Episodes()
        assert len(rows) == len(prompts)
        for _ in prompts:
            for i in range(G):
                comps.append([5] * (2 + 3 * i))
                masks.append([1, 1] + [0, 0, 0] * i)
                eps.turns.append(i + 1)
                eps.tool_calls.append(i)
                eps.tool_errors.append(int(i == 2))
                eps.failures.append("calculate timed out after 5 s" if i == G - 1 else "")
                eps.tool_tokens.append(3 * i)
        texts = [f"#### {row['answer']}" for row in rows for _ in range(G)]
        return Generation([[1, 2]] * len(prompts), comps, [[-0.1] * len(c) for c in comps], texts,
                          [False] * len(comps), 1.0, masks, eps)


def episode_step(on_error):
    seen = {}

    def spy(completions, completion_tokens, **_):
        seen["tokens"] = list(completion_tokens)
        return [1.0] * len(completions)

    cfg = load_config(None, [f"grpo.group_size={G}", "grpo.prompts_per_step=2", "data.instruction=",
                             "rollout.environment=calculator", *([f"rewards.on_error={on_error}"] if on_error else [])])
    gen = EpisodeSampler()
    env = EnvironmentSpec("calculator", 3, 5.0, {"calculate": ["expression"]})
    out = sample_step(cfg, PromptSampler(examples(30), seed=0), tiny_tokenizer(None), gen, {"spy": spy},
                      {"spy": 1.0}, SamplingSpec(n=G, environment=env), 1)
    return out, gen, seen


def test_episodes_get_their_rows_tool_metrics_and_failed_episodes_score_zero():
    out, gen, seen = episode_step("zero")
    assert [r["id"] for r in gen.rows] == [ex.id for ex in out.examples]  # reset(row) gets the example
    assert {"id", "question", "answer", "rationale"} <= gen.rows[0].keys()
    assert out.rewards_N == [1.0, 1.0, 1.0, 0.0] * 2  # the failed episode scores 0, the rest as rewarded
    assert seen["tokens"] == [2] * 8  # length columns count the policy's tokens only
    m = out.metrics
    assert m["tool/calls_mean"] == pytest.approx(1.5) and m["tool/call_rate"] == pytest.approx(0.75)
    assert m["tool/turns_mean"] == pytest.approx(2.5) and m["tool/failures"] == 2 and m["tool/errors"] == 2
    assert m["tool/tokens_frac"] == pytest.approx(36 / (36 + 16))
    assert out.gen.loss_masks[1] == [1, 1, 0, 0, 0] and out.gen.episodes.tool_calls == [0, 1, 2, 3] * 2


def test_a_tool_failure_stops_the_run_under_on_error_raise():
    with pytest.raises(RewardError, match="environment 'calculator': calculate timed out after 5 s"):
        episode_step(None)  # the default, rewards.on_error=raise
