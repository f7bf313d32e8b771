"""Weight-sync time vs model size, and its share of a GRPO step.

    python scripts/bench_sync.py [--sizes 135m 360m] [--repeats 3] [--step-seconds S] [--quick]

For each model size a DeepSpeed `LearnerActor` and a vLLM `RolloutActor` start on this node as
the GRPO loop starts them, and the learner's weights are pushed to the engine as
`rlkd.actors.cluster.sync_weights` pushes them, timed in two parts:
  export: `Learner.export_weights` (parameters copied to CPU in the rollout dtype, serialised
          with safetensors to /dev/shm for `shm`, or to bytes put into Ray's object store for
          `bytes`, the cross-node transport);
  load:   `RolloutWorker.update_weights` (the engine reloads the tensors in place, tied lm_head
          re-processed, prefix cache reset), seen from the driver, so Ray's transfer of the
          bytes is included.
On a GPU machine the transport is NCCL (`Learner.send_weights_nccl`), timed as one figure.
`135m` is the embedded SmolLM2-135M-Instruct; `360m` and `1.7b` are randomly initialised
models with SmolLM2-360M's and SmolLM2-1.7B's shapes (weights do not change the sync cost).
The share of a step divides the 135m `shm` (or `nccl`) sync by rlkd's seconds per GRPO step
from --step-json (bench_grpo_step's result; its in-loop `time/sync` is reported too) or
--step-seconds. Target: sync <= 10% of a step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch
from bench_common import RESULTS_DIR, free_port, on_gpu, parser, print_table, target, write_result
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlkd.actors.cluster import init_ray
from rlkd.actors.learner import LearnerActor
from rlkd.actors.rollout import RolloutActor
from rlkd.compose import load_config
from rlkd.hardware import rollout_dtype
from rlkd.models import count_parameters, resolve_model

# SmolLM2 shapes: (hidden, intermediate, layers, heads, kv heads); vocab and tying as 135M.
SHAPES = {"360m": (960, 2560, 32, 15, 5), "1.7b": (2048, 8192, 24, 32, 32)}


def synthetic_model(base: str, size: str, dest: Path) -> str:
    """A random-init checkpoint of `size`'s shape with the base model's tokenizer."""
    hidden, inter, layers, heads, kv = SHAPES[size]
    config = AutoConfig.from_pretrained(base)
    config.update({"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hidden // heads})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return str(dest)


def time_sync(learner, rollout, transport: str, repeats: int) -> dict[str, float]:
    """Mean seconds of export, load and their total over `repeats` syncs after one warm-up."""
    runs = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        if transport == "nccl":
            ray.get(learner.send_weights_nccl.remote())
            run = {"total": time.perf_counter() - start}
        else:
            update = learner.export_weights.remote(transport)
            ray.wait([update], fetch_local=False)
            exported = time.perf_counter()
            ray.get(rollout.update_weights.remote(update))
            done = time.perf_counter()
            run = {"export": exported - start, "load": done - exported, "total": done - start}
        if r:  # the first sync warms caches and allocators
            runs.append(run)
    return {k: sum(run[k] for run in runs) / len(runs) for k in runs[0]}


def bench_size(cfg, model_path: str, transports: list[str], repeats: int, gpu: bool) -> dict[str, dict]:
    share = 0.5 if gpu else 0
    learner = LearnerActor.options(num_cpus=0, num_gpus=share).remote(cfg, model_path, master_port=free_port())
    rollout = RolloutActor.options(num_cpus=0, num_gpus=share).remote(
        model_path, max_model_len=cfg.model.max_model_len, dtype=rollout_dtype(cfg),
        enforce_eager=cfg.rollout.enforce_eager, kv_cache_gb=cfg.rollout.kv_cache_gb,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, use_gpu=gpu, seed=cfg.run.seed)
    try:
        ray.get(rollout.ready.remote())
        if gpu:
            ray.get(learner.init_nccl_sync.remote([rollout], free_port(), 2))
        return {t: time_sync(learner, rollout, t, repeats) for t in transports}
    finally:
        ray.get([learner.close.remote(), rollout.shutdown.remote()])
        ray.kill(learner)
        ray.kill(rollout)


def step_time(args) -> tuple[float | None, float | None, str]:
    """rlkd's seconds per GRPO step, its in-loop sync seconds, and where they came from."""
    if args.step_seconds:
        return args.step_seconds, None, "--step-seconds"
    path = args.step_json
    if path.is_file():
        rlkd = json.loads(path.read_text()).get("sides", {}).get("rlkd")
        if rlkd:
            return rlkd["step_s"], rlkd["phases_s"].get("sync"), str(path)
    return None, None, f"no step time ({path} missing; pass --step-seconds)"


def main() -> None:
    p = parser("bench_sync", __doc__)
    p.add_argument("--sizes", nargs="+", default=["135m", "360m"], choices=["135m", *SHAPES])
    p.add_argument("--repeats", type=int, default=3, help="timed syncs per size and transport")
    p.add_argument("--step-json", type=Path, default=RESULTS_DIR / "bench_grpo_step.json")
    p.add_argument("--step-seconds", type=float, default=0.0, help="rlkd s/step, instead of --step-json")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeats = ["135m"], 1
    gpu = on_gpu()
    extra = ["rollout.dtype=bfloat16", "learner.dtype=bfloat16", "learner.gpus=0.5",
             "rollout.gpus_per_actor=0.5"] if gpu else []
    cfg = load_config(None, extra)
    transports = ["nccl"] if gpu else ["shm", "bytes"]
    base = str(resolve_model(cfg.model.name))
    work = Path(tempfile.mkdtemp(prefix="rlkd-bench-sync-"))
    results: dict[str, dict] = {}
    init_ray(cfg)
    try:
        for size in args.sizes:
            path = base if size == "135m" else synthetic_model(base, size, work / size)
            params = count_parameters(path)
            results[size] = {"params": params, "transports": bench_size(cfg, path, transports, args.repeats, gpu)}
            if path != base:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    headers = ["model", "params (M)", "transport", "export s", "load s", "total s"]
    rows = [[size, r["params"] / 1e6, t, s.get("export", float("nan")), s.get("load", float("nan")), s["total"]]
            for size, r in results.items() for t, s in r["transports"].items()]
    title = f"weight sync: {rollout_dtype(cfg)} weights, {args.repeats} timed syncs each, {'GPU' if gpu else 'CPU'}"
    print_table(title, headers, rows)
    step_s, loop_sync_s, source = step_time(args)
    ratios, targets = {}, []
    if "135m" in results and step_s:
        sync_s = results["135m"]["transports"][transports[0]]["total"]
        ratios["sync/step (135m)"] = sync_s / step_s
        if loop_sync_s is not None:
            ratios["in-loop sync/step (135m)"] = loop_sync_s / step_s
        print_table(f"share of a GRPO step ({step_s:.1f} s, from {source})", ["ratio", "value"],
                    [[k, v] for k, v in ratios.items()])
        gap = (f"sync {sync_s:.2f} s of a {step_s:.1f} s step; export "
               f"{results['135m']['transports'][transports[0]].get('export', float('nan')):.2f} s, load "
               f"{results['135m']['transports'][transports[0]].get('load', float('nan')):.2f} s")
        targets.append(target("weight sync share of a step", ratios["sync/step (135m)"], "<= 10%",
                              ratios["sync/step (135m)"] <= 0.10, gap))
    else:
        print(f"\nshare of a step: {source}")
    write_result(args.out, "bench_sync", {
        "title": title,
        "settings": {"sizes": args.sizes, "repeats": args.repeats, "transports": transports,
                     "dtype": rollout_dtype(cfg), "step_seconds": step_s, "step_source": source,
                     "quick": args.quick, "device": "gpu" if gpu else "cpu"},
        "results": results,
        "table": {"headers": headers, "rows": rows},
        "ratios": ratios,
        "targets": targets,
    })


if __name__ == "__main__":
    main()
