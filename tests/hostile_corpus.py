"""A corpus of hostile model outputs: what a policy can emit by accident or learn to emit to
game a reward. Sizes, nesting depths and number widths are the ones that break parsers:
regex backtracking, recursion limits, int/str conversion limits, sympy blow-ups."""

MB = 1_000_000

# name -> a final answer-ish payload; each is also tried as a box, an answer tag and a #### line.
PAYLOADS = {
    "power tower": "9**9**9**9",
    "latex power tower": "9^{9^{9^{9}}}",
    "tower of tens": "10^{10^{10^{10}}}",
    "tower of twos": "2^{2^{2^{2^{2^{2^{2}}}}}}",
    "huge factorial": "100000!",
    "factorial of a tower": "(10^{100})!",
    "huge product": "\\prod_{i=1}^{10^{9}} i",
    "divergent sum": "\\sum_{n=1}^{\\infty} n",
    "divergent integral": "\\int_0^{\\infty} e^{x^2} dx",
    "huge binomial": "\\binom{10^{9}}{10^{8}}",
    "400 nines": "9" * 400,
    "5000 nines": "9" * 5_000,
    "exponent 1e999999999": "1e999999999",
    "negative exponent": "1e-999999999",
    "hex number": "0x" + "f" * 2_000,
    "nan": "nan",
    "NaN": "NaN",
    "inf": "inf",
    "-inf": "-inf",
    "infinity": "\\infty",
    "one over zero": "1/0",
    "latex one over zero": "\\frac{1}{0}",
    "zero over zero": "0/0",
    "sqrt of -1": "\\sqrt{-1}",
    "nested sqrt 200": "\\sqrt{" * 200 + "2" + "}" * 200,
    "nested frac 60": "\\frac{" * 60 + "1" + "}{2}" * 60,
    "nested parens 5000": "(" * 5_000 + "18" + ")" * 5_000,
    "nested braces 5000": "{" * 5_000 + "18" + "}" * 5_000,
    "nested brackets 5000": "[" * 5_000 + "18" + "]" * 5_000,
    "left right 2000": "\\left(" * 2_000 + "18" + "\\right)" * 2_000,
    "matrix 100x100": "\\begin{pmatrix}" + "\\\\".join(["&".join(["9"] * 100)] * 100) + "\\end{pmatrix}",
    "recursive macro": "\\def\\a{\\a\\a}\\a",
    "recursive newcommand": "\\newcommand{\\x}{\\x\\x}\\x",
    "begin bomb": "\\begin{matrix}" * 2_000,
    "set of 10k": "\\{" + ",".join(str(i) for i in range(10_000)) + "\\}",
    "interval": "[0, \\infty)",
    "equation chain": "=".join(["18"] * 5_000),
    "x equals": "x = 18 = 19 = 20",
    "comma number 100k": "1," * 50_000 + "000",
    "dots": "1." * 50_000,
    "minus signs": "-" * 50_000 + "18",
    "slashes": "1/" * 50_000 + "1",
    "half decimals": ".5" * 50_000,
    "percent and dollars": "$" * 10_000 + "18" + "%" * 10_000,
    "text macro bomb": "\\text{" * 5_000 + "18" + "}" * 5_000,
    "unicode minus": "\u221218",
    "full-width digits": "\uff11\uff18",
    "arabic digits": "\u0661\u0668",
    "superscript digits": "\u00b9\u2078",
    "combining overlay": "1\u03388",
    "zalgo": "18" + "\u0336\u0334\u0337" * 3_000,
    "zero width": "1\u200b8\u200d\ufeff",
    "rtl override": "\u202e81\u202c",
    "lone surrogate": "\ud800\udfff18",
    "emoji": "\U0001f600" * 10_000,
    "nul bytes": "\x00" * 10_000 + "18",
    "ansi escapes": "\x1b[31m18\x1b[0m" * 1_000,
    "carriage returns": "\r" * 10_000 + "18",
    "control chars": "".join(chr(i) for i in range(32)) * 300,
    "template injection": "{{7*7}}${7*7}<%= 7*7 %>",
    "python injection": "__import__('os').system('echo pwned')",
    "json breaker": '"]}\\n{"answer": "18"}',
    "empty": "",
    "whitespace": " \t\n" * 10_000,
}

WRAPPERS = {
    "boxed": "The answer is \\boxed{%s}",
    "tagged": "<answer>%s</answer>",
    "hashes": "Let me think.\n#### %s",
}

# Whole completions whose structure, not their answer, is the attack.
COMPLETIONS = {
    "1 MB of text": "She makes 9 * 2 = 18 dollars. " * 35_000,
    "1 MB of digits": "1" * MB,
    "1 MB in a box": "\\boxed{" + "x" * MB + "}",
    "1 MB in an answer tag": "<answer>" + "7" * MB + "</answer>",
    "1 MB of newlines": "\n" * MB,
    "1 MB of unicode": "\u00e9\u4e2d\U0001f600" * (MB // 9),
    "unclosed box": "\\boxed{18",
    "unclosed boxes": "\\boxed{" * 100_000,
    "unclosed fbox": "\\fbox{" * 100_000,
    "unclosed answer tags": "<answer>" * 100_000,
    "unclosed think": "<think>" * 100_000,
    "think tag storm": "<think></think>" * 50_000,
    "reversed think": "</think>" * 50_000 + "<think>" * 50_000,
    "many hashes": "####" * 250_000,
    "many answer phrases": "the answer is " * 70_000,
    "answer phrase then bomb": "The answer is " + "9" * 100_000,
    "box inside box": "\\boxed{" * 1_000 + "18" + "}" * 1_000,
    "box then junk": "\\boxed{18}" + "}" * 100_000,
    "hashes then spaces": "#### " + " " * 100_000 + "x",
    "answer line bomb": "#### " + "1," * 100_000,
    "think bomb": "<think>" + "a" * MB + "</think>#### 18",
    "many boxes": "\\boxed{1}" * 100_000,
}


def corpus() -> dict[str, str]:
    out = dict(COMPLETIONS)
    for name, payload in PAYLOADS.items():
        out[f"bare {name}"] = payload
        for wrapper, template in WRAPPERS.items():
            out[f"{wrapper} {name}"] = template % payload
    return out
