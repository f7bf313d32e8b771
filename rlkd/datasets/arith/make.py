"""Writes train.jsonl and test.jsonl: one-step addition and subtraction word problems in GSM8K's format
(`question`, `answer` ending in '#### N'), for the end-to-end learning test.

    python rlkd/datasets/arith/make.py
"""

import json
import random
from pathlib import Path

NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Eli", "Ivy", "Max", "Lily"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]


def problem(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    if rng.random() < 0.5:
        question = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        result, rationale = a + b, f"{a} + {b} = {a + b}"
    else:
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?"
        result, rationale = a - b, f"{a} - {b} = {a - b}"
    return {"question": question, "answer": f"{name} has {rationale} {thing}.\n#### {result}"}


def main() -> None:
    rng = random.Random(0)
    here = Path(__file__).parent
    for split, n in (("train", 400), ("test", 200)):
        rows = [problem(rng) for _ in range(n)]
        (here / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
