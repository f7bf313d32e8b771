"""A verifiable process reward: is the arithmetic the completion writes down right?

The embedded 135M model gets about half of the `a op b = c` steps it writes wrong (333 of 674
on 300 held-out GSM8K questions, untrained, greedy), and one wrong step sinks the answer.
Correctness alone rewards about 1 sampled completion in 50 there, so most groups carry no
signal; every completion's arithmetic can be checked, so this reward gives nearly every group
some variance, towards steps that compute what they claim. Pure string work, linear in the
completion's length.
"""

import ast
import math
import operator
import re

# "<expression> = <number>": digits, operators, brackets, currency signs and thousands commas.
# Both sides are matched around each "=" in a bounded window, so any text costs linear time.
_LHS_RE = re.compile(r"[0-9$(][0-9 .,$()+\-*/x×÷]{0,80}[0-9)] *$")
_RHS_RE = re.compile(r"= *\$? *(-?[0-9][0-9,]{0,30}(?:\.[0-9]{1,12})?)")
WINDOW = 84
MAX_SIGNS = 1000  # "=" signs looked at per completion
_NUMBER_RE = re.compile(r"[0-9][0-9,]*(?:\.[0-9]+)?")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MAX_EQUATIONS = 64  # checkable equations per completion
MAX_VALUE = 1e12


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _evaluate(expression: str) -> float | None:
    """The value of a +, -, *, / expression of plain numbers, or None if it is anything else."""
    text = expression.replace("$", "").replace(",", "").replace("×", "*").replace("x", "*").replace("÷", "/")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            out = _OPS[type(node.op)](left, right)
            if abs(out) > MAX_VALUE:
                raise OverflowError
            return out
        raise ValueError

    if not isinstance(tree, ast.BinOp):  # "5 = 5" states nothing
        return None
    try:
        return value(tree)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def equations(text: str) -> list[tuple[list[float], float, float]]:
    """(operands, claimed result, true value) of each checkable equation, in order."""
    out, at = [], text.find("=")
    for _ in range(MAX_SIGNS):
        if at < 0 or len(out) == MAX_EQUATIONS:
            break
        lhs, rhs = _LHS_RE.search(text, max(at - WINDOW, 0), at), _RHS_RE.match(text, at)
        if lhs and rhs and (truth := _evaluate(lhs.group(0))) is not None:
            out.append(([_number(n) for n in _NUMBER_RE.findall(lhs.group(0))], _number(rhs.group(1)), truth))
        at = text.find("=", at + 1)
    return out


def arithmetic_steps(completions: list[str], question: list[str] | None = None,
                     truncated: list[bool] | None = None, **_) -> list[float]:
    """Fraction of the completion's equations that are right and grounded, 0.0 without any.

    An equation `a op b = c` (any +, -, *, / expression of numbers; `x` and `×` multiply) is
    right when c equals its value to 1e-6 relative, and grounded when at least one of its
    numbers comes from the question or from an earlier equation's result: correct but
    unrelated sums like `1 + 1 = 2` earn nothing. A completion cut at the token cap scores 0,
    so writing more steps than fit is never rewarded.
    """
    cut = truncated if truncated is not None else [False] * len(completions)
    question = question if question is not None else [""] * len(completions)
    scores = []
    for text, q, c in zip(completions, question, cut, strict=True):
        found = [] if c else equations(text)
        known = {_number(n) for n in _NUMBER_RE.findall(q)}
        good = 0
        for operands, claimed, truth in found:
            right = math.isclose(claimed, truth, rel_tol=1e-6, abs_tol=1e-9)
            good += right and any(x in known for x in operands)
            known.add(claimed)
        scores.append(good / len(found) if found else 0.0)
    return scores
