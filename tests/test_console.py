"""Tests for rlkd.console: with run.quiet the terminal gets rlkd's lines, the log the rest."""

import subprocess
import sys

from conftest import REPO_ROOT

# Writes the way each kind of library output is written: Python print and logging, a C write
# to fd 2, a child process; then rlkd's own lines and a failing task's traceback.
SCRIPT = """
import logging, os, subprocess, sys
from rlkd import train

def task(cfg, run_dir):
    from rlkd.console import out, say
    print("library print")
    logging.getLogger("lib").warning("library logging")
    os.write(2, b"C-level warning\\n")
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    say("rlkd says")
    logging.getLogger("rlkd.data").warning("skipped 2 bad rows")
    out("rlkd result")
    raise RuntimeError("boom\\nsecond line")

train.TASKS[train.Task.eval] = task
train.main(["recipe=eval_gsm8k", "run.dir=" + sys.argv[1], "run.quiet=" + sys.argv[2]])
"""
LIBRARY = ["library print", "library logging", "C-level warning", "child process"]


def _run(tmp_path, quiet):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), quiet], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)


def test_quiet_run_keeps_the_terminal_to_rlkd_lines(tmp_path):
    proc = _run(tmp_path, "true")
    log = tmp_path / "logs" / "run.log"
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"rlkd: eval run in {tmp_path} (library output: {log})", "rlkd result"]
    assert proc.stderr.splitlines() == [
        "rlkd says", "rlkd: skipped 2 bad rows", f"rlkd: error: RuntimeError: boom (traceback in {log})"
    ], proc.stderr
    text = log.read_text()
    assert all(line in text for line in LIBRARY), text
    assert "Traceback (most recent call last)" in text and "second line" in text
    assert "rlkd says\n" in text and "rlkd result\n" in text  # the log tells the whole story


def test_verbose_run_prints_everything_and_the_traceback(tmp_path):
    proc = _run(tmp_path, "false")
    both = proc.stdout + proc.stderr
    assert proc.returncode == 1 and all(line in both for line in LIBRARY)
    assert "Traceback (most recent call last)" in proc.stderr and not (tmp_path / "logs").exists()


# Ctrl-C through `| tee` ends tee as well: a bar drawn after it must not end the run.
TEE_SCRIPT = """
import sys, time
from tqdm import tqdm
from rlkd import train

def task(cfg, run_dir):
    from rlkd.console import say, terminal
    bar = tqdm(total=100, file=terminal(), mininterval=0)
    say("ready")
    for _ in range(100):
        bar.update(1)
        time.sleep(0.02)
    bar.close()
    (run_dir / "survived").write_text("")
    raise KeyboardInterrupt

train.TASKS[train.Task.eval] = task
train.main(["recipe=eval_gsm8k", "run.dir=" + sys.argv[1]], restore_output=False)
"""


def test_progress_bars_outlive_a_terminal_pipe_that_closed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", TEE_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    seen = b""
    while b"ready" not in seen:
        chunk = proc.stdout.read1(4096)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    proc.stdout.close()  # the reader is gone, as tee is after Ctrl-C
    assert proc.wait(timeout=120) == 130
    log = (tmp_path / "logs" / "run.log").read_text()
    assert (tmp_path / "survived").exists(), log
    assert "Traceback" not in log and "BrokenPipeError" not in log, log
    assert "rlkd: interrupted; the eval run" in log


# A run a script starts in the background inherits SIGINT ignored; `kill -INT` must still stop it.
IGNORED_SCRIPT = """
import os, signal, sys, time
from rlkd import train

def task(cfg, run_dir):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    (run_dir / "ignored").write_text("")

train.TASKS[train.Task.eval] = task
signal.signal(signal.SIGINT, signal.SIG_IGN)
train.main(["recipe=eval_gsm8k", "run.dir=" + sys.argv[1]], restore_output=False)
"""


def test_sigint_stops_a_run_started_with_sigint_ignored(tmp_path):
    proc = subprocess.run([sys.executable, "-c", IGNORED_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert not (tmp_path / "ignored").exists()
    assert "rlkd: interrupted; the eval run" in proc.stdout + proc.stderr
