"""Chunks of a long generation (teacher samples, eval predictions) kept as each one finishes, so
that a Ctrl-C or a crash loses only the chunk in flight and `trainer.resume=auto` continues.

A journal is one JSONL file: a header line with the run's fingerprint (what decides its outputs:
model, data, sampling, seeds), then one line per finished chunk, `{"chunk": i, "rows": [...],
"seconds": s}` (s: the chunk's generation time, for throughput figures).
Each line goes out in one `os.write` of a whole line, so an interrupt lands before or after it,
never inside; a crash can still cut the last line short, and a reader skips a last line that does
not parse. Chunks are deterministic in their index (their seeds depend on it), so a resumed run
regenerates exactly the chunks that are missing. A resume whose fingerprint differs is a one-line
error naming the key that changed, not a silent mix of two runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlkd.console import say
from rlkd.errors import InputError, Interrupted


class Journal:
    """Finished chunks by index; `add` appends one, `get` returns one as (rows, seconds), or None."""

    def __init__(self, path: Path, fingerprint: dict, *, resume: bool):
        self.path, self.chunks = path, {}
        header = json.dumps({"journal": fingerprint}, sort_keys=True)
        if resume and path.is_file():
            self.chunks = _read(path, fingerprint)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "\n")

    def get(self, chunk: int) -> tuple[list[dict], float] | None:
        return self.chunks.get(chunk)

    def add(self, chunk: int, rows: list[dict], seconds: float = 0.0) -> None:
        line = (json.dumps({"chunk": chunk, "rows": rows, "seconds": seconds}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.chunks[chunk] = (rows, seconds)

    @property
    def rows_done(self) -> int:
        return sum(len(rows) for rows, _ in self.chunks.values())


def _read(path: Path, fingerprint: dict) -> dict[int, tuple[list[dict], float]]:
    lines = path.read_text().splitlines()
    try:
        found = json.loads(lines[0])["journal"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        found = None
    if not isinstance(found, dict):
        raise InputError(f"trainer.resume=auto: {path} is not an rlkd journal (no header line)")
    changed = sorted(k for k in {*found, *fingerprint} if found.get(k) != fingerprint.get(k))
    if changed:
        k = changed[0]
        raise InputError(f"trainer.resume=auto: {path} was written with {k}={found.get(k)!r}, this "
                         f"run has {k}={fingerprint.get(k)!r}; resume with the same settings or use "
                         "a new run.dir")
    chunks = {}
    for n, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line)
            chunks[int(entry["chunk"])] = (list(entry["rows"]), float(entry["seconds"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if n == len(lines):  # a line a crash cut short: that chunk is generated again
                break
            raise InputError(f"{path}:{n}: not a journal line") from None
    return chunks


@contextmanager
def journaled(run_dir: Path, name: str, fingerprint: dict, resume: str, unit: str) -> Iterator[Journal]:
    """The journal of one long generation in `run_dir`: says what a resume found, turns Ctrl-C
    into the one line that names how to continue. The caller removes it once its results are written."""
    journal = Journal(run_dir / name, fingerprint, resume=resume == "auto")
    if journal.rows_done:
        say(f"rlkd: resuming: {journal.rows_done} {unit} already done ({journal.path})")
    try:
        yield journal
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted with {journal.rows_done} {unit} kept in {journal.path}; continue with the "
                          f"same command plus run.dir={run_dir} trainer.resume=auto") from None
