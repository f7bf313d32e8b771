"""GRPO seconds per step: rlkd (Ray + vLLM + DeepSpeed) vs TRL's `GRPOTrainer`, same work.

    python scripts/bench_grpo_step.py [--steps 6 --group-size 8 --prompts-per-step 2
                                       --max-tokens 128] [--side both|rlkd|trl] [--quick]
                                      [--workloads real,signal] [--dtype float32|bfloat16]

Both sides train the same model (rlkd's embedded SmolLM2-135M-Instruct) in the same precision
(--dtype: float32 by default on CPU, where both run fp32 end to end; bfloat16 is rlkd's bf16
vLLM plus its `learner.dtype=autocast_bf16` learner, bf16 autocast over fp32 weights and
optimizer state, which is what `learner.dtype=auto` gives users on a bf16-capable machine,
against TRL's `bf16=True` over fp32 weights, the same autocast; GPU runs bfloat16) on the
same question pool (the first
prompts_per_step * steps GSM8K train questions, written to a temporary train.jsonl both sides
read; each shuffles it its own way), rendered by `rlkd.data.build_prompt`, with the same
rewards and:

  workload  rewards (weights)                                    what it measures
  real      rewards.gsm8k_correct 1.0, format_answer_line 0.2   rlkd's defaults: most groups
                                                                 of this model carry no signal
  signal    scripts/bench_rewards.py:digit_share 1.0             every group has reward variance

  rlkd key                       TRL GRPOConfig                       value
  grpo.group_size                num_generations                      --group-size (8)
  grpo.prompts_per_step          generation_batch_size / group size   --prompts-per-step (2)
  rollout.max_new_tokens         max_completion_length                --max-tokens (128)
  learner.lr (constant)          learning_rate, lr_scheduler_type     --lr (1e-6), constant
  learner.micro_batch_size       per_device_train_batch_size          8; gradient accumulation
                                 gradient_accumulation_steps          covers one rollout batch
  grpo.clip_low / clip_high      epsilon / epsilon_high               0.2 / 0.28
  grpo.loss_agg=token_mean       loss_type="dapo"                     token mean over the batch
  grpo.adv_scale=group           scale_rewards="group"
  grpo.beta=0                    beta=0.0                             no reference model
  grpo.ppo_epochs=1              num_iterations=1                     one optimizer step per batch
  rollout.temperature / top_p    temperature / top_p (top_k=0)        1.0 / 1.0
  learner.max_grad_norm          max_grad_norm                        1.0

rlkd runs `python -m rlkd.train` at its defaults with the keys above (its own Ray instance, a vLLM rollout actor, a DeepSpeed
learner; no eval, no periodic checkpoints) and reads `time/step` from metrics.jsonl. TRL runs
in this process with HF `generate` on CPU and its colocated vLLM on GPU; a TrainerCallback takes
the wall time between optimizer steps, and the time in `_generate_and_score_completions`
(generation, rewards, advantages) is split out. The first --warmup steps (compilation, caches,
allocator growth) are left out; each side reports the median of the timed steps (the
headline figure and the ratio) with their min and max, and the mean in the JSON. Time outside the steps (start-up; for rlkd also
the final checkpoint and shutdown) is reported apart. Completion tokens are counted the same
way on both sides, from the tokens each trained on (rlkd: `completion/mean_tokens`; TRL: its
`completion_mask`, EOS included, as vLLM's token ids include it); TRL's own
`completions/mean_length` log is kept in the JSON beside it. Targets on CPU: rlkd at least 5x
faster per step than TRL on the real workload, at least 2.5x on the signal one.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import REPO_ROOT, gsm8k_prompts, on_gpu, parser, print_table, target, write_result
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rewards import load_reward
from rlkd.models import resolve_model

MICRO_BATCH = 8
# workload -> (rewards.funcs specs, which TRL gets through rlkd's own loader; weights; speed-up goal)
WORKLOADS = {
    "real": (["gsm8k_correct", "format_answer_line"], [1.0, 0.2], 5.0),
    "signal": ([f"{REPO_ROOT / 'scripts' / 'bench_rewards.py'}:digit_share"], [1.0], 2.5),
}


def question_pool(data_dir: Path, count: int, dest: Path) -> Path:
    """The first `count` rows of GSM8K train, as a train.jsonl both sides load."""
    src = data_dir / "train.jsonl"
    if not src.is_file():
        raise SystemExit(f"{src}: no such file; pass --data <dir holding train.jsonl>")
    dest.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as f:
        rows = [line for line in f if line.strip()][:count]
    (dest / "train.jsonl").write_text("".join(rows))
    return dest


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def spread(timed: list[float]) -> dict:
    """Median (the headline), min, max and mean of the timed steps' seconds."""
    return {"step_s": statistics.median(timed), "step_min_s": min(timed), "step_max_s": max(timed),
            "step_mean_s": mean(timed), "timed_steps": len(timed)}


def run_rlkd(args, workload: str, data_dir: Path, work: Path, gpu: bool) -> dict:
    run_dir = work / f"rlkd-run-{workload}"
    funcs, weights, _ = WORKLOADS[workload]
    overrides = [
        f"data.path={data_dir}", f"run.dir={run_dir}",
        f"trainer.max_steps={args.steps}", "trainer.eval_every=0", "trainer.save_every=0",
        f"grpo.group_size={args.group_size}", f"grpo.prompts_per_step={args.prompts_per_step}",
        f"rollout.max_new_tokens={args.max_tokens}", f"learner.lr={args.lr}",
        f"learner.micro_batch_size={MICRO_BATCH}", f"rewards.funcs=[{','.join(funcs)}]",
        f"rewards.weights=[{','.join(map(str, weights))}]",
        # The learner's bf16 is autocast over fp32 weights, as TRL's bf16=True (and rlkd's default).
        f"rollout.dtype={args.dtype}", f"learner.dtype={'autocast_bf16' if args.dtype == 'bfloat16' else 'float32'}",
    ]
    if gpu:
        share = 1 if torch.cuda.device_count() > 1 else 0.5
        overrides += [f"rollout.gpus_per_actor={share}", f"learner.gpus={share}"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlkd.train", *overrides], cwd=REPO_ROOT)
    total = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"rlkd run failed (exit {proc.returncode}); see its output above")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = rows[args.warmup:]
    return {
        **spread([r["time/step"] for r in timed]),
        "steps_s": [r["time/step"] for r in rows],
        "phases_s": {p: mean([r.get(f"time/{p}", 0.0) for r in timed])
                     for p in ("generate", "reward", "train", "sync")},
        "completion_tokens": mean([r["completion/mean_tokens"] for r in timed]),
        "frac_zero_std_groups": mean([r.get("adv/frac_zero_std_groups", float("nan")) for r in timed]),
        "startup_s": total - sum(r["time/step"] for r in rows),
    }


class StepClock(TrainerCallback):
    """Wall time of each optimizer step, from the end of the previous one."""

    def __init__(self):
        self.last = 0.0
        self.steps_s: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.steps_s.append(now - self.last)
        self.last = now


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records the time and the completion tokens of each generate-and-score
    phase, and the fraction of its groups whose rewards do not differ."""

    generate_s: list[float]
    tokens_per_row: list[float]
    zero_std: list[float]

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.generate_s.append(time.perf_counter() - start)
        mask_BT = out["completion_mask"]
        self.tokens_per_row.append(mask_BT.sum().item() / mask_BT.shape[0])
        # Advantages are (r - group mean) / group std, so a group with equal rewards is all 0.
        adv_PG = out["advantages"].reshape(-1, self.num_generations)
        self.zero_std.append((adv_PG == 0).all(dim=1).float().mean().item())
        return out


def run_trl(args, workload: str, data_dir: Path, work: Path, gpu: bool) -> dict:
    start = time.perf_counter()
    model_path = str(resolve_model("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    prompts, answers = gsm8k_prompts(tokenizer, data_dir, args.prompts_per_step * args.steps)
    batch = args.prompts_per_step * args.group_size
    specs, weights, _ = WORKLOADS[workload]
    bf16 = args.dtype == "bfloat16"
    config = GRPOConfig(
        output_dir=str(work / f"trl-out-{workload}"), max_steps=args.steps, seed=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=max(1, batch // MICRO_BATCH),
        num_generations=args.group_size, max_completion_length=args.max_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, epsilon_high=0.28,
        loss_type="dapo", scale_rewards="group", num_iterations=1, reward_weights=weights,
        use_cpu=not gpu, bf16=bf16, use_vllm=gpu, vllm_mode="colocate",
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    # fp32 weights, under bf16 autocast with bf16=True: the precision of rlkd's learner.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    clock = StepClock()
    trainer = TimedGRPOTrainer(
        model=model, reward_funcs=[load_reward(spec) for spec in specs], args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts, "answer": answers}),
        processing_class=tokenizer, callbacks=[clock])
    trainer.generate_s, trainer.tokens_per_row, trainer.zero_std = [], [], []
    startup = time.perf_counter() - start
    trainer.train()
    timed = clock.steps_s[args.warmup:]
    gen = mean(trainer.generate_s[args.warmup:])
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        **spread(timed),
        "steps_s": clock.steps_s,
        "phases_s": {"generate+score": gen, "train": mean(timed) - gen},
        "completion_tokens": mean(trainer.tokens_per_row[args.warmup:]),
        "trl_logged_mean_length": mean(lengths[args.warmup:]),
        "frac_zero_std_groups": mean(trainer.zero_std[args.warmup:]),
        "startup_s": startup,
    }


def main() -> None:
    p = parser("bench_grpo_step", __doc__)
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per side (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the mean")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--side", choices=["both", "rlkd", "trl"], default="both")
    p.add_argument("--workloads", default="real,signal",
                   help=f"comma-separated, of {', '.join(WORKLOADS)} (see the docstring)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="precision of both sides (default float32 on CPU, bfloat16 on GPU)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.group_size, args.prompts_per_step, args.max_tokens = 2, 4, 2, 16
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"--workloads: unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
    gpu = on_gpu()
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    work = Path(tempfile.mkdtemp(prefix="rlkd-bench-grpo-"))
    results: dict[str, dict] = {}
    try:
        data_dir = question_pool(args.data, args.prompts_per_step * args.steps, work / "data")
        for w in workloads:
            sides = results.setdefault(w, {})
            if args.side in ("both", "rlkd"):
                sides["rlkd"] = run_rlkd(args, w, data_dir, work, gpu)
            if args.side in ("both", "trl"):
                sides["trl"] = run_trl(args, w, data_dir, work, gpu)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    headers = ["workload", "side", "s/step (median)", "min", "max", "phases (mean s/step)", "completion tokens",
               "zero-variance groups", "outside steps s"]
    rows = [[w, name, r["step_s"], r["step_min_s"], r["step_max_s"], ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items()),
             r["completion_tokens"], r["frac_zero_std_groups"], r["startup_s"]]
            for w, sides in results.items() for name, r in sides.items()]
    batch = f"{args.prompts_per_step}x{args.group_size} completions x {args.max_tokens} tokens"
    title = (f"GRPO step: {batch}, {args.dtype} on both sides, {args.steps} steps ({args.warmup} warm-up), "
             f"{'GPU' if gpu else 'CPU'}")
    print_table(title, headers, rows)
    ratios, targets = {}, []
    for w, sides in results.items():
        if len(sides) != 2:
            continue
        r, t = sides["rlkd"], sides["trl"]
        speedup = t["step_s"] / r["step_s"]
        goal = WORKLOADS[w][2]
        ratios[f"trl_s/rlkd_s ({w})"] = speedup
        gap = (f"rlkd {r['step_s']:.1f} s/step vs TRL {t['step_s']:.1f}: rlkd spends "
               f"{r['phases_s']['generate']:.1f} s generating and {r['phases_s']['train']:.1f} s training, "
               f"TRL {t['phases_s']['generate+score']:.1f} s generating+scoring and "
               f"{t['phases_s']['train']:.1f} s training; mean completions {r['completion_tokens']:.0f} vs "
               f"{t['completion_tokens']:.0f} tokens")
        targets.append(target(f"GRPO step speed-up over TRL, {w} workload, {args.dtype}", speedup,
                              f">= {goal:g}x", speedup >= goal, gap))
    if ratios:
        print_table("ratios", ["ratio", "value"], [[k, v] for k, v in ratios.items()])
    write_result(args.out, "bench_grpo_step", {
        "title": title,
        "settings": {"steps": args.steps, "warmup": args.warmup, "group_size": args.group_size,
                     "prompts_per_step": args.prompts_per_step, "max_tokens": args.max_tokens,
                     "lr": args.lr, "quick": args.quick, "device": "gpu" if gpu else "cpu",
                     "dtype": args.dtype, "workloads": workloads},
        # The real workload's sides, as bench_sync reads them (its rlkd s/step).
        "sides": results.get("real", next(iter(results.values()), {})),
        "workloads": results,
        "table": {"headers": headers, "rows": rows},
        "ratios": ratios,
        "targets": targets,
    })


if __name__ == "__main__":
    main()
