"""Helpers for end-to-end tests that kill a training run: start the CLI in its own session
with a tag in its environment, and find (and reap) every process that inherited the tag."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
from conftest import REPO_ROOT


def start_cli(args: list[str], log_path) -> tuple[subprocess.Popen, str]:
    tag = uuid.uuid4().hex
    env = dict(os.environ, RLKD_TEST_TAG=tag, PYTHONPATH=str(REPO_ROOT))
    log = open(log_path, "w")  # noqa: SIM115  (closed with the process by the caller's wait)
    proc = subprocess.Popen([sys.executable, "-m", "rlkd.train", *args], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, tag


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries `tag` (Ray workers and vLLM engines included)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RLKD_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def reap(tag: str, grace_s: float = 30.0) -> list[str]:
    """Wait up to `grace_s` for tagged processes to exit by themselves, then SIGKILL the rest;
    returns the names of those that had to be killed (orphans)."""
    deadline = time.monotonic() + grace_s
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(1.0)
    orphans = []
    for p in tagged(tag):
        try:
            orphans.append(p.name())
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return orphans


def metrics(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # being written
    return rows


def wait_for(predicate, proc: subprocess.Popen, timeout_s: float, log_path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) early:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s:\n{log_tail(log_path)}")
        time.sleep(0.5)


def kill_session(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def log_tail(log_path, chars: int = 4000) -> str:
    return open(log_path, errors="replace").read()[-chars:]
