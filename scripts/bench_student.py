"""Parameters and single-request decoding latency of a student against its teacher.

    python scripts/bench_student.py runs/<run>/checkpoint-N smollm2-135m-instruct [--tokens 64]

transformers, batch 1, greedy, a fixed GSM8K-style prompt, EOS ignored so both models decode
the same number of tokens; prints the median of --repeats timings. (Batched vLLM throughput is
in `python -m rlkd.eval`'s tokens/s and latency per sample.)
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.models import count_parameters, resolve_model

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
          "in May. How many clips did Natalia sell altogether in April and May?")


def latency(path, tokens: int, repeats: int) -> float:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first run warms up allocators and kernels
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="checkpoint dirs, hub ids or embedded names")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'model':<60} {'params':>12} {'s/request':>10} {'ms/token':>9}")
    for name in args.models:
        path = resolve_model(name)
        seconds = latency(path, args.tokens, args.repeats)
        print(f"{name:<60} {count_parameters(path):>12,} {seconds:>10.2f} {1000 * seconds / args.tokens:>9.1f}")


if __name__ == "__main__":
    main()
