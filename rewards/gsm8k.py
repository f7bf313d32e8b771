"""Correctness reward for GSM8K-style problems with a numeric gold answer."""

from rlkd.answer import extract_answer, is_correct


def gsm8k_correct(completions: list[str], answer: list[str | None], truncated: list[bool] | None = None,
                  **_) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold `answer`, else 0.0.

    `answer` holds gold answers already extracted by `rlkd.answer.gold_answer`; a row whose gold
    is None or empty scores None (not applicable). A completion cut at the token cap
    (`truncated`) is not graded by its last number, which is mid-reasoning there: a policy could
    learn to stop on a lucky number. Bounded by `rlkd.answer`: hostile completions score 0.0
    within about a second.
    """
    cut = truncated if truncated is not None else [False] * len(completions)
    return [
        None if not gold else float(is_correct(completion, gold, last_number=not c))
        for completion, gold, c in zip(completions, answer, cut, strict=True)
    ]


# The parser the run's guardrails use to tell "no answer at all" apart from a wrong answer
# (reward/gsm8k_correct_unparsed); any reward may carry one.
gsm8k_correct.parse = extract_answer
