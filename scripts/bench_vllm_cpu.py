"""vLLM's CPU settings, measured: dtype, OpenMP thread binding and preloaded allocators.

    python scripts/bench_vllm_cpu.py [--dtypes float32 bfloat16] [--binds auto nobind] [--preload] [--quick]

vLLM's CPU start-up suggests two things: binding its OpenMP threads to cores
(`VLLM_CPU_OMP_THREADS_BIND`, `auto` by default in vllm-cpu 0.32, which pins one thread per
physical core of the first NUMA node) and preloading libtcmalloc and Intel's libiomp
(`LD_PRELOAD`). Both are read when the engine starts, so each variant runs in a fresh child
process with its environment set before vLLM is imported, on two batches rlkd actually runs:

  step: a GRPO step's rollout, 2 GSM8K prompts x 8 samples, T=1, at most 128 tokens, with
        per-token logprobs (what `RolloutActor.generate` asks for);
  eval: a greedy evaluation batch, 32 prompts, at most 384 tokens.

tokens/s is completion tokens over wall time after one untimed warm-up call. The engine
is built as `scripts/bench_rollout.py` builds it (rlkd's RolloutWorker settings). The first
variant (the first dtype with vLLM's default `auto` binding, which rlkd leaves as it is, and no
preload) is the baseline every ratio is against. bfloat16 is only measured where the CPU has avx512_bf16 or amx_bf16
(`rlkd/hardware.py`); elsewhere vLLM would emulate it.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import gsm8k_prompts, parser, print_table, write_result

from rlkd.hardware import cpu_bf16_flags

STEP = {"prompts": 2, "n": 8, "max_tokens": 128, "temperature": 1.0, "logprobs": 0}
EVAL = {"prompts": 32, "n": 1, "max_tokens": 384, "temperature": 0.0, "logprobs": None}


def preload_libs() -> list[str]:
    """libtcmalloc and libiomp5 where this machine has them (the venv ships libiomp5 with torch)."""
    venv_lib = Path(sys.prefix) / "lib"
    libs = []
    for names in (("tcmalloc_minimal", "tcmalloc"), ("iomp5",)):
        for name in names:
            local = venv_lib / f"lib{name}.so"
            found = str(local) if local.exists() else ctypes.util.find_library(name)
            if found:
                libs.append(found)
                break
    return libs


def child(variant: dict, data: Path, quick: bool) -> dict:
    """Runs in a fresh process: one engine, the two batches, tokens/s of each."""
    # Imported here, after the parent set this process's environment: vLLM reads it at start-up.
    import vllm
    from bench_rollout import engine_kwargs
    from transformers import AutoTokenizer

    from rlkd.compose import load_config
    from rlkd.models import resolve_model

    cfg = load_config(None, [f"rollout.dtype={variant['dtype']}"])
    model_path = str(resolve_model(cfg.model.name))
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.kv_cache_gb)  # as RolloutWorker sets it
    start = time.perf_counter()
    llm = vllm.LLM(model_path, **engine_kwargs(cfg, gpu=False))
    startup_s = time.perf_counter() - start
    prompts, _ = gsm8k_prompts(AutoTokenizer.from_pretrained(model_path), data, EVAL["prompts"])
    out = {"startup_s": startup_s}
    try:
        llm.generate(prompts[:2], vllm.SamplingParams(max_tokens=8, seed=0), use_tqdm=False)
        for name, batch in (("step", STEP), ("eval", EVAL)):
            batch = dict(batch, max_tokens=16) if quick else batch
            params = vllm.SamplingParams(n=batch["n"], max_tokens=batch["max_tokens"], top_p=1.0,
                                         temperature=batch["temperature"], seed=0, logprobs=batch["logprobs"])
            start = time.perf_counter()
            outputs = llm.generate(prompts[:batch["prompts"]], params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
            out[name] = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
    finally:
        llm.llm_engine.engine_core.shutdown()
    return out


def run_variant(variant: dict, args) -> dict:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=variant["bind"])
    if variant["preload"]:
        env["LD_PRELOAD"] = ":".join([*variant["preload"], env.get("LD_PRELOAD", "")]).rstrip(":")
    cmd = [sys.executable, __file__, "--child", json.dumps(variant), "--data", str(args.data)]
    if args.quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"bench_vllm_cpu: variant {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = parser("bench_vllm_cpu", __doc__)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--binds", nargs="+", default=["auto", "nobind"],
                   help="VLLM_CPU_OMP_THREADS_BIND values ('auto', 'nobind' or a core list like 0-1)")
    p.add_argument("--preload", action="store_true",
                   help="also run the first dtype with `auto` binding and libtcmalloc/libiomp5 preloaded")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child), args.data, args.quick)), flush=True)
        return

    has_bf16 = bool(cpu_bf16_flags())
    dtypes = [d for d in args.dtypes if d != "bfloat16" or has_bf16]
    if len(dtypes) < len(args.dtypes):
        print("bench_vllm_cpu: this CPU has neither avx512_bf16 nor amx_bf16; bfloat16 left out")
    variants = [{"dtype": d, "bind": b, "preload": []} for d in dtypes for b in args.binds]
    if args.preload:
        libs = preload_libs()
        if libs:
            variants.append({"dtype": dtypes[0], "bind": args.binds[0], "preload": libs})
        else:
            print("bench_vllm_cpu: neither libtcmalloc nor libiomp5 found; --preload left out")

    rows, results = [], []
    for i, variant in enumerate(variants):
        label = f"{variant['dtype']}, bind={variant['bind']}" + (
            ", preload=" + "+".join(Path(lib).name for lib in variant["preload"]) if variant["preload"] else "")
        print(f"[{i + 1}/{len(variants)}] {label} ...", flush=True)
        res = run_variant(variant, args)
        results.append({"variant": variant, "label": label, **res})
        base = results[0]
        rows.append([label, res["startup_s"], res["step"]["tok_s"], res["step"]["tok_s"] / base["step"]["tok_s"],
                     res["eval"]["tok_s"], res["eval"]["tok_s"] / base["eval"]["tok_s"]])
    headers = ["variant", "start-up s", "step tok/s", "step x", "eval tok/s", "eval x"]
    title = ("vLLM CPU settings: step = 2 prompts x 8, T=1, 128 tokens, logprobs; "
             "eval = 32 prompts, greedy, 384 tokens")
    print_table(title, headers, rows)
    best = max(results, key=lambda r: r["step"]["tok_s"])
    gain = best["step"]["tok_s"] / results[0]["step"]["tok_s"]
    write_result(args.out, "bench_vllm_cpu", {
        "title": title,
        "settings": {"step": STEP, "eval": EVAL, "quick": args.quick, "variants": variants},
        "table": {"headers": headers, "rows": rows},
        "results": results,
        "ratios": {"best step batch / rlkd's setting": gain},
    })


if __name__ == "__main__":
    main()
