"""Run directory, metrics (jsonl + TensorBoard), timers and end-of-run plots."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are written to PNG, never shown
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from rlkd.compose import to_yaml  # noqa: E402
from rlkd.config import Config  # noqa: E402


def make_run_dir(cfg: Config, recipe: str | None) -> Path:
    """runs/<name>-<timestamp>/ (or run.dir) holding the resolved config.yaml."""
    if cfg.run.dir:
        run_dir = Path(cfg.run.dir)
    else:
        name = cfg.run.name or recipe or cfg.task.value
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.out_dir) / f"{name}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


INTERRUPT_AT = "RLKD_INTERRUPT_AT"
"""Fault injection for the Ctrl-C tests: `phase:step` (e.g. `train:3`) sends SIGINT to the
process group, as a terminal's Ctrl-C does, when that timed phase of that step begins."""


class Timer:
    """Named wall-clock sections of one step: `with timer("generate"): ...`."""

    def __init__(self, step: int = 0):
        self.step = step
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if os.environ.get(INTERRUPT_AT) == f"{name}:{self.step}":
            os.killpg(os.getpgrp(), signal.SIGINT)
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


class Tracker:
    """Appends one JSON object per step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        """`purge_step`: a resumed run hides TensorBoard events the dead run logged from there on."""
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in clean.items():
            if math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SMOOTH_FROM = 8  # points in a panel from which a running mean is drawn over the raw values


def running_mean(values: list[float], w: int) -> list[float]:
    """Mean of each value and the up to w - 1 before it."""
    return [sum(values[max(0, i - w + 1):i + 1]) / len(values[max(0, i - w + 1):i + 1]) for i in range(len(values))]


def plot_curves(metrics_path: Path, keys: list[str], out: Path, title: str) -> Path | None:
    """One panel per key (steps on x); keys absent from every row are left out. A key logged
    with `<key>_ci_low`/`_ci_high` (accuracies) gets its 95% interval as error bars; a long
    noisy series gets a running mean over a tenth of its points, drawn over the raw values."""
    rows = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        pts = [(r["step"], r[key], r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")) for r in rows if key in r]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        if all(p[2] is not None and p[3] is not None for p in pts):
            err = [[v - p[2] for v, p in zip(values, pts, strict=True)], [p[3] - v for v, p in zip(values, pts, strict=True)]]
            ax.errorbar(steps, values, yerr=err, marker="o", ms=4, capsize=3, label="95% CI")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        elif len(pts) >= SMOOTH_FROM:
            w = max(3, len(pts) // 10)
            mean = running_mean(values, w)
            ax.plot(steps, values, alpha=0.35, lw=1, label="per step")
            ax.plot(steps, mean, lw=2, label=f"mean of last {w}")
            ax.legend(fontsize=7)
        else:
            ax.plot(steps, values, marker="o", ms=3)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
