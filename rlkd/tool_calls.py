"""The tool-call protocol between a policy's text and an environment: Hermes-style tags.

    <tool_call>{"name": "calculate", "arguments": {"expression": "48 / 2"}}</tool_call>
    <tool_response>24</tool_response>

the format TRL, Qwen and most open chat models use, so a model that has seen tools before
knows it. A turn ends when the policy writes TOOL_CALL_CLOSE (the sampler's stop string); what
follows the last TOOL_CALL_OPEN of that turn is parsed here. A response over
MAX_RESPONSE_CHARS is an error that ends the episode (rlkd/tool_sandbox.py), never a prompt of
megabytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
MAX_CALL_CHARS = 2000
MAX_RESPONSE_CHARS = 2000


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


class BadToolCall(ValueError):
    """The policy's call cannot be parsed or names no tool; answered to it as an error, not raised."""


def parse_call(turn_text: str) -> ToolCall:
    """The call a turn ends with: the JSON between its last TOOL_CALL_OPEN and TOOL_CALL_CLOSE."""
    body = turn_text.rsplit(TOOL_CALL_CLOSE, 1)[0]
    if TOOL_CALL_OPEN not in body:
        raise BadToolCall(f"{TOOL_CALL_CLOSE} without {TOOL_CALL_OPEN}")
    body = body.rsplit(TOOL_CALL_OPEN, 1)[1].strip()
    if len(body) > MAX_CALL_CHARS:
        raise BadToolCall(f"call longer than {MAX_CALL_CHARS} characters")
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        raise BadToolCall(f"call is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise BadToolCall('call must be {"name": ..., "arguments": {...}}')
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        raise BadToolCall("arguments must be a JSON object")
    return ToolCall(call["name"], arguments)


def render_call(name: str, **arguments) -> str:
    """A call as the policy should write it (for prompts, demonstrations and tests)."""
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{TOOL_CALL_CLOSE}"


def render_response(text: str) -> str:
    """What the environment appends after a call: the result, then a newline."""
    return f"{TOOL_RESPONSE_OPEN}{text}{TOOL_RESPONSE_CLOSE}\n"
