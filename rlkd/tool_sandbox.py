"""Environment instances in a child process: a tool is untrusted code.

A tool that raises, hangs or returns megabytes must end only its own episode, within a time
limit, with the error recorded, and the run must go on. In the rollout process itself none of
that is possible (a hung Python call cannot be stopped from another thread), so every instance
lives in one sandbox process and every call waits at most `timeout_s`:

    raises            -> ToolError("calculate raised ValueError: ...")    (worker lives on)
    over timeout_s    -> ToolError("calculate timed out after 5 s")       (worker killed, restarted)
    result too long   -> ToolError("calculate returned 10485760 characters, over 2000")
                         (measured in the worker, so the megabytes never cross the pipe)

After a restart the other live episodes get their instances back by replaying their reset and
their earlier calls, in order: environments are expected to be deterministic functions of
(row, calls), as TRL's are. The worker is started with `spawn`, never `fork`: the rollout
process runs vLLM's threads, and forking a threaded process can deadlock the child.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field

from rlkd.console import one_line
from rlkd.tool_calls import MAX_RESPONSE_CHARS

STARTUP_S = 60  # a fresh interpreter importing the environment module
DIED, TIMED_OUT = "died", "timed out"  # _answer's two ways of not answering
NO_ANSWER = (DIED, TIMED_OUT)


class ToolError(Exception):
    """A tool's own failure: it ends the episode and is counted, the run goes on."""


def _serve(spec: str, conn, max_chars: int) -> None:
    """The worker: holds one environment instance per episode and answers requests in order."""
    from environments import load_environment  # imported here: the worker is a fresh interpreter

    cls = load_environment(spec)
    envs: dict[int, object] = {}
    while True:
        try:
            op, episode, payload = conn.recv()
        except EOFError:
            return
        try:
            if op == "reset":
                envs[episode] = cls()
                out = envs[episode].reset(payload)
                out = "" if out is None else str(out)
            elif op == "call":
                name, arguments = payload
                out = getattr(envs[episode], name)(**arguments)
                out = "" if out is None else str(out)
            else:  # "end"
                envs.pop(episode, None)
                out = ""
            if len(out) > max_chars:
                conn.send(("error", f"returned {len(out)} characters, over {max_chars}"))
            else:
                conn.send(("ok", out))
        except Exception as e:  # the tool's own error, reported to the episode
            conn.send(("error", f"raised {one_line(e)}"))


@dataclass
class _Episode:
    row: dict
    calls: list[tuple[str, dict]] = field(default_factory=list)


class ToolSandbox:
    """Environment `spec`'s instances, one per episode, in a child process."""

    def __init__(self, spec: str, timeout_s: float = 5.0, max_chars: int = MAX_RESPONSE_CHARS):
        self.spec, self.timeout_s, self.max_chars = spec, timeout_s, max_chars
        self.episodes: dict[int, _Episode] = {}
        self.restarts = 0
        self._proc = self._conn = None

    def reset(self, episode: int, row: dict) -> str:
        """Start an episode; returns the text its reset appends to the question ("" if none)."""
        out = self._ask("reset", episode, row, "reset")
        self.episodes[episode] = _Episode(row)
        return out

    def call(self, episode: int, name: str, arguments: dict) -> str:
        """The tool's result as text, or ToolError; a call that succeeded joins the replay log."""
        out = self._ask("call", episode, (name, arguments), name)
        self.episodes[episode].calls.append((name, arguments))
        return out

    def end(self, episode: int) -> None:
        if self.episodes.pop(episode, None) is not None and self._alive():
            self._ask("end", episode, None, "end")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _ask(self, op: str, episode: int, payload, what: str) -> str:
        if not self._alive():
            self._restart()
        self._conn.send((op, episode, payload))
        answer = self._answer()
        if answer in NO_ANSWER:
            self.episodes.pop(episode, None)
            self._restart()
            raise ToolError(f"{what} {'killed its worker' if answer == DIED else f'timed out after {self.timeout_s:g} s'}")
        status, out = answer
        if status == "error":
            raise ToolError(f"{what} {out}")
        return out

    def _answer(self, timeout_s: float | None = None) -> tuple[str, str] | str:
        """The worker's answer, or DIED / TIMED_OUT."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while not self._conn.poll(0.01):
            if not self._proc.is_alive():
                return DIED
            if time.monotonic() > deadline:
                return TIMED_OUT
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            # Its end of the pipe closed: the worker is exiting, though is_alive() can still
            # say True until it is reaped (a window that load widens), so ask the pipe, not it.
            return DIED

    def _restart(self) -> None:
        """A fresh worker with every live episode replayed; one that no longer replays the same
        way (an error, a hang) ends too, and the worker starts over without it."""
        if self._proc is not None:
            self.restarts += 1
        while True:
            self.close()
            ctx = mp.get_context("spawn")
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_serve, args=(self.spec, child, self.max_chars), daemon=True)
            self._proc.start()
            child.close()
            self._conn.send(("end", -1, None))  # a no-op whose answer says the worker is up
            if self._answer(STARTUP_S) in NO_ANSWER:
                raise ToolError(f"environment {self.spec} did not start in {STARTUP_S} s")
            failed = next((e for e, state in self.episodes.items() if not self._replay(e, state)), None)
            if failed is None:
                return
            self.episodes.pop(failed)

    def _replay(self, episode: int, state: _Episode) -> bool:
        for op, payload in [("reset", state.row), *(("call", c) for c in state.calls)]:
            self._conn.send((op, episode, payload))
            answer = self._answer()
            if answer in NO_ANSWER or answer[0] == "error":
                return False
        return True
