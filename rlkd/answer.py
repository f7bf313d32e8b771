"""The one answer parser shared by evaluation and rewards.

`extract_answer` pulls the final answer out of a completion, `answers_match` compares it with
the gold answer and `is_correct` does both. Numbers are compared exactly in-process; anything
else goes to math-verify inside a forked, memory-capped child with a hard time limit, so hostile
completions score 0 quickly instead of hanging or crashing the trainer.
"""

import json
import logging
import os
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from math_verify import parse, verify

TAIL_CHARS = 4096  # only the end of a completion can hold its final answer; bounds regex work
VERIFY_TIMEOUT_S = 0.8  # per math-verify call, enforced by killing the forked child; with
# the fork and pipe round trip a reward call still returns within 1 s
_MAX_VERIFY_CHARS = 512  # longer "answers" are junk; don't even send them to the verifier
_CHILD_MEMORY_BYTES = 1 << 30  # address space a child may add on top of what it inherited
_MATCH, _NO_MATCH = 10, 11  # child exit codes; anything else (crash, kill) means no match

# re.ASCII: \d would otherwise accept any Unicode digit, which int() then silently converts.
_NUM = r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(rf"{_NUM}(?:\s*/\s*{_NUM})?", re.ASCII)
_FULL_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/-?(?:\d+(?:\.\d*)?|\.\d+))?", re.ASCII)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}", re.ASCII)
_NOISE_RE = re.compile(r"\\[$%!,;]|\\(?:left|right)\b|[$%\s]")
_TEXT_RE = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HASHES_RE = re.compile(r"####([^\n]*)")
_PHRASE_RE = re.compile(r"answer(?:\*\*|\s)*(?:is\b|:|=)([^\n]*)", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def gold_answer(answer_field: str) -> str:
    """Return the gold number of a GSM8K `answer` field: the text after the last `####`."""
    _, sep, gold = answer_field.rpartition("####")
    if not sep:
        raise ValueError(f"gold answer has no '####': {answer_field[-80:]!r}")
    gold = gold.replace(",", "").strip()
    if _FULL_NUMBER_RE.fullmatch(gold) is None:
        raise ValueError(f"gold answer after '####' is not a number: {gold[:80]!r}")
    return gold


def extract_answer(completion: str, last_number: bool = True) -> str | None:
    """Return the final answer in `completion`, or None if it holds none.

    Tried in order: the last `<answer>…</answer>` (then searched like a completion), the last
    `#### x`, the last `\\boxed{x}`, the last "answer is x" / "Answer: x", and finally (unless
    `last_number=False`, as for a completion cut at the token cap, whose last number is
    mid-reasoning) the last number. Numbers come back normalised (`$1,234.` -> `1234`,
    `\\frac{1}{2}` -> `1/2`); a non-numeric box or answer tag comes back as its text for
    math-verify to judge.
    """
    if not isinstance(completion, str):
        return None
    text = completion[-TAIL_CHARS:].replace("\u2212", "-")
    tags = _TAG_RE.findall(text)
    if tags:
        return _from_text(tags[-1], last_number) or _short(tags[-1])
    return _from_text(text, last_number)


def _from_text(text: str, last_number: bool = True) -> str | None:
    hashes = _HASHES_RE.findall(text)
    if hashes and (number := _number_in(hashes[-1])):
        return number
    boxed = _last_boxed(text)
    if boxed is not None:  # a box holds exactly the answer, so anything but a number is maths
        return _numeric(_TEXT_RE.sub("", boxed)) or _short(boxed)
    phrases = _PHRASE_RE.findall(text)
    if phrases and (number := _number_in(_SENTENCE_END_RE.split(phrases[-1])[0])):
        return number
    if not last_number:
        return None
    numbers = _NUMBER_RE.findall(_FRAC_RE.sub(r"\1/\2", text))
    return _clean_number(numbers[-1]) if numbers else None


def _number_in(segment: str) -> str | None:
    # "The answer is 16 - 3 - 4 = 9": the result follows the last "=".
    segment = _FRAC_RE.sub(r"\1/\2", segment).rpartition("=")[2]
    match = _NUMBER_RE.search(segment)
    return _clean_number(match.group()) if match else None


def _clean_number(number: str) -> str:
    return re.sub(r"[,\s]", "", number)


def _short(text: str) -> str | None:
    text = text.strip()
    return text if 0 < len(text) <= _MAX_VERIFY_CHARS else None


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    start = text.index("{", start) + 1
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _numeric(answer: str) -> str | None:
    """`answer` as a plain number string if it is nothing but a (decorated) number."""
    text = _NOISE_RE.sub("", _FRAC_RE.sub(r"\1/\2", answer)).replace(",", "").rstrip(".")
    return text if len(text) <= 64 and _FULL_NUMBER_RE.fullmatch(text) else None


ROUNDED_GOLD_PLACES = 2  # a gold with this many decimal places or more may have been rounded


def _decimal_places(number: str) -> float:
    """Decimal places written; a fraction has as many as it needs (inf unless it terminates)."""
    text = _numeric(number) or ""
    if "/" in text:
        value = _to_fraction(text)
        return 0 if value is None or value.denominator == 1 else float("inf")
    return len(text.partition(".")[2])


def _to_fraction(answer: str) -> Fraction | None:
    text = _numeric(answer)
    try:
        return Fraction(text) if text is not None else None
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, gold: str) -> bool:
    """True if `pred` equals `gold`: exactly as numbers (18.00 == 18, 0.5 == .5 == 1/2), else
    math-verify. A gold decimal of 2 or more places may be rounded (MAWPS writes 5/6 as 0.833333
    and 250/3 as 83.33): a more precise number (5/6, 0.8333333, 83.3333) matches it when it
    rounds to it; one written to the gold's precision or coarser must equal it.

    math-verify runs in a separate process with a hard `VERIFY_TIMEOUT_S` limit and a memory
    cap, so this never hangs, never raises on hostile input and is safe from any thread.
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    pred_num, gold_num = _to_fraction(pred), _to_fraction(gold)
    if pred_num is not None and gold_num is not None:
        places = _decimal_places(gold)
        if places >= ROUNDED_GOLD_PLACES and _decimal_places(pred) > places:
            return abs(pred_num - gold_num) <= Fraction(1, 2 * 10**places)
        return pred_num == gold_num
    if not pred.strip() or len(pred) > _MAX_VERIFY_CHARS or len(gold) > _MAX_VERIFY_CHARS:
        return False
    return _VERIFIER.check(gold, pred)


def is_correct(completion: str, gold: str, last_number: bool = True) -> bool:
    """True if the final answer in `completion` matches `gold` (see `extract_answer`)."""
    return answers_match(extract_answer(completion, last_number), gold)


class _Verifier:
    """Client of a long-lived helper process that forks one child per math-verify call.

    A helper (not this process) forks because the trainer is multi-threaded and forking it is
    unsafe; the helper is single-threaded and already has sympy imported, so a fork is ~ms.
    The child, not the helper, runs untrusted input, so a timeout or crash costs one child.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None

    def check(self, gold: str, pred: str) -> bool:
        request = (json.dumps([gold, pred]) + "\n").encode()
        with self._lock:
            for _ in range(2):  # a helper found dead gets one fresh replacement and a retry
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                try:
                    os.write(self._proc.stdin.fileno(), request)
                    reply = self._read_line(VERIFY_TIMEOUT_S + 1.0)
                except OSError:
                    reply = b""
                if reply:
                    return reply == b"1\n"
                self._stop()
                if reply is None:  # wedged, not dead: retrying could double the wait
                    return False
            return False

    def _start(self):
        # math-verify must be importable the same way it is here, even if cwd differs.
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *sys.path]))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from rlkd.answer import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
        )
        if self._read_line(60.0) != b"ready\n":
            self._stop()
            raise RuntimeError("rlkd.answer: math-verify helper failed to start; see its stderr")

    def _stop(self):
        self._proc.kill()
        self._proc.wait()
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._proc = None

    def _read_line(self, timeout: float) -> bytes | None:
        """One reply line, b"" if the helper has exited, None on timeout."""
        # poll, not select: trainers hold thousands of fds and select() stops at 1024.
        poller = select.poll()
        poller.register(self._proc.stdout, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return None
        # Replies are tiny single writes, so one read returns a whole line.
        return os.read(self._proc.stdout.fileno(), 64)

    def reset_after_fork(self):
        # A forked trainer worker must not share the parent's pipes (or a held lock).
        self._lock = threading.Lock()
        self._proc = None


_VERIFIER = _Verifier()
os.register_at_fork(after_in_child=_VERIFIER.reset_after_fork)


def _serve():
    """Helper process main loop: one JSON `[gold, pred]` per line in, `1` or `0` per line out."""
    logging.disable(logging.CRITICAL)  # timeouts are ours; math-verify's warnings are noise
    # Children start as copies of this process: pay sympy's lazy imports and caches once here.
    gold = parse("$18$", parsing_timeout=None)
    for pred in ("abc", r"3 \times 6", r"\frac{1}{2}", r"x = \sqrt{2}", "1/0", "2^{10}"):
        verify(gold, parse(f"${pred}$", parsing_timeout=None), timeout_seconds=None)
    # Fail loudly now rather than quietly score every fallback 0 (no /proc, rlimits refused...).
    if not _verify_in_child(json.dumps(["18", r"3 \times 6"]).encode()):
        sys.exit("rlkd.answer: math-verify self-test failed in a forked child")
    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.buffer.flush()
    for line in sys.stdin.buffer:
        ok = _verify_in_child(line)
        sys.stdout.buffer.write(b"1\n" if ok else b"0\n")
        sys.stdout.buffer.flush()


def _verify_in_child(line: bytes) -> bool:
    pid = os.fork()
    if pid == 0:
        code = _NO_MATCH
        try:
            code = _MATCH if _child_verify(line) else _NO_MATCH
        finally:
            os._exit(code)
    deadline = time.monotonic() + VERIFY_TIMEOUT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFEXITED(status) and os.WEXITSTATUS(status) == _MATCH
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def _child_verify(line: bytes) -> bool:
    # ANTLR prints parse errors straight to the fds; keep hostile junk out of training logs.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    limit = _vm_size() + _CHILD_MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Backstop in case the helper is killed mid-call and can no longer kill this child.
    cpu_s = int(VERIFY_TIMEOUT_S) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    gold, pred = json.loads(line)
    # Gold first: math-verify's comparison is asymmetric. Signal-based timeouts are disabled
    # because ours is the process kill; theirs would fail off the main thread anyway.
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)
    return verify(gold_parsed, pred_parsed, timeout_seconds=None)


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
