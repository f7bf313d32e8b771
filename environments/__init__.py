"""Environments: multi-turn episodes with tools, beside rewards.

An environment is a plain class, TRL's `environment_factory` shape:

    class MyEnv:
        def reset(self, row: dict) -> str | None: ...  # a new episode; text it returns is
                                                       # appended to the question
        def my_tool(self, x: str, n: int) -> str: ...  # every other public method is a tool,
                                                       # with a docstring (the model reads it)
                                                       # and type hints
        demonstrations = [(question, transcript)]      # optional: worked episodes, shown as
                                                       # earlier chat turns (data.fewshot)

Rewards stay what they are (functions over the final completion and the row's columns); an
environment only answers tool calls. It is named like a reward: a REGISTRY name, a dotted path
`pkg.module:Class` or a file `path/to/env.py:Class` (`rollout.environment`). Every instance
lives in a sandbox process (rlkd/tool_sandbox.py), one per episode, so a tool that raises,
hangs or returns megabytes ends only its episode, with the error recorded.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

from environments.calculator import Calculator
from rlkd.errors import InputError
from rlkd.plugins import resolve
from rlkd.tool_calls import render_call

REGISTRY: dict[str, type] = {"calculator": Calculator}
RESERVED = ("reset", "get_reward")  # methods of the API that are not tools
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    doc: str
    params: dict[str, str]
    """Parameter name -> JSON type, in signature order."""


def load_environment(spec: str) -> type:
    """The environment class `spec` names, with its tools checked (one-line InputError)."""
    cls = resolve(spec, "environment", REGISTRY)
    if not inspect.isclass(cls):
        raise InputError(f"environment '{spec}': not a class (got {type(cls).__name__})")
    if not callable(getattr(cls, "reset", None)):
        raise InputError(f"environment '{spec}': {cls.__name__} has no reset(self, row) method")
    tools_of(cls, spec)
    return cls


def tools_of(cls: type, spec: str = "") -> dict[str, Tool]:
    """Its public methods other than reset/get_reward, each with a docstring and typed params."""
    where = f"environment '{spec or cls.__name__}'"
    tools = {}
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        if name.startswith("_") or name in RESERVED:
            continue
        doc = inspect.getdoc(fn)
        if not doc:
            raise InputError(f"{where}: tool {name} has no docstring (the model reads it)")
        params = {}
        for p in list(inspect.signature(fn, eval_str=True).parameters.values())[1:]:
            if p.annotation not in JSON_TYPES:
                raise InputError(f"{where}: tool {name}'s parameter {p.name} needs a type hint "
                                 f"of {', '.join(t.__name__ for t in JSON_TYPES)}")
            params[p.name] = JSON_TYPES[p.annotation]
        tools[name] = Tool(name, doc, params)
    if not tools:
        raise InputError(f"{where}: {cls.__name__} has no tool (a public method besides reset)")
    return tools


def tool_prompt(cls: type) -> str:
    """The system-prompt text that tells the model its tools and how to call them."""
    lines = ["You can call tools. Write a call on its own as", "",
             render_call("NAME", **{"ARG": "VALUE"}), "",
             "and its result follows as <tool_response>...</tool_response>. Tools:"]
    for tool in tools_of(cls).values():
        schema = {"name": tool.name, "parameters": tool.params, "description": tool.doc.split("\n\n")[0]}
        lines.append(json.dumps(schema))
    return "\n".join(lines)
