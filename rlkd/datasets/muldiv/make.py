"""Writes train.jsonl and test.jsonl: one-step word problems that multiply or divide two-digit
numbers, in GSM8K's format (`question`, `answer` ending in '#### N'). The setting is trivial and
the arithmetic is not: the embedded 135M model reads them right and gets most products and
quotients wrong by itself, so a calculator (environments/calculator.py) is what changes the
score (recipes/grpo_calculator.yaml).

    python rlkd/datasets/muldiv/make.py
"""

import json
import random
from pathlib import Path

NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Eli", "Ivy", "Max", "Lily"]
# (container, things): "a box holds 47 pencils"
PACKS = [("box", "pencils"), ("crate", "apples"), ("bag", "marbles"), ("shelf", "books"),
         ("jar", "coins"), ("tray", "cookies"), ("album", "stickers"), ("row", "chairs")]


def problem(rng: random.Random) -> dict:
    name, (pack, thing) = rng.choice(NAMES), rng.choice(PACKS)
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    if rng.random() < 0.5:
        question = (f"Each {pack} holds {a} {thing}. {name} has {b} full {pack}s. "
                    f"How many {thing} does {name} have?")
        result, rationale = a * b, f"{a} * {b} = {a * b}"
    else:
        question = (f"{name} has {a * b} {thing} and puts them into {pack}s of {a}. "
                    f"How many {pack}s does {name} fill?")
        result, rationale = b, f"{a * b} / {a} = {b}"
    return {"question": question, "answer": f"{rationale} {thing if result == a * b else pack + 's'}.\n#### {result}"}


def main() -> None:
    rng = random.Random(0)
    here = Path(__file__).parent
    for split, n in (("train", 1000), ("test", 400)):
        rows = [problem(rng) for _ in range(n)]
        (here / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
