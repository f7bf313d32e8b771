"""Rewards used by the end-to-end tests, loaded by file path like any user reward."""


def concise(completions: list[str], **_) -> list[float]:
    """1 for an empty answer, falling linearly to 0 at 200 characters: every group of samples
    differs in length, so GRPO has a learning signal from the first step."""
    return [max(0.0, 1.0 - len(c) / 200) for c in completions]
