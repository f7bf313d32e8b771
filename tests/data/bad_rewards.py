"""Broken user rewards: each must stop a run before any actor starts (tests/test_preflight.py)."""


def raises(completions, **_):
    raise KeyError("score")


def nan(completions, **_):
    return [float("nan")] * len(completions)


def short(completions, **_):
    return [1.0]


def text(completions, **_):
    return ["good"] * len(completions)
