"""Multi-turn episodes with the real tokenizer and the real calculator sandbox; the policy is a
script of turns (given as token ids, as a sampler returns them), since what is under test is
the episode loop, not a model. The reference for every transcript is built independently:
the scripted turns' ids and each response tokenized on its own, concatenated by hand."""

import pytest
from transformers import AutoTokenizer

from environments import load_environment, tools_of
from rlkd.episodes import run_episodes
from rlkd.models import resolve_model
from rlkd.tool_calls import render_call, render_response
from rlkd.tool_sandbox import ToolSandbox


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


@pytest.fixture
def calc():
    sandbox = ToolSandbox("calculator", timeout_s=5.0)
    yield sandbox
    sandbox.close()


TOOLS = {name: list(t.params) for name, t in tools_of(load_environment("calculator")).items()}


class Script:
    """A policy that plays fixed turns per episode; records every context it was given."""

    def __init__(self, turns_per_episode):
        self.turns = [list(t) for t in turns_per_episode]
        self.seen: list[list[list[int]]] = []

    def __call__(self, indices, prompts_ids, budgets):
        self.seen.append([list(p) for p in prompts_ids])
        out = []
        for index, p, budget in zip(indices, prompts_ids, budgets, strict=True):
            e = next(i for i, start in enumerate(self.starts) if p[:len(start)] == start)
            assert e == index  # the sampler is told which episode each context is
            ids = self.turns[e].pop(0)[:budget]
            out.append((ids, [-0.5] * len(ids)))
        return out


def char_ids(tok, text):
    """`text` as one token per character: a sampling no re-tokenization would reproduce."""
    return [tok.convert_tokens_to_ids(tok.tokenize(ch)[0]) for ch in text]


def test_the_transcript_is_the_sampled_tokens_and_the_responses_never_retokenized(tok, calc):
    call = render_call("calculate", expression="48 / 2")
    turn1 = char_ids(tok, "Half of 48: ") + tok.encode(call, add_special_tokens=False)
    turn2 = tok.encode("So she has 24.\n#### 24", add_special_tokens=False) + [tok.eos_token_id]
    prompt = tok.encode("Q: half of 48?", add_special_tokens=False)
    script = Script([[turn1, turn2]])
    script.starts = [prompt]
    [ep] = run_episodes(script, tok, [prompt], [{}], calc, TOOLS, max_turns=4, max_tokens=200)
    response = tok.encode(render_response("24"), add_special_tokens=False)
    assert ep.completion_ids == turn1 + response + turn2
    assert ep.loss_mask == [1] * len(turn1) + [0] * len(response) + [1] * len(turn2)
    assert ep.logprobs == [-0.5] * len(turn1) + [0.0] * len(response) + [-0.5] * len(turn2)
    # The second turn was generated from exactly those tokens, not from a re-encoded transcript.
    assert script.seen[1][0] == prompt + turn1 + response
    assert tok.encode(tok.decode(turn1), add_special_tokens=False) != turn1  # re-tokenizing would change it
    assert (ep.turns, ep.tool_calls, ep.tool_errors, ep.failure, ep.truncated) == (2, 1, 0, "", False)
    assert (ep.policy_tokens, ep.tool_tokens) == (len(turn1) + len(turn2), len(response))


def test_a_last_token_past_the_stop_string_is_not_written_twice(tok, calc):
    # SmolLM2 merges "><": a policy that ends its call the way the demonstrations tokenize
    # samples "</tool_call><" in its last token, which already holds the response's "<".
    call = render_call("calculate", expression="48 / 2")
    turn1 = tok.encode(call + "<", add_special_tokens=False)
    assert tok.decode(turn1[-1:]) == "><"
    turn2 = tok.encode("48 / 2 = 24\n#### 24", add_special_tokens=False) + [tok.eos_token_id]
    prompt = tok.encode("Q: half of 48?", add_special_tokens=False)
    script = Script([[turn1, turn2]])
    script.starts = [prompt]
    [ep] = run_episodes(script, tok, [prompt], [{}], calc, TOOLS, max_turns=4, max_tokens=200)
    response = tok.encode(render_response("24")[1:], add_special_tokens=False)
    assert ep.completion_ids == turn1 + response + turn2  # the sampled ids untouched
    assert ep.loss_mask == [1] * len(turn1) + [0] * len(response) + [1] * len(turn2)
    text = tok.decode(ep.completion_ids, skip_special_tokens=True)
    assert text == call + render_response("24") + "48 / 2 = 24\n#### 24"


def test_policy_mistakes_are_answered_and_the_episode_goes_on(tok, calc):
    bad = [tok.encode("<tool_call>{not json}</tool_call>", add_special_tokens=False),
           tok.encode(render_call("multiply", a="2"), add_special_tokens=False),
           tok.encode(render_call("calculate", expr="2*3"), add_special_tokens=False),
           tok.encode(render_call("calculate", expression="2**3"), add_special_tokens=False),
           tok.encode("#### 8", add_special_tokens=False) + [tok.eos_token_id]]
    prompt = tok.encode("Q: 2 cubed?", add_special_tokens=False)
    script = Script([bad])
    script.starts = [prompt]
    [ep] = run_episodes(script, tok, [prompt], [{}], calc, TOOLS, max_turns=8, max_tokens=400)
    text = tok.decode(ep.completion_ids)
    assert (ep.turns, ep.tool_calls, ep.tool_errors, ep.failure) == (5, 4, 4, "")
    for why in ("call is not JSON", "no tool 'multiply'", "calculate takes expression", "error: equation '2**3'"):
        assert why in text, why


def test_budget_turns_and_a_failing_tool_end_episodes_and_batch_together(tok, tmp_path):
    env = tmp_path / "env.py"
    env.write_text("class Bad:\n    def reset(self, row): pass\n"
                   "    def crash(self) -> str:\n        'Raises.'\n        raise RuntimeError('tool bug')\n")
    sandbox = ToolSandbox(f"{env}:Bad", timeout_s=5.0)
    try:
        prompts = [tok.encode(f"Q{i}", add_special_tokens=False) for i in range(3)]
        crash = tok.encode(render_call("crash"), add_special_tokens=False)
        script = Script([[crash, crash], [tok.encode("x " * 50, add_special_tokens=False)], [crash] * 5])
        script.starts = prompts
        eps = run_episodes(script, tok, prompts, [{}, {}, {}], sandbox, {"crash": []}, max_turns=2, max_tokens=30)
    finally:
        sandbox.close()
    assert eps[0].failure == "crash raised RuntimeError: tool bug" and eps[0].turns == 1
    assert eps[1].truncated and len(eps[1].completion_ids) == 30 and eps[1].failure == ""
    assert eps[2].failure and eps[2].turns == 1
    assert [len(batch) for batch in script.seen] == [3]  # every episode ended after one batched turn
