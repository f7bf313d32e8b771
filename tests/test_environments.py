"""Environments: the API checks, the calculator, the tool-call protocol, and the sandbox that
keeps a hostile tool to its own episode (real child processes, real hangs)."""

import json
import textwrap
import time

import pytest

from environments import REGISTRY, load_environment, tool_prompt, tools_of
from environments.calculator import Calculator
from rlkd.errors import InputError
from rlkd.tool_calls import BadToolCall, parse_call, render_call, render_response
from rlkd.tool_sandbox import ToolError, ToolSandbox

HOSTILE = textwrap.dedent('''
    import os, time

    class Hostile:
        def reset(self, row: dict):
            self.count = row.get("start", 0)
            return row.get("hint")

        def count_up(self, by: int) -> str:
            """Add `by` to a counter kept in the instance; returns the total."""
            self.count += by
            return str(self.count)

        def boom(self) -> str:
            """Raises."""
            raise ValueError("no such thing")

        def hang(self) -> str:
            """Never returns."""
            time.sleep(3600)

        def huge(self) -> str:
            """Ten megabytes."""
            return "x" * 10_000_000

        def die(self) -> str:
            """Kills its own process."""
            os._exit(3)
''')


@pytest.fixture
def hostile(tmp_path):
    path = tmp_path / "hostile_env.py"
    path.write_text(HOSTILE)
    sandbox = ToolSandbox(f"{path}:Hostile", timeout_s=1.0)
    yield sandbox
    sandbox.close()


def test_calculator_is_exact_and_refuses_anything_but_arithmetic():
    c = Calculator()
    assert [c.calculate(e) for e in ("48 / 2", "(3 + 4) * 12.5", "1,234 x 2", "7 / 4")] == ["24", "87.5", "2468", "1.75"]
    for bad in ("2**3", "__import__('os').system('true')", "1/0", "(" * 150 + "1" + ")" * 150, "", "a + 1"):
        assert c.calculate(bad).startswith("error:"), bad


def test_the_registry_and_a_user_file_load_with_their_tools(tmp_path):
    assert load_environment("calculator") is REGISTRY["calculator"]
    path = tmp_path / "hostile_env.py"
    path.write_text(HOSTILE)
    tools = tools_of(load_environment(f"{path}:Hostile"))
    assert list(tools) == ["boom", "count_up", "die", "hang", "huge"]
    assert tools["count_up"].params == {"by": "integer"} and tools["count_up"].doc.startswith("Add `by`")
    prompt = tool_prompt(Calculator)
    schema = json.loads(prompt.splitlines()[-1])
    assert schema["name"] == "calculate" and schema["parameters"] == {"expression": "string"}


@pytest.mark.parametrize("source, message", [
    ("class E:\n    def tool(self, x: str) -> str:\n        'doc'\n", r"has no reset\(self, row\) method"),
    ("class E:\n    def reset(self, row): pass\n", "E has no tool"),
    ("class E:\n    def reset(self, row): pass\n    def tool(self, x: str) -> str:\n        return x\n",
     "tool tool has no docstring"),
    ("class E:\n    def reset(self, row): pass\n    def tool(self, x) -> str:\n        'doc'\n",
     "tool tool's parameter x needs a type hint"),
    ("E = 3\n", "not a class"),
])
def test_a_bad_environment_is_one_line_naming_it(tmp_path, source, message):
    path = tmp_path / "env.py"
    path.write_text(source)
    with pytest.raises(InputError, match=message) as e:
        load_environment(f"{path}:E")
    assert str(e.value).startswith(f"environment '{path}:E': ") and "\n" not in str(e.value)


def test_unknown_environment_suggests_the_close_name():
    with pytest.raises(InputError, match=r"environment 'calculater': unknown name .*did you mean 'calculator'"):
        load_environment("calculater")


def test_tool_calls_round_trip_and_bad_calls_say_why():
    turn = "I need 48 / 2. " + render_call("calculate", expression="48 / 2")
    assert parse_call(turn).name == "calculate" and parse_call(turn).arguments == {"expression": "48 / 2"}
    assert render_response("24") == "<tool_response>24</tool_response>\n"
    for bad, why in [("<tool_call>{oops}</tool_call>", "not JSON"), ("no open</tool_call>", "without"),
                     ('<tool_call>{"arguments": {}}</tool_call>', "must be"),
                     ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "JSON object"),
                     ("<tool_call>" + "1" * 5000 + "</tool_call>", "longer than")]:
        with pytest.raises(BadToolCall, match=why):
            parse_call(bad)


def test_the_sandbox_answers_and_keeps_each_episode_apart(hostile):
    assert hostile.reset(0, {"start": 10, "hint": "count from 10"}) == "count from 10"
    assert hostile.reset(1, {}) == ""
    assert [hostile.call(0, "count_up", {"by": 5}), hostile.call(1, "count_up", {"by": 1})] == ["15", "1"]


def test_a_raising_tool_is_an_error_and_the_worker_lives_on(hostile):
    hostile.reset(0, {})
    with pytest.raises(ToolError, match=r"boom raised ValueError: no such thing"):
        hostile.call(0, "boom", {})
    assert hostile.call(0, "count_up", {"by": 2}) == "2" and hostile.restarts == 0


def test_a_huge_result_is_refused_in_the_worker(hostile):
    hostile.reset(0, {})
    with pytest.raises(ToolError, match=r"huge returned 10000000 characters, over 2000"):
        hostile.call(0, "huge", {})


@pytest.mark.parametrize("tool, why", [("hang", "timed out after 1 s"), ("die", "killed its worker")])
def test_a_hung_or_dying_tool_ends_its_episode_in_time_and_the_others_are_replayed(hostile, tool, why):
    hostile.reset(0, {"start": 100})
    hostile.reset(1, {})
    hostile.call(0, "count_up", {"by": 1})
    start = time.monotonic()
    with pytest.raises(ToolError, match=f"{tool} {why}"):
        hostile.call(1, tool, {})
    assert time.monotonic() - start < 5
    assert hostile.restarts == 1 and 1 not in hostile.episodes
    # Episode 0's instance was rebuilt from its row and its calls: the counter goes on from 101.
    assert hostile.call(0, "count_up", {"by": 1}) == "102"
