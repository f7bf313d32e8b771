"""GRPO learner step time and peak memory: full fine-tuning against LoRA, on the embedded model.

    python scripts/bench_lora.py [--rank 16] [--max-new-tokens 128] [--steps 2] [--quick] [key=value ...]

The batch is bench_learner.py's: `--prompts` GSM8K train questions x `--group` completions
sampled by vLLM (cached in bench_results/), every row given an advantage so both sides score
every row. Each variant (full, LoRA rank `--rank` on every attention and MLP projection) runs
in a fresh process, so its peak resident memory (CPU) or peak allocated memory (GPU) is its own:
model, DeepSpeed's fp32 master copy, AdamW state and activations. The precision is the one
`learner.dtype=auto` picks, the same for both sides. Printed: seconds per step, tokens/s,
trainable parameters, peak memory, and LoRA's ratios against full fine-tuning.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

import torch
from bench_common import free_port, on_gpu, parser, print_table, write_result
from bench_learner import sample_batch, train_batch

from rlkd.actors.learner import Learner
from rlkd.compose import load_config
from rlkd.models import resolve_model


def run_variant(overrides: list[str], data: dict, group: int, warmup: int, steps: int, queue) -> None:
    """In a child process: build the learner, time its steps, report its peak memory."""
    cfg = load_config(None, overrides)
    gpu = on_gpu()
    learner = Learner(cfg, str(resolve_model(cfg.model.name)), master_port=free_port())
    batch = train_batch(data, group, "all signal")
    secs = []
    for step in range(warmup + steps):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        learner.train_step(batch)
        if gpu:
            torch.cuda.synchronize()
        if step >= warmup:
            secs.append(time.perf_counter() - start)
    module = learner.engine.module
    peak = (torch.cuda.max_memory_allocated() if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    queue.put({"seconds": secs, "peak_bytes": peak, "precision": learner.compute_dtype,
               "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
               "parameters": sum(p.numel() for p in module.parameters())})
    learner.close()


def main() -> None:
    p = parser("bench_lora", __doc__)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("overrides", nargs="*", help="rlkd config overrides for both variants, key=value")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.group, args.max_new_tokens, args.steps, args.warmup = 1, 4, 16, 1, 0
    base = [f"grpo.group_size={args.group}", f"grpo.prompts_per_step={args.prompts}",
            f"rollout.max_new_tokens={args.max_new_tokens}", *args.overrides]
    cfg = load_config(None, base)
    data = sample_batch(cfg, str(resolve_model(cfg.model.name)), args.data, args.prompts, args.group,
                        args.max_new_tokens)
    tokens = sum(len(a) + len(b) for a, b in zip(data["prompt_ids"], data["completion_ids"], strict=True))
    variants = {"full": [], f"lora r{args.rank}": [f"learner.lora.rank={args.rank}",
                                                     f"learner.lora.alpha={2 * args.rank}"]}
    ctx, results = mp.get_context("spawn"), {}
    for name, extra in variants.items():
        queue = ctx.Queue()
        child = ctx.Process(target=run_variant, args=([*base, *extra], data, args.group, args.warmup,
                                                      args.steps, queue))
        child.start()
        results[name] = queue.get()
        child.join()
        if child.exitcode:
            raise SystemExit(f"bench_lora: the {name} variant exited with status {child.exitcode}")
        print(f"[bench_lora] {name}: {results[name]}", flush=True)
    rows = []
    full = results["full"]
    for name, r in results.items():
        s = sum(r["seconds"]) / len(r["seconds"])
        s_full = sum(full["seconds"]) / len(full["seconds"])
        rows.append([name, r["precision"], f"{r['trainable']:,}", round(s, 2), round(tokens / s),
                     round(r["peak_bytes"] / 2**30, 2), round(s_full / s, 2),
                     round(r["peak_bytes"] / full["peak_bytes"], 2)])
    headers = ["variant", "precision", "trainable params", "s/step", "tok/s", "peak GiB",
               "speed vs full", "memory vs full"]
    title = (f"GRPO learner step, {args.prompts} x {args.group} completions at {args.max_new_tokens} tokens "
             f"({tokens} tokens), {'GPU' if on_gpu() else 'CPU'}")
    print_table(title, headers, rows)
    write_result(args.out, "bench_lora", {
        "title": title, "settings": vars(args) | {"data": str(args.data), "out": str(args.out)},
        "results": results, "table": {"headers": headers, "rows": rows},
        "ratios": {name: row[6] for name, row in zip(results, rows, strict=True)}, "targets": []})


if __name__ == "__main__":
    main()
