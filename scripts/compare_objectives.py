"""Short GRPO runs, one per objective, on the same seeds: the train reward per step in one PNG.

    python scripts/compare_objectives.py [--steps 8] [--objectives grpo gspo cispo rloo]
                                         [--out docs/objectives.png] [key=value ...]

Every run trains the embedded model on the arithmetic word problems of `rlkd/datasets/arith`
(GSM8K's format, solved well below the ceiling at the start) with the learning test's settings:
correctness reward, dynamic sampling, overlong masking, lr 1e-5, T 0.7, 4 prompts x 8
completions of at most 128 tokens, and one `run.seed`, so every objective draws the same first
batch. Objectives (`grpo.loss`, `grpo.adv_estimator`):
  grpo   the clipped token-level surrogate (the default);
  gspo   the sequence-level geometric-mean ratio with the paper's clip 3e-4 / 4e-4 and
         sequence-mean aggregation (Zheng et al. 2025);
  cispo  the clipped stop-gradient weight on log p, no lower clip (clip_low=1; MiniMax-M1 2025);
  rloo   the GRPO surrogate with the leave-one-out baseline (Ahmadian et al. 2024).
Runs already complete in --runs are read, not rerun. Prints each objective's mean reward over
the second half of the steps and its seconds per step; the PNG shows the per-step rewards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = {
    "grpo": [],
    "gspo": ["grpo.loss=gspo", "grpo.clip_low=3e-4", "grpo.clip_high=4e-4", "grpo.loss_agg=seq_mean_token_mean"],
    "cispo": ["grpo.loss=cispo", "grpo.clip_low=1.0"],
    "rloo": ["grpo.adv_estimator=rloo"],
}
SHARED = ["data.name=arith", "trainer.eval_every=0", "trainer.save_every=0",
          "trainer.save_state=false", "rollout.max_new_tokens=128", "rollout.temperature=0.7",
          "rollout.kv_cache_gb=1", "grpo.prompts_per_step=4", "grpo.dynamic_sampling=true",
          "grpo.overlong=mask", "rewards.funcs=[gsm8k_correct]", "rewards.weights=[1.0]",
          "learner.lr=1e-5", "run.seed=0"]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "objectives")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "objectives.png")
    p.add_argument("overrides", nargs="*", help="rlkd config overrides for every run, key=value")
    args = p.parse_args()
    curves = {}
    for name in args.objectives:
        run_dir = args.runs / name
        rows = [m for m in metrics(run_dir) if "reward/total_mean" in m]
        if len(rows) < args.steps:
            cmd = [sys.executable, "-m", "rlkd.train", *SHARED, *OBJECTIVES[name], *args.overrides,
                   f"trainer.max_steps={args.steps}", f"run.dir={run_dir}"]
            print(f"[compare_objectives] {name}: {' '.join(cmd[3:])}", flush=True)
            subprocess.run(cmd, cwd=REPO_ROOT, check=True)
            rows = [m for m in metrics(run_dir) if "reward/total_mean" in m]
        curves[name] = rows
    print(f"\n{'objective':<10} {'reward, steps 1-' + str(args.steps // 2):>18} "
          f"{'reward, later steps':>20} {'s/step':>8}")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        steps, rewards = [m["step"] for m in rows], [m["reward/total_mean"] for m in rows]
        half = len(rewards) // 2
        s_step = sum(m["time/step"] for m in rows) / len(rows)
        print(f"{name:<10} {sum(rewards[:half]) / max(half, 1):>18.3f} "
              f"{sum(rewards[half:]) / max(len(rewards) - half, 1):>20.3f} {s_step:>8.1f}")
        ax.plot(steps, rewards, marker="o", label=name)
    ax.set(xlabel="step", ylabel="mean train reward (sampled, T 0.7)", ylim=(0, None),
           title=f"GRPO objectives on rlkd/datasets/arith, same seed, {args.steps} steps")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
