"""Rollout throughput: rlkd's rollout actor vs bare vLLM vs transformers `generate`.

    python scripts/bench_rollout.py [--prompts 8 --n 4 --max-tokens 128] [--quick]

The same GSM8K prompts (rendered with rlkd's chat template), n samples each at temperature 1,
at most --max-tokens new tokens, go through:
  (a) rlkd: a `RolloutActor` (Ray actor owning a vLLM engine) called from the driver through
      `generate_sharded`, as the GRPO loop calls it: per-token logprobs, results unpacked into a
      `Generation` and shipped back through Ray;
  (b) bare `vllm.LLM.generate` in this process with the same engine settings (dtype, context,
      eager mode, KV cache, no chunked prefill on CPU) and the same seeded SamplingParams, without
      logprobs; (b+lp) the same call with per-token logprobs, which separates the cost of
      logprobs from the cost of the Ray hop in the a/b gap;
  (c) `transformers` `generate(do_sample=True, num_return_sequences=n)` on one left-padded batch.
Each side gets one untimed warm-up call, then --repeats timed calls; tokens/s is completion
tokens (up to and including EOS) over wall time, averaged over the repeats. Target: a/b >= 0.9.
On a GPU machine every side runs on the GPU in bfloat16.
"""

from __future__ import annotations

import os
import time

import ray
import torch
import vllm
from bench_common import gsm8k_prompts, on_gpu, parser, print_table, target, write_result
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.actors.cluster import init_ray
from rlkd.actors.rollout import RolloutActor, generate_sharded
from rlkd.compose import load_config
from rlkd.hardware import rollout_dtype
from rlkd.models import resolve_model
from rlkd.types import SamplingSpec


def engine_kwargs(cfg, gpu: bool) -> dict:
    """The vLLM settings rlkd's RolloutWorker uses, so (a) and (b) run the same engine."""
    kw = {"dtype": rollout_dtype(cfg), "max_model_len": cfg.model.max_model_len,
          "enforce_eager": cfg.rollout.enforce_eager, "seed": cfg.run.seed}
    if gpu:
        kw["gpu_memory_utilization"] = cfg.rollout.gpu_memory_utilization
    else:
        kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(cfg.model.max_model_len, 8192))
    return kw


def timed(fn, repeats: int) -> tuple[float, int, list[float]]:
    """(tokens/s over all repeats, tokens per call, seconds per call); fn(r) -> tokens."""
    seconds, tokens = [], []
    for r in range(repeats):
        start = time.perf_counter()
        tokens.append(fn(r))
        seconds.append(time.perf_counter() - start)
    return sum(tokens) / sum(seconds), round(sum(tokens) / repeats), seconds


def bench_rlkd(cfg, model_path: str, prompts: list[str], args, gpu: bool) -> tuple[float, int, list[float]]:
    init_ray(cfg)
    actor = RolloutActor.options(num_cpus=0, num_gpus=1 if gpu else 0).remote(
        model_path, max_model_len=cfg.model.max_model_len, dtype=rollout_dtype(cfg),
        enforce_eager=cfg.rollout.enforce_eager, kv_cache_gb=cfg.rollout.kv_cache_gb,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, use_gpu=gpu, seed=cfg.run.seed)
    try:
        ray.get(actor.ready.remote())
        generate_sharded([actor], prompts[:2], SamplingSpec(n=1, max_tokens=8, seed=0))

        def call(r: int) -> int:
            spec = SamplingSpec(n=args.n, max_tokens=args.max_tokens, temperature=1.0, seed=1000 + r)
            return generate_sharded([actor], prompts, spec).num_tokens

        return timed(call, args.repeats)
    finally:
        ray.get(actor.shutdown.remote())
        ray.shutdown()


def bench_vllm(cfg, model_path: str, prompts: list[str], args, gpu: bool) -> dict[str, tuple]:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.kv_cache_gb)  # as RolloutWorker sets it
    llm = vllm.LLM(model_path, **engine_kwargs(cfg, gpu))
    try:
        llm.generate(prompts[:2], vllm.SamplingParams(max_tokens=8, seed=0), use_tqdm=False)
        out = {}
        for name, logprobs in (("bare", None), ("bare+lp", 0)):
            def call(r: int, logprobs=logprobs) -> int:
                params = vllm.SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=1.0,
                                             top_p=1.0, seed=1000 + r, logprobs=logprobs)
                outputs = llm.generate(prompts, params, use_tqdm=False)
                return sum(len(c.token_ids) for o in outputs for c in o.outputs)

            out[name] = timed(call, args.repeats)
        return out
    finally:
        llm.llm_engine.engine_core.shutdown()


def bench_hf(model_path: str, prompts: list[str], args, gpu: bool) -> tuple[float, int, list[float]]:
    device = "cuda" if gpu else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if gpu else torch.float32).to(device).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    def generate(batch: list[str], n: int, max_tokens: int) -> int:
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=n, max_new_tokens=max_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        tokens = 0
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            tokens += end
        return tokens

    generate(prompts[:2], 1, 8)

    def call(r: int) -> int:
        torch.manual_seed(1000 + r)
        return generate(prompts, args.n, args.max_tokens)

    return timed(call, args.repeats)


def main() -> None:
    p = parser("bench_rollout", __doc__)
    p.add_argument("--prompts", type=int, default=8, help="GSM8K questions")
    p.add_argument("--n", type=int, default=4, help="samples per question")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per sample at most")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per side")
    p.add_argument("--skip-hf", action="store_true", help="leave out (c), transformers generate")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.n, args.max_tokens, args.repeats = 2, 2, 16, 1
    gpu = on_gpu()
    extra = ["rollout.dtype=bfloat16", "rollout.gpus_per_actor=1"] if gpu else []
    cfg = load_config(None, extra)
    model_path = str(resolve_model(cfg.model.name))
    prompts, _ = gsm8k_prompts(AutoTokenizer.from_pretrained(model_path), args.data, args.prompts)

    results = {"a: rlkd RolloutActor": bench_rlkd(cfg, model_path, prompts, args, gpu)}
    bare = bench_vllm(cfg, model_path, prompts, args, gpu)
    results["b: bare vllm.LLM.generate"] = bare["bare"]
    results["b+lp: bare vllm + logprobs"] = bare["bare+lp"]
    if not args.skip_hf:
        results["c: transformers generate"] = bench_hf(model_path, prompts, args, gpu)

    a = results["a: rlkd RolloutActor"][0]
    b, b_lp = bare["bare"][0], bare["bare+lp"][0]
    ratios = {"a/b": a / b, "a/(b+lp)": a / b_lp, "(b+lp)/b": b_lp / b}
    if not args.skip_hf:
        ratios["a/c"] = a / results["c: transformers generate"][0]
    rows = [[name, tps, tokens, sum(secs) / len(secs)] for name, (tps, tokens, secs) in results.items()]
    headers = ["side", "tokens/s", "tokens/call", "s/call"]
    title = f"rollout: {args.prompts} prompts x n={args.n}, max {args.max_tokens} tokens, {'GPU' if gpu else 'CPU'}"
    print_table(title, headers, rows)
    print_table("ratios", ["ratio", "value"], [[k, v] for k, v in ratios.items()])
    gap = (f"a/b={ratios['a/b']:.2f}: per-token logprobs cost {1 - ratios['(b+lp)/b']:.0%} of bare vLLM's "
           f"throughput ((b+lp)/b={ratios['(b+lp)/b']:.2f}); the Ray actor hop and unpacking account for "
           f"the rest (a/(b+lp)={ratios['a/(b+lp)']:.2f})")
    write_result(args.out, "bench_rollout", {
        "title": title,
        "settings": {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
                     "repeats": args.repeats, "quick": args.quick, "device": "gpu" if gpu else "cpu"},
        "table": {"headers": headers, "rows": rows},
        "ratios": ratios,
        "targets": [target("rollout a/b", ratios["a/b"], ">= 0.9", ratios["a/b"] >= 0.9, gap)],
    })


if __name__ == "__main__":
    main()
