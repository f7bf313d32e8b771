"""The distillation study's report: one table per seed, figures, and the checks behind them.

Pure functions over what the stages wrote (`metrics.json` and `predictions.jsonl` of each
evaluation, `filter_report.json` of each training set, `metrics.jsonl` of each training run),
so the report can be rebuilt, and tested, without running anything. `rlkd.tasks.study` decides which
rows exist; this module only reads and formats.

The arithmetic check reads every `a op b = c` claim in a rationale and recomputes it
(`rlkd.arithmetic_claims`).
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to PNG, never shown
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from rlkd.arithmetic_claims import arithmetic_errors  # noqa: E402
from rlkd.stats import mcnemar_exact  # noqa: E402

# --- reading a study's outputs -----------------------------------------------------------------


@dataclass
class Row:
    """One model of the study and where its outputs are."""

    key: str
    """The variant (`cot_correct`, `int4`, ...), or `int4_ref` for int4's fp32 reference."""
    label: str
    """What the model is, for the table."""
    eval_dir: Path
    """Holds metrics.json and predictions.jsonl."""
    engine: str
    """What generated its answers (vLLM or transformers, and the weight format)."""
    data: Path | None = None
    """Directory holding filter_report.json of its training data; None: trained on none."""
    data_note: str = "none"
    """The training-data cell when there is no filter report, or a prefix to it."""
    curves: Path | None = None
    """metrics.jsonl of its training run."""
    curve_kind: str = ""
    """Which training-curve panel it belongs to: sft, grpo or minillm."""
    model: Path | None = None
    """Its checkpoint, when the study made it: metrics.json names the path it had when graded,
    which a moved study dir no longer has."""


@dataclass
class Result:
    row: Row
    metrics: dict
    predictions: dict[str, dict]


def read_predictions(path: Path) -> dict[str, dict]:
    """predictions.jsonl by question id, so models are paired on the same questions."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["id"]): r for r in rows}


def load_result(row: Row) -> Result | None:
    """The row's evaluation, or None if it never finished (no metrics.json)."""
    metrics = row.eval_dir / "metrics.json"
    if not metrics.is_file():
        return None
    return Result(row, json.loads(metrics.read_text()), read_predictions(row.eval_dir / "predictions.jsonl"))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_size_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files of a checkpoint (tokenizer and config left out)."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES)


def mcnemar_p(a: Result, b: Result) -> float:
    """Exact McNemar p-value on the questions both answered."""
    shared = sorted(set(a.predictions) & set(b.predictions))
    if not shared:
        return math.nan
    return mcnemar_exact([a.predictions[i]["correct"] for i in shared],
                         [b.predictions[i]["correct"] for i in shared])["p_value"]


def length_ratio(result: Result, teacher: Result | None) -> float:
    """Mean completion tokens relative to the teacher's on the same questions."""
    if teacher is None or not teacher.metrics["mean_completion_tokens"]:
        return math.nan
    return result.metrics["mean_completion_tokens"] / teacher.metrics["mean_completion_tokens"]


def data_summary(row: Row) -> str:
    """The training-data cell: kept / teacher samples and question coverage of its filters."""
    if row.data is None:
        return row.data_note
    report = json.loads((row.data / "filter_report.json").read_text())
    cell = (f"{report['kept']}/{report['samples']} kept, {report['coverage']:.0%} of "
            f"{report['questions']} q")
    return f"{row.data_note}: {cell}" if row.data_note != "none" else cell


# --- the table ---------------------------------------------------------------------------------

BASELINES = ("no_kd", "answer_only")
COLUMNS = ("model", "engine", "accuracy [95% CI]", "p vs no-KD", "p vs best baseline",
           "params (M)", "disk (MB)", "latency/sample (s)", "tokens/s", "peak memory (GiB)",
           "mean tokens", "length / teacher", "arithmetic errors", "training data")


def _p(value: float, is_ref: bool) -> str:
    if is_ref:
        return "ref"
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def best_baseline(results: list[Result]) -> Result | None:
    """The most accurate of the rows that distil nothing (no_kd, answer_only); ties: the first."""
    baselines = [r for r in results if r.row.key in BASELINES]
    return max(baselines, key=lambda r: r.metrics["accuracy"]) if baselines else None


def table_rows(results: list[Result]) -> list[dict[str, str]]:
    """One dict of formatted cells (COLUMNS) per result, every cell filled."""
    by_key = {r.row.key: r for r in results}
    no_kd, teacher, best = by_key.get("no_kd"), by_key.get("teacher"), best_baseline(results)
    out = []
    for r in results:
        m = r.metrics
        wrong, claims = arithmetic_errors([p["completion"] for p in r.predictions.values()])
        ratio = length_ratio(r, teacher)
        out.append({
            "model": r.row.label,
            "engine": r.row.engine,
            "accuracy [95% CI]": f"{m['accuracy']:.1%} [{m['accuracy_ci_low']:.1%}, "
                                 f"{m['accuracy_ci_high']:.1%}] ({m['num_correct']}/{m['num_samples']})",
            "p vs no-KD": _p(mcnemar_p(r, no_kd) if no_kd else math.nan, r is no_kd),
            "p vs best baseline": _p(mcnemar_p(r, best) if best else math.nan, r is best),
            "params (M)": f"{m['parameters'] / 1e6:.1f}",
            "disk (MB)": f"{weights_size_bytes(r.row.model or m['model']) / 2**20:.1f}",
            "latency/sample (s)": f"{m['latency_per_sample_s']:.3f}",
            "tokens/s": f"{m['tokens_per_s']:.0f}",
            "peak memory (GiB)": f"{m['peak_memory_gb']:.2f}",
            "mean tokens": f"{m['mean_completion_tokens']:.1f}",
            "length / teacher": "n/a" if math.isnan(ratio) else f"{ratio:.2f}",
            "arithmetic errors": f"{wrong / claims:.1%} ({wrong}/{claims})" if claims else "n/a (0 claims)",
            "training data": data_summary(r.row),
        })
    return out


def markdown_table(rows: list[dict[str, str]], columns=COLUMNS) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def seed_summary(per_seed: dict[int, list[Result]]) -> list[dict[str, str]]:
    """Accuracy of each model across seeds: mean, standard deviation and the values."""
    accs: dict[str, list[float]] = {}
    labels: dict[str, str] = {}
    for results in per_seed.values():
        for r in results:
            accs.setdefault(r.row.key, []).append(r.metrics["accuracy"])
            labels[r.row.key] = r.row.label
    return [{"model": labels[k], "seeds": str(len(v)), "mean accuracy": f"{statistics.fmean(v):.1%}",
             "sd": f"{statistics.stdev(v):.1%}" if len(v) > 1 else "n/a",
             "per seed": ", ".join(f"{a:.1%}" for a in v)} for k, v in accs.items()]


# --- figures -----------------------------------------------------------------------------------


def accuracy_figure(results: list[Result], out: Path, title: str) -> Path:
    """Horizontal bars of accuracy with 95% Wilson whiskers, one per model."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(results) + 1.5))
    acc = [r.metrics["accuracy"] for r in results]
    err = [[a - r.metrics["accuracy_ci_low"] for a, r in zip(acc, results, strict=True)],
           [r.metrics["accuracy_ci_high"] - a for a, r in zip(acc, results, strict=True)]]
    y = range(len(results))
    ax.barh(y, acc, xerr=err, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_yticks(list(y), [r.row.label for r in results], fontsize=8)
    for i, r in enumerate(results):  # the number itself, where the eye would otherwise estimate it
        ax.text(r.metrics["accuracy_ci_high"], i, f"  {r.metrics['accuracy']:.1%}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="GSM8K accuracy (95% CI)", xlim=(0, max(1e-3, *[r.metrics["accuracy_ci_high"] for r in results]) * 1.15),
           title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def efficiency_figure(results: list[Result], out: Path, title: str) -> Path:
    """Accuracy against parameters and against latency per sample, each point labelled."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = []
    for ax, key, xlabel in ((axes[0], "parameters", "parameters (M)"),
                            (axes[1], "latency_per_sample_s", "latency per sample (s, batched)")):
        points = [(r.metrics[key] / (1e6 if key == "parameters" else 1), r.metrics["accuracy"]) for r in results]
        for x, y in points:
            ax.scatter(x, y, s=30)
        ax.set(xlabel=xlabel, ylabel="accuracy")
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.15)  # room for the labels beside the outermost points
        panels.append((ax, points))
    fig.suptitle(title)
    fig.tight_layout()  # labels are placed in the final layout's screen coordinates
    for ax, points in panels:
        place_labels(ax, points, [r.row.key for r in results])
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], fontsize: int = 7) -> list:
    """Label points without overlaps (study variants often share a parameter count and an
    accuracy): points that coincide on screen share one label listing them, and a label that
    would cover one already placed moves a line up or down, tied to its point by a thin line."""
    renderer = ax.figure.canvas.get_renderer()
    clusters: list[tuple[tuple[float, float], list[str]]] = []
    for (x, y), label in zip(points, labels, strict=True):
        px, py = ax.transData.transform((x, y))
        near = next((c for c in clusters if abs(c[0][0] - px) < 4 and abs(c[0][1] - py) < 4), None)
        if near:
            near[1].append(label)
        else:
            clusters.append(((px, py), [label]))
    placed, out = [], []
    for (px, py), names in sorted(clusters, key=lambda c: (-c[0][1], c[0][0])):
        text = "\n".join(textwrap.wrap(", ".join(names), 36))
        xy = ax.transData.inverted().transform((px, py))
        shifts = [0, *[s * k for k in range(1, 4 * len(points) + 1) for s in (-1, 1)]]
        for shift in shifts:
            note = ax.annotate(text, xy, xytext=(5, 2 + 1.4 * fontsize * shift), textcoords="offset points",
                               fontsize=fontsize, va="center" if "\n" in text else "baseline",
                               arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if shift else None)
            note.update_positions(renderer)  # moves the text to its offset, as drawing would
            box = Text.get_window_extent(note, renderer)  # the text alone, not its leader line
            if not any(box.overlaps(b) for b in placed) or shift == shifts[-1]:
                break
            note.remove()
        placed.append(box)
        out.append(note)
    return out


CURVE_PANELS = (("sft", ("train/loss",), "SFT loss (token-mean NLL)"),
                ("grpo", ("reward/total_mean",), "GRPO mean reward"),
                ("minillm", ("train/single_step_kl", "train/loss"), "MiniLLM single-step KL"))


def training_figure(rows: list[Row], out: Path, title: str) -> Path:
    """One panel per kind of training run, one line per run; a note when nothing trained."""
    panels = []
    for kind, keys, name in CURVE_PANELS:
        lines = []
        for row in rows:
            if row.curve_kind != kind or row.curves is None or not row.curves.is_file():
                continue
            records = [json.loads(x) for x in row.curves.read_text().splitlines() if x.strip()]
            key = next((k for k in keys if any(k in rec for rec in records)), None)
            if key:
                lines.append((row.key, [(rec["step"], rec[key]) for rec in records if key in rec]))
        if lines:
            panels.append((name, lines))
    fig, axes = plt.subplots(max(len(panels), 1), 1, figsize=(7, 2.8 * max(len(panels), 1)), squeeze=False)
    for ax, (name, lines) in zip(axes[:, 0], panels, strict=False):
        for label, points in lines:
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no training runs in this study", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --- report.md ---------------------------------------------------------------------------------

NOTES = """\
- **accuracy**: greedy decoding, graded by the same answer parser as the GSM8K reward; 95%
  Wilson interval; (correct/questions). Every model answers the same test questions.
- **p vs no-KD / best baseline**: exact McNemar test, paired on the shared questions, against
  the untrained student and against the more accurate of no_kd and answer_only (`ref`: the row
  itself).
- **disk**: the checkpoint's weight files. **latency/sample**: generation wall time / questions
  at the engine's batch size (not single-request latency). **peak memory**: RSS of the evaluation
  process and its children; vLLM rows include its KV-cache reservation (`rollout.kv_cache_gb`),
  so compare int4 with its fp32 reference on the same engine.
- **length / teacher**: mean completion tokens over the teacher's on the same questions.
- **arithmetic errors**: wrong `a op b = c` claims / all claims in the answers
  (`rlkd.arithmetic_claims` says what is a claim and when it is wrong).
- **training data**: kept / teacher samples after the filters, and the share of questions that
  kept one (the full filter reports are below)."""


def filter_sections(rows: list[Row]) -> list[str]:
    """Each distinct training set's filter_report.md, its heading renamed after the set."""
    out, seen = [], set()
    for row in rows:
        if row.data is None or row.data in seen or not (row.data / "filter_report.md").is_file():
            continue
        seen.add(row.data)
        body = (row.data / "filter_report.md").read_text().split("\n", 1)[1]
        out.append(f"#### {row.data.name} (trains {row.key})\n{body}")
    return out


def write_report(root: Path, header: list[str], per_seed: dict[int, list[Row]],
                 stages: dict[str, dict], not_run: dict[str, str]) -> Path:
    """report.md plus accuracy.png, efficiency.png, training.png (of the first seed) in `root`."""
    loaded = {seed: [r for r in map(load_result, rows) if r is not None] for seed, rows in per_seed.items()}
    first = next(iter(per_seed))
    lines = ["# Distillation study", "", *header, ""]
    for seed, results in loaded.items():
        lines += [f"## Seed {seed}", ""]
        lines += [markdown_table(table_rows(results)) if results else "No model finished.", ""]
    if len(loaded) > 1:
        rows = seed_summary(loaded)
        lines += ["## Across seeds", "", markdown_table(rows, tuple(rows[0])) if rows else "", ""]
    if not_run:
        lines += ["## Not run", ""] + [f"- {name}: {why}" for name, why in not_run.items()] + [""]
    title = f"seed {first}"
    results = loaded[first]
    figures = [training_figure(per_seed[first], root / "training.png", f"Training curves, {title}")]
    if results:
        figures = [accuracy_figure(results, root / "accuracy.png", f"GSM8K accuracy, {title}"),
                   efficiency_figure(results, root / "efficiency.png", f"Accuracy vs size and speed, {title}"),
                   *figures]
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    lines += ["## Columns", "", NOTES, ""]
    sections = filter_sections([row for rows in per_seed.values() for row in rows])
    if sections:
        lines += ["## Training data", "", *sections]
    lines += ["## Stages", "", markdown_table(
        [{"stage": name, "status": s["status"], "seed": "-" if s.get("seed") is None else str(s["seed"]),
          "seconds": f"{s.get('seconds', 0):.0f}",
          "command": f"`{s['command']}`" if "command" in s else f"not run: {s.get('reason', '')}"}
         for name, s in stages.items()], ("stage", "status", "seed", "seconds", "command")), ""]
    path = root / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
