"""Print a GRPO run's step-time split and reward trend from its metrics.jsonl.

    python scripts/summarize_run.py runs/grpo_gsm8k-20261123-120000 [--skip-first 1]

The first step includes one-off warm-up, so --skip-first leaves it out of the timing means.
"""

import argparse
import json
from pathlib import Path

PHASES = ["generate", "reward", "train", "sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip-first", type=int, default=1, help="warm-up steps left out of timing")
    args = parser.parse_args()
    path = args.run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no such file (is {args.run_dir} a run directory?)")
    # Step 0 holds only the untrained policy's eval.
    rows = [r for line in path.read_text().splitlines() if line.strip() and "time/step" in (r := json.loads(line))]
    timed = rows[args.skip_first:] or rows
    step = sum(r["time/step"] for r in timed) / len(timed)
    print(f"{len(rows)} steps; timing over steps {timed[0]['step']}..{timed[-1]['step']}")
    print(f"{'phase':<10}{'s/step':>9}{'share':>8}")
    for phase in PHASES:
        mean = sum(r.get(f"time/{phase}", 0.0) for r in timed) / len(timed)
        print(f"{phase:<10}{mean:>9.2f}{mean / step:>8.1%}")
    print(f"{'total':<10}{step:>9.2f}")
    tokens = sum(r["completion/mean_tokens"] for r in timed) / len(timed)
    tps = sum(r["rollout/tokens_per_s"] for r in timed) / len(timed)
    print(f"mean completion {tokens:.1f} tokens; rollout {tps:.0f} tokens/s")
    rewards = [r["reward/total_mean"] for r in rows]
    k = max(1, min(3, len(rewards) // 2))
    print(f"reward: first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f}")


if __name__ == "__main__":
    main()
