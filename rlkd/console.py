"""What rlkd writes to the terminal, written so that it never takes the run down with it.

With `run.quiet` (the default) `capture` sends everything the libraries print, in this process
and in every process it starts (vLLM's engine, Ray's workers through the driver, C++ warnings),
to `<run dir>/logs/run.log`; the terminal keeps rlkd's own lines, warnings (the `rlkd.*`
loggers) and progress bars, which go through `say`, `out` and `terminal`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its actor names in error text

# The terminal's streams once `capture` has pointed fds 1 and 2 at the log; until then
# sys.stdout and sys.stderr (looked up at each write, so test captures see it).
_TERMINAL: dict[str, object] = {}


def terminal():
    """The terminal's stderr, for progress bars; its writes never raise (see `Unbreakable`)."""
    return Unbreakable(_TERMINAL.get("err", sys.stderr))


class Unbreakable:
    """A stream whose writes never fail. Ctrl-C through `| tee` ends tee too, and the next redraw
    of a progress bar would raise BrokenPipeError in the middle of a step's bookkeeping or its
    checkpoint; here the stream is silenced instead and the run goes on to its last line."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, OSError, ValueError):
            silence(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            silence(self._stream)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def say(message: str) -> None:
    """Print to the terminal's stderr, and never fail: after Ctrl-C through `| tee` the pipe is
    gone too, and a failed write must not stop the checkpoint that follows it."""
    _write(terminal(), message)


def out(message: str) -> None:
    """Print a result line (a table, a path) to the terminal's stdout; never fails either."""
    _write(_TERMINAL.get("out", sys.stdout), message)


def _write(stream, message: str) -> None:
    # Captured, the log gets rlkd's lines too, so that it tells the whole story (how a run
    # ended included) in order.
    for target in (stream, sys.stderr) if _TERMINAL else (stream,):
        try:
            print(message, file=target, flush=True)
        except (BrokenPipeError, OSError, ValueError):
            silence(target)


def one_line(e: BaseException) -> str:
    """An exception as one line: an actor's own error rather than Ray's wrapper around it (a
    RayTaskError's `cause`, read by attribute so that a config typo never waits for Ray)."""
    cause = getattr(e, "cause", None)
    e = cause if isinstance(cause, BaseException) else e
    lines = [line.strip() for line in ANSI.sub("", str(e)).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def capture(log: Path):
    """From now on, fds 1 and 2 (and so sys.stdout, sys.stderr and every child process) write to
    `log`; rlkd's own output keeps the terminal through duplicates of the original fds. Returns
    the function that puts everything back (for callers of `rlkd.train.main` in-process)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    _TERMINAL.update(out=os.fdopen(os.dup(1), "w", buffering=1, errors="replace"),
                     err=os.fdopen(os.dup(2), "w", buffering=1, errors="replace"))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # rlkd's own warnings (skipped data rows, a rollout restart) are for the user to see.
    handler = logging.StreamHandler(_TERMINAL["err"])
    handler.setFormatter(logging.Formatter("rlkd: %(message)s"))
    logging.getLogger("rlkd").addHandler(handler)

    def restore() -> None:
        logging.getLogger("rlkd").removeHandler(handler)
        for stream in (sys.stdout, sys.stderr, *_TERMINAL.values()):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, target in zip(saved, (1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        for stream in _TERMINAL.values():
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        _TERMINAL.clear()

    return restore


def captured() -> bool:
    """Is the library output going to a log (so that the terminal is rlkd's alone)?"""
    return bool(_TERMINAL)


def silence(stream) -> None:
    """Point a stream whose reader is gone at /dev/null, so the interpreter's last flush of
    what it still buffers does not fail the exit (Python's advice for broken pipes)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError):
        pass

