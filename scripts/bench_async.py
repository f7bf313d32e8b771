"""Asynchronous rollouts: GRPO seconds per step and idle shares at rollout.max_staleness = 0, 1, 2.

    python scripts/bench_async.py [--ks 0 1 2 --steps 8 --warmup 2 --max-tokens 128] [--quick]

The peer is rlkd's own synchronous loop on the same work. Every setting runs
`python -m rlkd.train recipe=grpo_gsm8k` for --steps steps on the same GSM8K prompts (the
run seed fixes them), with the signal workload of bench_grpo_step.py (every group has reward
variance, so every step updates), no KL reference, no eval and no checkpoints, in the precision
`auto` picks on this machine (the same for every setting). The rollout engine is bound to core 0
and the learner to core 1 (`rollout.cpu_cores=[0] learner.cpu_cores=[1]`): on a 2-core machine
that is the one layout in which the two sides can overlap, as a rollout GPU and a learner GPU
would. `sync, both cores` is the default synchronous loop, each phase on both cores: what a user
of this machine gets without async.

Per setting: the median seconds per step over the steps after --warmup (min and max beside it),
the mean phase times (generate on the driver's thread, generate ahead on the background thread,
train, waiting for the generation ahead, weight sync), the learner's and the rollout's idle
shares of the step, and the mean staleness of the trained samples. Ratios: the pinned k=0's
s/step over each setting's. The projection at GPU scale (BENCHMARKS.md) is computed from these
phase times, not measured. Target: k=1 at least 1.3x faster per step than pinned k=0.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import REPO_ROOT, parser, print_table, target, write_result

PHASES = ["generate", "generate_ahead", "train", "wait_rollouts", "sync"]


def run(args, k: int | None, work: Path) -> dict:
    """One setting: k generation steps ahead, pinned; None is the unpinned synchronous loop."""
    run_dir = work / f"k{k}"
    overrides = [
        "recipe=grpo_gsm8k", f"data.path={args.data}", f"run.dir={run_dir}", f"trainer.max_steps={args.steps}",
        "trainer.eval_every=0", "trainer.save_every=0", "grpo.beta=0", "grpo.overlong=none",
        "grpo.dynamic_sampling=false", f"rollout.max_new_tokens={args.max_tokens}", "learner.lr=1e-6",
        "rewards.funcs=[scripts/bench_rewards.py:digit_share]", "rewards.weights=[1.0]",
    ]
    if k is not None:
        overrides += [f"rollout.max_staleness={k}", "rollout.cpu_cores=[0]", "learner.cpu_cores=[1]"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlkd.train", *overrides], cwd=REPO_ROOT)
    if proc.returncode:
        raise SystemExit(f"the k={k} run failed (exit {proc.returncode}); see its output above")
    total = time.perf_counter() - start
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = [r for r in rows if r["step"] > args.warmup]
    steps = [r["time/step"] for r in timed]
    return {
        "step_s": statistics.median(steps), "step_min_s": min(steps), "step_max_s": max(steps),
        "timed_steps": len(steps), "steps_s": [r["time/step"] for r in rows],
        "phases_s": {p: statistics.mean(r.get(f"time/{p}", 0.0) for r in timed) for p in PHASES},
        "learner_idle": statistics.mean(r.get("offpolicy/learner_idle_frac", float("nan")) for r in timed),
        "rollout_idle": statistics.mean(r.get("offpolicy/rollout_idle_frac", float("nan")) for r in timed),
        "staleness": statistics.mean(r.get("offpolicy/staleness_mean", 0.0) for r in timed),
        "completion_tokens": statistics.mean(r["completion/mean_tokens"] for r in timed),
        "startup_s": total - sum(r["time/step"] for r in rows),
    }


def main() -> None:
    p = parser("bench_async", __doc__)
    p.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (k > 0 fills its buffer)")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.max_tokens = 3, 1, 16
    if 0 not in args.ks:
        raise SystemExit("--ks must include 0: the pinned synchronous loop is the baseline of the ratios")
    with tempfile.TemporaryDirectory(prefix="rlkd-bench-async-") as tmp:
        results = {"sync, both cores": run(args, None, Path(tmp))}
        results |= {f"k={k}, pinned": run(args, k, Path(tmp)) for k in args.ks}
    base = results["k=0, pinned"]["step_s"]
    headers = ["setting", "s/step (median)", "min", "max", *[f"{p} s" for p in PHASES],
               "learner idle", "rollout idle", "staleness", "tokens"]
    rows = [[name, r["step_s"], r["step_min_s"], r["step_max_s"], *[r["phases_s"][p] for p in PHASES],
             r["learner_idle"], r["rollout_idle"], r["staleness"], r["completion_tokens"]] for name, r in results.items()]
    title = (f"GRPO s/step at rollout.max_staleness k, rollout on core 0 and learner on core 1 "
             f"({args.steps} steps, the first {args.warmup} untimed, {args.max_tokens} new tokens)")
    print_table(title, headers, rows)
    ratios = {f"pinned k=0 / {name}": base / r["step_s"] for name, r in results.items() if name != "k=0, pinned"}
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    one = results.get("k=1, pinned")
    targets = [target("async k=1 vs sync k=0, pinned (x faster per step)", base / one["step_s"] if one else None,
                      ">= 1.3x", base / one["step_s"] >= 1.3 if one else None,
                      "the overlap is bounded by the shorter side: generate ahead vs train + sync")]
    write_result(args.out, "bench_async", {
        "title": title, "settings": vars(args) | {"out": str(args.out), "data": str(args.data)},
        "results": results, "table": {"headers": headers, "rows": rows}, "ratios": ratios, "targets": targets})


if __name__ == "__main__":
    main()
