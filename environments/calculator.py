"""A calculator environment: the model asks, exact arithmetic answers.

GSM8K was introduced with one (Cobbe et al. 2021, "Training Verifiers to Solve Math Word
Problems": a calculator filled in each `<<48/2=24>>` annotation at sampling time), and the
embedded 135M model gets about half of its own `a op b = c` steps wrong. Evaluation is
rlkd.equations' recursive-descent grammar over + - * / and parentheses in exact fractions: no
`eval`, no names, no powers, bounded input, so nothing a completion writes can run code or
take long.
"""

from rlkd.equations import evaluate, format_number
from rlkd.tool_calls import render_call, render_response

MAX_EXPRESSION = 200  # characters: longer is an error, so a runaway expression costs nothing


class Calculator:
    """Exact + - * / arithmetic for word problems; the answer is still the model's to write."""

    # Worked episodes, shown as earlier chat turns: with one SmolLM2-135M calls the tool in ~80%
    # of its samples on muldiv, without it ~5%. One multiplies and one divides: with the
    # multiplication alone the policy multiplied every question, and GRPO never saw a division
    # to reward (0 of 211 division test questions right before and after 30 steps).
    demonstrations = [
        ("Each box holds 23 pens. A shop has 48 full boxes. How many pens does the shop have?",
         f"{render_call('calculate', expression='23 * 48')}{render_response('1104')}"
         "23 * 48 = 1104\n#### 1104"),
        ("A baker has 1026 rolls and packs them into bags of 27. How many bags does the baker fill?",
         f"{render_call('calculate', expression='1026 / 27')}{render_response('38')}"
         "1026 / 27 = 38\n#### 38"),
    ]

    def reset(self, row: dict) -> None:
        """A new episode (the question's row); the calculator keeps no state between calls."""

    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression of numbers, + - * / and parentheses.

        Args:
            expression: for example "48 / 2" or "(3 + 4) * 12.5".
        Returns the value as a plain decimal ("24", "87.5"), or a line starting "error:".
        """
        if not isinstance(expression, str) or not expression.strip():
            return "error: expression must be a non-empty string"
        if len(expression) > MAX_EXPRESSION:
            return f"error: expression longer than {MAX_EXPRESSION} characters"
        try:
            return format_number(evaluate(expression.replace(",", "").replace("x", "*").replace("×", "*")))
        except (ValueError, ZeroDivisionError, RecursionError) as e:
            return f"error: {e}"
