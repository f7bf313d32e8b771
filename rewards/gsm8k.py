"""Correctness reward for GSM8K-style problems with a numeric gold answer."""

from rlkd.answer import extract_answer, is_correct


def gsm8k_correct(completions: list[str], answer: list[str | None], **_) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold `answer`, else 0.0.

    `answer` holds gold answers already extracted by `rlkd.answer.gold_answer`; a row whose gold
    is None or empty scores None (not applicable). Bounded by `rlkd.answer`: hostile completions
    score 0.0 within about a second.
    """
    return [
        None if not gold else float(is_correct(completion, gold))
        for completion, gold in zip(completions, answer, strict=True)
    ]


# The parser the run's guardrails use to tell "no answer at all" apart from a wrong answer
# (reward/gsm8k_correct_unparsed); any reward may carry one.
gsm8k_correct.parse = extract_answer
