"""Multi-turn episodes, token in and token out.

    prompt -> [policy turn -> (tool call? -> tool response)]* -> final turn

The policy's tokens are kept exactly as the sampler produced them and the tool's response is
tokenized on its own and appended: the transcript is never re-tokenized. Re-tokenizing it each
turn, the commonest multi-turn bug (verl RFC #6719), changes the tokens the policy actually
sampled (a "4" "8" the model wrote can come back as one "48"), so the learner would score, and
push up, tokens nobody sampled. `loss_mask_T` is 1 on sampled tokens and 0 on tool tokens:
the loss, the importance ratios and the length statistics use only the 1s, and a tool token's
logprob is a 0.0 placeholder that nothing reads.

A turn ends at the sampler's stop string TOOL_CALL_CLOSE, at end of sequence, or at the
episode's token budget (model and tool tokens together, as both fill the context). A call the
policy gets wrong (not JSON, an unknown tool, wrong arguments) is answered with an `error:`
response, so the policy can learn from it; a tool's own failure (raises, hangs, returns
megabytes: rlkd/tool_sandbox.py) ends the episode, recorded in `failure`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rlkd.tool_calls import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    BadToolCall,
    parse_call,
    render_response,
)
from rlkd.tool_sandbox import ToolError, ToolSandbox

# generate(episode indices, their contexts' ids, max_tokens each) -> per context (token ids, their
# logprobs), a continuation that stopped at TOOL_CALL_CLOSE (included), at EOS or at max_tokens.
# The indices let the sampler give each episode its own seeded stream.
Generate = Callable[[list[int], list[list[int]], list[int]], list[tuple[list[int], list[float]]]]


@dataclass
class Episode:
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    """Every token after the prompt, the policy's and the tools', in order."""
    logprobs: list[float] = field(default_factory=list)
    """The sampler's logprob of each policy token; 0.0 on tool tokens."""
    loss_mask: list[int] = field(default_factory=list)
    """1 on tokens the policy sampled, 0 on tool tokens."""
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    """Calls answered with `error:` (the policy's mistake or the tool's error message)."""
    failure: str = ""
    """Why a tool ended the episode early, or ""."""
    truncated: bool = False
    """It used its whole token budget."""
    done: bool = False

    @property
    def policy_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def tool_tokens(self) -> int:
        return len(self.loss_mask) - self.policy_tokens


def run_episodes(generate: Generate, tokenizer, prompts_ids: list[list[int]], rows: list[dict],
                 sandbox: ToolSandbox, tools: dict[str, list[str]], max_turns: int,
                 max_tokens: int) -> list[Episode]:
    """Run one episode per prompt, all active ones batched into each turn's generate call.
    `tools` maps each tool's name to its parameter names (environments.tools_of)."""
    episodes = [Episode(list(p)) for p in prompts_ids]
    for i, row in enumerate(rows):
        try:
            intro = sandbox.reset(i, row)
        except ToolError as e:
            episodes[i].failure, episodes[i].done = f"reset: {e}", True
            continue
        if intro:  # the environment's text joins the prompt, not the completion
            episodes[i].prompt_ids += tokenizer.encode(intro, add_special_tokens=False)
    try:
        for _ in range(max_turns):
            active = [i for i, e in enumerate(episodes) if not e.done]
            if not active:
                break
            budgets = [max_tokens - len(episodes[i].completion_ids) for i in active]
            outs = generate(active, [episodes[i].prompt_ids + episodes[i].completion_ids for i in active], budgets)
            for i, budget, (ids, lps) in zip(active, budgets, outs, strict=True):
                _take_turn(episodes[i], i, ids, lps, budget, tokenizer, sandbox, tools, max_tokens)
        for e in episodes:
            e.done = True  # out of turns: what it wrote is its answer
    finally:
        for i in range(len(episodes)):
            sandbox.end(i)
    return episodes


def _take_turn(e: Episode, index: int, ids: list[int], lps: list[float], budget: int, tokenizer,
               sandbox: ToolSandbox, tools: dict[str, list[str]], max_tokens: int) -> None:
    e.turns += 1
    e.completion_ids += ids
    e.logprobs += lps
    e.loss_mask += [1] * len(ids)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    called = TOOL_CALL_CLOSE in text and TOOL_CALL_OPEN in text
    if len(ids) >= budget and not called:
        e.truncated = e.done = True
        return
    if not called:  # EOS: the final answer
        e.done = True
        return
    e.tool_calls += 1
    try:
        response = _call(text, index, sandbox, tools)
    except ToolError as err:
        e.failure, e.done = str(err), True
        return
    e.tool_errors += response.startswith("error:")
    response_ids = tokenizer.encode(_after_overshoot(text, render_response(response)), add_special_tokens=False)
    room = max_tokens - len(e.completion_ids)
    e.completion_ids += response_ids[:room]
    e.logprobs += [0.0] * len(response_ids[:room])
    e.loss_mask += [0] * len(response_ids[:room])
    if len(response_ids) >= room:  # no room left for the policy to read it and answer
        e.truncated = e.done = True


def _after_overshoot(turn_text: str, rendered: str) -> str:
    """The response without what the turn's last token already wrote past the stop string.

    A sampled token can run past TOOL_CALL_CLOSE: SmolLM2's tokenizer merges "><" (from
    `</tool_call><tool_response>` in the demonstrations), so the policy's last token is "><"
    and the sampled ids already hold the response's first "<". Appending the whole response
    would write "<<tool_response>" into every transcript (measured: 200 of 200 held-out
    episodes), a text no demonstration shows; the sampled ids stay as they are.
    """
    overshoot = turn_text[turn_text.rindex(TOOL_CALL_CLOSE) + len(TOOL_CALL_CLOSE):]
    return rendered[len(overshoot):] if overshoot and rendered.startswith(overshoot) else rendered


def _call(turn_text: str, index: int, sandbox: ToolSandbox, tools: dict[str, list[str]]) -> str:
    """The tool's answer to the turn's call; the policy's own mistakes come back as `error:`."""
    try:
        call = parse_call(turn_text[: turn_text.rindex(TOOL_CALL_CLOSE) + len(TOOL_CALL_CLOSE)])
    except BadToolCall as err:
        return f"error: {err}"
    if call.name not in tools:
        return f"error: no tool {call.name!r} (tools: {', '.join(tools)})"
    if set(call.arguments) != set(tools[call.name]):
        return f"error: {call.name} takes {', '.join(tools[call.name]) or 'no arguments'}"
    return sandbox.call(index, call.name, call.arguments)
