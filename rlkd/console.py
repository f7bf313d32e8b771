"""What rlkd writes to the terminal, written so that it never takes the run down with it."""

from __future__ import annotations

import os
import sys


def say(message: str) -> None:
    """Print to stderr, and never fail: after Ctrl-C through `| tee` the pipe is gone too, and
    a failed write must not stop the checkpoint that follows it."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError, ValueError):
        silence(sys.stderr)


def silence(stream) -> None:
    """Point a stream whose reader is gone at /dev/null, so the interpreter's last flush of
    what it still buffers does not fail the exit (Python's advice for broken pipes)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError):
        pass


def close_quietly(bar) -> None:
    """Close a progress bar whose terminal may be gone (Ctrl-C through a pipe): its last
    redraw must not replace the exception being handled."""
    try:
        bar.close()
    except (BrokenPipeError, OSError, ValueError):
        silence(sys.stderr)
