"""Rollout throughput with 1, 2, ... vLLM rollout actors: prompts sharded, results gathered.

    python scripts/bench_rollout_actors.py --actors 1 2 [--prompts 16 --n 4 --max-tokens 64]
    python scripts/bench_rollout_actors.py --actors 1 2 rollout.placement=spread ray.address=auto

Trailing key=value arguments are rlkd config overrides (placement, CPUs, kv cache, cluster).
Each setting starts its engines in the placement groups `python -m rlkd.train` would use,
warms them up, then times one sharded batch of GSM8K prompts from the driver (Ray overhead
included) and prints completion tokens/s and the speed-up over the first setting.
"""

import argparse
import time

import ray
from transformers import AutoTokenizer

from rlkd.actors.cluster import init_ray, start_rollouts
from rlkd.actors.placement import plan, reserve
from rlkd.actors.rollout import generate_sharded
from rlkd.compose import load_config
from rlkd.config import REPO_ROOT
from rlkd.data import build_prompt, load_split
from rlkd.models import resolve_model
from rlkd.types import SamplingSpec


def bench(overrides: list[str], num_actors: int, prompts: list[str], spec: SamplingSpec) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) of one timed sharded batch on `num_actors` engines."""
    cfg = load_config(None, [*overrides, f"rollout.num_actors={num_actors}"])
    placement = reserve(plan(cfg), cfg.ray.placement_timeout_s)
    rollouts = start_rollouts(cfg, str(resolve_model(cfg.model.name)), placement)
    try:
        generate_sharded(rollouts, prompts[:num_actors], spec)  # warm-up
        start = time.perf_counter()
        gen = generate_sharded(rollouts, prompts, spec)
        seconds = time.perf_counter() - start
    finally:
        ray.get([r.shutdown.remote() for r in rollouts])
        placement.remove()
    return gen.num_tokens / seconds, gen.num_tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=16, help="GSM8K questions per batch")
    parser.add_argument("--n", type=int, default=4, help="samples per question")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("overrides", nargs="*", help="rlkd config overrides, key=value")
    args = parser.parse_args()
    overrides = [f"data.path={args.data}", "rollout.kv_cache_gb=1", "model.max_model_len=512",
                 *args.overrides]
    cfg = load_config(None, overrides)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name))
    examples = load_split(cfg.data, "test", limit=args.prompts)
    prompts = [build_prompt(tokenizer, ex.question, cfg.data) for ex in examples]
    # A local Ray instance advertises what the largest setting reserves.
    init_ray(load_config(None, [*overrides, f"rollout.num_actors={max(args.actors)}"]))
    spec = SamplingSpec(n=args.n, max_tokens=args.max_tokens, temperature=1.0, seed=0)
    print(f"{len(prompts)} prompts x {args.n} samples, <= {args.max_tokens} tokens each")
    print(f"{'actors':>6}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'speed-up':>10}")
    first = None
    for k in args.actors:
        rate, tokens, seconds = bench(overrides, k, prompts, spec)
        first = first or rate
        print(f"{k:>6}{tokens:>8}{seconds:>9.1f}{rate:>8.1f}{rate / first:>9.2f}x", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
