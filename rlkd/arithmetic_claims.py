"""Arithmetic claims in a rationale: every `a op b = c` read off the text and recomputed.

Used by the distillation study's report (`rlkd.study_report`) to count a model's arithmetic
errors. A claim is the longest operator expression ending just before an `=` and the value
starting just after it; `arithmetic_claims` says when one counts as wrong.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from rlkd.filters import strip_calculator

_NUM = r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|\$?\.\d+%?"
_OP = r"[-+*/xX×÷−]"
_TERM = rf"(?:\(\s*)*(?:{_NUM})(?:\s*\))*"
_EXPR = rf"-?{_TERM}(?:\s*{_OP}\s*{_TERM})+"
# Claims are read around each `=`: the longest expression ending just before it, and the one
# starting just after it, each within WINDOW characters, so text without claims costs nothing
# and a pathological chain of operators costs WINDOW**2 per `=`, not its length squared.
_EQUALS_RE = re.compile(r"(?<![<>!=])=(?!=)")
_LHS_RE = re.compile(rf"(?<![\w.,:$)])({_EXPR})\s*$")
_RHS_RE = re.compile(rf"\s*(-?{_TERM}(?:\s*{_OP}\s*{_TERM})*)")
WINDOW = 200
_ANNOTATION_RE = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")
_TOKEN_RE = re.compile(rf"{_NUM}|{_OP}|[()]")
_OP_RE = re.compile(_OP)
_OPS = {"x": "*", "X": "*", "×": "*", "÷": "/", "−": "-"}


@dataclass(frozen=True)
class Claim:
    lhs: str
    rhs: str
    correct: bool


def _tokens(expr: str, percent: bool) -> list:
    """Numbers (floats) and operators; `%` is /100 when `percent`, else ignored."""
    out: list = []
    for tok in _TOKEN_RE.findall(expr):
        if tok in "()" or tok in _OPS or tok in "+-*/":
            out.append(_OPS.get(tok, tok))
            continue
        value = float(tok.strip("$%").replace(",", ""))
        out.append(value / 100 if percent and tok.endswith("%") else value)
    # Parentheses the regex cut in half, e.g. `(12 * 3 = 36`: drop the unmatched ones.
    depth, kept = 0, []
    for tok in out:
        if tok == ")" and depth == 0:
            continue
        depth += (tok == "(") - (tok == ")")
        kept.append(tok)
    while depth > 0:
        kept.remove("(")
        depth -= 1
    return kept


def _evaluate(tokens: list, precedence: bool) -> float:
    """Value of the token list, with * and / binding tighter (`precedence`) or strictly left to
    right, the way many rationales write running calculations. Division by zero is infinite."""
    pos = 0

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def peek(ops: str) -> bool:
        return pos < len(tokens) and isinstance(tokens[pos], str) and tokens[pos] in ops

    def apply(op: str, a: float, b: float) -> float:
        if op == "/":
            return a / b if b else math.inf
        return a * b if op == "*" else a + b if op == "+" else a - b

    def atom() -> float:
        tok = take()
        if tok == "-":
            return -atom()
        if tok == "(":
            value = top()
            if take() != ")":
                raise ValueError("unbalanced")
            return value
        if isinstance(tok, str):
            raise ValueError(tok)
        return tok

    def binary(operand, ops: str) -> float:
        value = operand()
        while peek(ops):
            op = take()
            value = apply(op, value, operand())
        return value

    def top() -> float:
        if precedence:
            return binary(lambda: binary(atom, "*/"), "+-")
        return binary(atom, "+-*/")

    value = top()
    if pos != len(tokens):
        raise ValueError("trailing tokens")
    return value


def _values(expr: str) -> list[float]:
    """Every reading of `expr`: with and without precedence, % as /100 or as a plain number."""
    out = []
    for percent in (True, False):
        tokens = _tokens(expr, percent)
        for precedence in (True, False):
            try:
                out.append(_evaluate(tokens, precedence))
            except (ValueError, IndexError):
                continue
    return out


def _tolerance(number: str) -> float:
    """Half a unit in the last written digit: `10 / 3 = 3.33` is rounding, `= 3.4` is not."""
    digits = number.strip("$%").split(".")
    return 0.5 * 10 ** -(len(digits[1]) if len(digits) > 1 else 0)


def _check(lhs: str, rhs: str) -> bool | None:
    """Whether some reading makes `lhs = rhs` right; None if the left side does not parse."""
    computed = _values(lhs)
    if not computed:
        return None
    first = _TOKEN_RE.match(rhs.lstrip("-( "))
    sign = -1.0 if rhs.lstrip().startswith("-") else 1.0
    candidates = [(sign * v, _tolerance(first.group(0))) for v in _values(first.group(0))] if first else []
    if _OP_RE.search(rhs.lstrip("-( ")):
        candidates += [(v, 1e-6) for v in _values(rhs)]
    return any(abs(c - v) <= tol + 1e-9 * max(1.0, abs(v)) for c in computed for v, tol in candidates)


def arithmetic_claims(text: str) -> list[Claim]:
    """Every arithmetic claim in `text`, recomputed.

    A claim is an expression of at least two bare numbers joined by + - * / x × ÷ (parentheses,
    `$`, thousands commas, decimals and `%` allowed), then `=`, then a number. GSM8K calculator
    annotations `<<48/2=24>>` are claims too; the prose copy next to one (`48/2 = 24`) is not
    counted a second time. In a chain `2 + 3 = 5 * 2 = 10` each `=` is a claim about the
    expression since the previous `=` (`2 + 3 = 5`, `5 * 2 = 10`): the way running totals are
    written. Numbers glued to words (`5kg`), times (`3:00`) and lone numbers (`12 = 3 * 4`) make
    no claim. A claim is wrong only if no reading makes it right: with or without operator
    precedence, `%` as /100 or not, the right side as its first number or as the expression up
    to the next `=` (`1/2 + 1/4 = 3/4`), within half a unit of its last written digit; a
    division by zero is wrong. A left side that does not parse, or longer than WINDOW
    characters, is no claim.
    """
    annotations: Counter[tuple[str, str]] = Counter()
    found = []
    for lhs, rhs in _ANNOTATION_RE.findall(text):
        if (ok := _check(lhs, rhs)) is not None:
            found.append(Claim(lhs.strip(), rhs.strip(), ok))
            annotations[_key(lhs, rhs)] += 1
    for lhs, rhs in _prose_claims(strip_calculator(text)):
        if annotations[_key(lhs, rhs)]:  # the prose copy of an annotation
            annotations[_key(lhs, rhs)] -= 1
        elif (ok := _check(lhs, rhs)) is not None:
            found.append(Claim(lhs.strip(), rhs.strip(), ok))
    return found


def _prose_claims(text: str):
    """(left, right) text of each `expression = number` in `text`."""
    for eq in _EQUALS_RE.finditer(text):
        start = max(0, eq.start() - WINDOW)
        lhs = _LHS_RE.search(text, start, eq.start())
        rhs = _RHS_RE.match(text, eq.end(), eq.end() + WINDOW)
        # A left side near the window's edge may go on before it: too long to be a claim.
        if lhs and rhs and (start == 0 or lhs.start() >= start + 10):
            yield lhs.group(1), rhs.group(1)


def _key(lhs: str, rhs: str) -> tuple[str, str]:
    first = _TOKEN_RE.match(rhs.strip())
    lhs = "".join(_OPS.get(c, c) for c in re.sub(r"[\s$]", "", lhs))
    return lhs, (first.group(0) if first else rhs.strip()).strip("$")


def arithmetic_errors(texts: list[str]) -> tuple[int, int]:
    """(wrong claims, all claims) over a model's rationales."""
    claims = [c for t in texts for c in arithmetic_claims(t)]
    return sum(not c.correct for c in claims), len(claims)
