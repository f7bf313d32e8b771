"""Infix arithmetic equations (MAWPS / ASDiv-A's `equation` field) written as steps.

`equation_steps("( 8 + 2 ) * 3")` gives `["8 + 2 = 10", "10 * 3 = 30"]`: one line per
operation, innermost first, left to right, each with its exact value, the way a gold rationale
writes a calculation. Parsing is a small recursive-descent grammar over + - * / and parentheses,
evaluated with `Fraction`, so no `eval` ever runs and 1/3 stays exact until it is written.
"""

import re
from fractions import Fraction

_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(.))")
DECIMALS = 6  # a non-terminating result is written rounded to this many places, as MAWPS does


def format_number(x: Fraction) -> str:
    """`x` as the shortest plain decimal: 6, 0.5, 141.5; a repeating one rounded (0.3333)."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:  # terminates: exact digits
        text = f"{float(x):.12f}".rstrip("0")
    else:
        text = f"{round(float(x), DECIMALS):.{DECIMALS}f}".rstrip("0")
    return text.rstrip(".")


class _Parser:
    def __init__(self, equation: str):
        self.equation = equation
        self.tokens = []
        for number, op in _TOKEN_RE.findall(equation):
            if number:
                self.tokens.append(Fraction(number))
            elif op.strip():
                if op not in "+-*/()":
                    raise ValueError(f"equation {equation!r}: unexpected {op!r}")
                self.tokens.append(op)
        self.pos = 0
        self.steps: list[str] = []

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self):
        token = self._peek()
        if token is None:
            raise ValueError(f"equation {self.equation!r} ends early")
        self.pos += 1
        return token

    def parse(self) -> Fraction:
        value = self._sum()
        if self._peek() is not None:
            raise ValueError(f"equation {self.equation!r}: unexpected {self._peek()!r}")
        return value

    def _sum(self) -> Fraction:
        value = self._product()
        while self._peek() in ("+", "-"):
            value = self._apply(value, self._take(), self._product())
        return value

    def _product(self) -> Fraction:
        value = self._atom()
        while self._peek() in ("*", "/"):
            value = self._apply(value, self._take(), self._atom())
        return value

    def _atom(self) -> Fraction:
        token = self._take()
        if token == "(":
            value = self._sum()
            if self._take() != ")":
                raise ValueError(f"equation {self.equation!r}: unbalanced parentheses")
            return value
        if token == "-":  # a negative literal
            return -self._atom()
        if isinstance(token, Fraction):
            return token
        raise ValueError(f"equation {self.equation!r}: unexpected {token!r}")

    def _apply(self, a: Fraction, op: str, b: Fraction) -> Fraction:
        if op == "/" and b == 0:
            raise ValueError(f"equation {self.equation!r} divides by zero")
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
        self.steps.append(f"{format_number(a)} {op} {format_number(b)} = {format_number(value)}")
        return value


def evaluate(equation: str) -> Fraction:
    """The exact value of an infix equation."""
    return _Parser(equation).parse()


def equation_steps(equation: str) -> list[str]:
    """One `a op b = c` line per operation of `equation`; a bare number is one line of itself."""
    parser = _Parser(equation)
    value = parser.parse()
    return parser.steps or [format_number(value)]
