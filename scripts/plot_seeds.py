"""Overlay the curves of several runs of one recipe (seeds), one panel per metric.

    python scripts/plot_seeds.py runs/grpo_l0 runs/grpo_l1 runs/grpo_l2 --out docs/mawps_grpo_seeds.png \
        [--keys reward/total_mean,eval/accuracy,completion/mean_tokens] [--title ...]

Each run is a line labelled by its run.seed (from config.yaml, else its directory name); a
per-step metric is drawn as a running mean over --smooth steps, an eval metric point by point
(a held-out accuracy with its 95% interval as error bars). One seed can look like a result;
the spread across seeds is what tells whether it is one.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rlkd.tracking import read_metrics, running_mean  # noqa: E402

DEFAULT_KEYS = "reward/total_mean,eval/accuracy,completion/mean_tokens"


def label(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if config.is_file():
        seed = (yaml.safe_load(config.read_text()) or {}).get("run", {}).get("seed")
        if seed is not None:
            return f"seed {seed}"
    return run_dir.name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--keys", default=DEFAULT_KEYS, help="comma-separated metrics, one panel each")
    p.add_argument("--smooth", type=int, default=5, help="steps in the running mean of per-step metrics")
    p.add_argument("--title", default="")
    args = p.parse_args()
    histories = {}
    for run in args.runs:
        rows = read_metrics(run / "metrics.jsonl")
        if not rows:
            raise SystemExit(f"{run / 'metrics.jsonl'}: missing or empty (is {run} a run directory?)")
        histories[run] = rows
    keys = [k for k in args.keys.split(",") if k and any(k in r for rows in histories.values() for r in rows)]
    if not keys:
        raise SystemExit(f"--keys {args.keys}: none of them is logged by these runs")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for run, rows in histories.items():
            pts = [r for r in rows if key in r]
            steps, values = [r["step"] for r in pts], [r[key] for r in pts]
            if pts and all(f"{key}_ci_low" in r for r in pts):
                err = [[v - r[f"{key}_ci_low"] for v, r in zip(values, pts, strict=True)],
                       [r[f"{key}_ci_high"] - v for v, r in zip(values, pts, strict=True)]]
                ax.errorbar(steps, values, yerr=err, marker="o", ms=4, capsize=3, label=label(run))
            elif key.startswith("eval/"):  # a few evals: a running mean would blend them
                ax.plot(steps, values, marker="o", ms=4, lw=1.6, label=label(run))
            else:
                ax.plot(steps, running_mean(values, args.smooth), lw=1.6, label=label(run))
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(args.title or f"{len(histories)} runs")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
