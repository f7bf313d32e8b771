"""Check GRPO runs (one per seed) against the main job's no-collapse criteria, per seed and all.

    python scripts/check_main_job.py runs/main_s0 runs/main_s1 runs/main_s2 [--reasoning arithmetic_steps]

The criteria (issue 30; the README's main-job table comes from this script):
  1. length:    the held-out mean completion length never falls below half of step 0's;
  2. reasoning: no 10-step mean of the reasoning reward falls below its steps 1-10 mean;
  3. accuracy:  held-out correctness at the last eval is not significantly below step 0's
                (exact McNemar on the same questions, one-sided reading of p < 0.05 with
                fewer right at the end).
Each run directory needs metrics.jsonl and eval/step-N/predictions.jsonl (what rlkd.train
writes); the exit code is 1 when a criterion fails on any run, so a CI or a sweep can use it.
"""

import argparse
import sys
from pathlib import Path

from rlkd.scoring import read_predictions
from rlkd.stats import mcnemar_exact, wilson_interval
from rlkd.tracking import read_metrics

WINDOW = 10


def predictions(run: Path, step: int) -> dict[str, bool]:
    path = run / "eval" / f"step-{step}" / "predictions.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no held-out predictions (was the run evaluated at step {step}?)")
    return read_predictions(path)


def check(run: Path, reasoning: str) -> tuple[dict, list[str]]:
    rows = read_metrics(run / "metrics.jsonl")
    if not rows:
        raise SystemExit(f"{run}: no metrics.jsonl (is it a run directory?)")
    evals = {r["step"]: r for r in rows if "eval/mean_completion_tokens" in r}
    if 0 not in evals or len(evals) < 2:
        raise SystemExit(f"{run}: needs held-out evals at step 0 and later, found steps {sorted(evals)}")
    key = f"reward/{reasoning}"
    trained = [r for r in rows if key in r]
    if len(trained) < WINDOW:
        raise SystemExit(f"{run}: {len(trained)} steps logged {key}; need at least {WINDOW}")
    blocks = [[r[key] for r in trained[i:i + WINDOW]] for i in range(0, len(trained), WINDOW)]
    means = [sum(b) / len(b) for b in blocks]
    lengths = {s: e["eval/mean_completion_tokens"] for s, e in sorted(evals.items())}
    last = max(evals)
    first, final = predictions(run, 0), predictions(run, last)
    if first.keys() != final.keys():
        raise SystemExit(f"{run}: the evals at steps 0 and {last} scored different questions")
    ids = sorted(first)
    test = mcnemar_exact([first[i] for i in ids], [final[i] for i in ids])
    failures = []
    if min(lengths.values()) < 0.5 * lengths[0]:
        failures.append(f"length {min(lengths.values()):.1f} < half of step 0's {lengths[0]:.1f}")
    if min(means[1:], default=means[0]) < means[0]:
        failures.append(f"{reasoning} 10-step mean {min(means[1:]):.3f} < steps 1-10's {means[0]:.3f}")
    if test["b10"] > test["b01"] and test["p_value"] < 0.05:
        failures.append(f"held-out correct fell {sum(first.values())} -> {sum(final.values())}, p = {test['p_value']:.3g}")
    summary = {"run": str(run), "steps": trained[-1]["step"], "lengths": lengths, "means": means,
               "correct": (sum(first.values()), sum(final.values()), len(ids)), "last": last, "test": test}
    return summary, failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="run directories, one per seed")
    p.add_argument("--reasoning", default="arithmetic_steps", help="the reasoning reward of criterion 2")
    args = p.parse_args()
    failed = False
    for run in args.runs:
        s, failures = check(run, args.reasoning)
        k0, k1, n = s["correct"]
        lo0, hi0 = wilson_interval(k0, n)
        lo1, hi1 = wilson_interval(k1, n)
        print(f"{run}: {s['steps']} steps")
        print("  held-out mean tokens by step: " + ", ".join(f"{st}: {v:.1f}" for st, v in s["lengths"].items()))
        print(f"  {args.reasoning} 10-step means: " + ", ".join(f"{m:.3f}" for m in s["means"]))
        print(f"  held-out correct: step 0 {k0}/{n} [{lo0:.1%}, {hi0:.1%}] -> step {s['last']} {k1}/{n} "
              f"[{lo1:.1%}, {hi1:.1%}], gained {s['test']['b01']} lost {s['test']['b10']}, p = {s['test']['p_value']:.3g}")
        print("  " + ("FAIL: " + "; ".join(failures) if failures else "pass: all three criteria hold"))
        failed |= bool(failures)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
