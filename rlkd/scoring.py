"""Scoring a model's answers: greedy (or sampled) completions graded by the one answer parser,
with accuracy and its Wilson interval, length, throughput and peak memory. Every task that
measures accuracy (eval, the periodic held-out evals of grpo, sft and distill, quantize) calls
`score` with its own `generate` (a vLLM actor, an in-process engine, or transformers), and
writes the same `predictions.jsonl` / `metrics.json` through `write_results`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import psutil
from tqdm import tqdm

from rlkd.answer import answers_match, extract_answer
from rlkd.config import DataConfig
from rlkd.console import out, terminal
from rlkd.data import build_prompt, read_jsonl
from rlkd.journal import Journal
from rlkd.stats import mean_ci, wilson_interval
from rlkd.types import Episodes, Example, Generation, SamplingSpec

Generate = Callable[[list[str], SamplingSpec], Generation]


def score(generate: Generate, tokenizer, examples: list[Example], data: DataConfig,
          spec: SamplingSpec, chunk: int = 128, journal: Journal | None = None) -> tuple[list[dict], dict[str, float]]:
    """Generate one completion per question and grade it; returns (predictions, metrics). With a
    `journal`, chunks it holds are not generated again and each new one is added as it finishes."""
    prompts = [build_prompt(tokenizer, ex.question, data) for ex in examples]
    parts = []
    # Chunks drive the progress bar and the journal: 64 concurrent sequences already saturate a
    # CPU engine, so smaller calls cost nothing.
    with tqdm(total=len(prompts), desc="eval", unit="q", dynamic_ncols=True, file=terminal(), disable=len(prompts) <= chunk) as bar:
        for start in range(0, len(prompts), chunk):
            if journal is not None and (kept := journal.get(start // chunk)) is not None:
                parts.append(_from_rows(*kept))
            else:
                chunk_spec = replace(spec, first_prompt=start)
                if spec.environment is None:
                    parts.append(generate(prompts[start:start + chunk], chunk_spec))
                else:  # the environment's reset reads each question's row
                    parts.append(generate(prompts[start:start + chunk], chunk_spec,
                                          [asdict(ex) for ex in examples[start:start + chunk]]))
                if journal is not None:
                    journal.add(start // chunk, _to_rows(parts[-1]), parts[-1].seconds)
            bar.update(len(parts[-1].texts))
            done = sum(g.num_tokens for g in parts) / max(sum(g.seconds for g in parts), 1e-9)
            bar.set_postfix(tok_s=f"{done:.0f}")
    gen = Generation.concat(parts)
    gen.seconds = sum(g.seconds for g in parts)  # chunks ran one after another
    predictions = []
    for i, (ex, text, tokens, cut) in enumerate(zip(examples, gen.texts, gen.policy_tokens(), gen.truncated, strict=True)):
        parsed = extract_answer(text)
        predictions.append({
            "id": ex.id, "question": ex.question, "gold": ex.answer, "completion": text,
            "parsed": parsed, "correct": answers_match(parsed, ex.answer),
            "num_tokens": tokens, "truncated": cut,  # the model's tokens: tool output is not its length
        })
        if gen.episodes is not None:
            predictions[-1].update(tool_calls=gen.episodes.tool_calls[i], tool_errors=gen.episodes.tool_errors[i],
                                   tool_failure=gen.episodes.failures[i])
    n, k = len(predictions), sum(p["correct"] for p in predictions)
    lo, hi = wilson_interval(k, n)
    lengths = [p["num_tokens"] for p in predictions]
    metrics = {
        "accuracy": k / max(n, 1), "accuracy_ci_low": lo, "accuracy_ci_high": hi,
        "num_samples": n, "num_correct": k,
        "mean_completion_tokens": sum(lengths) / max(n, 1),
        "truncated_frac": sum(p["truncated"] for p in predictions) / max(n, 1),
        "generate_seconds": gen.seconds,
        "tokens_per_s": gen.num_tokens / max(gen.seconds, 1e-9),
        # Batched generation: wall time per question at this batch size, not single-request latency.
        "latency_per_sample_s": gen.seconds / max(n, 1),
    }
    if gen.episodes is not None:
        calls = gen.episodes.tool_calls
        metrics.update(tool_call_rate=sum(c > 0 for c in calls) / max(n, 1), tool_calls_mean=sum(calls) / max(n, 1),
                       tool_errors=sum(gen.episodes.tool_errors), tool_failures=sum(bool(f) for f in gen.episodes.failures))
    if n > 1:
        _, metrics["completion_tokens_ci_low"], metrics["completion_tokens_ci_high"] = mean_ci(lengths)
    return predictions, metrics


EPISODE_FIELDS = tuple(vars(Episodes()))


def _to_rows(gen: Generation) -> list[dict]:
    rows = [{"text": t, "completion_ids": ids, "truncated": cut}
            for t, ids, cut in zip(gen.texts, gen.completion_ids, gen.truncated, strict=True)]
    for i, row in enumerate(rows):
        if gen.loss_masks:
            row["loss_mask"] = gen.loss_masks[i]
        if gen.episodes is not None:
            row.update({k: getattr(gen.episodes, k)[i] for k in EPISODE_FIELDS})
    return rows


def _from_rows(rows: list[dict], seconds: float) -> Generation:
    """A journaled chunk, with what grading needs (no prompt ids or logprobs)."""
    episodes = Episodes(*([r[k] for r in rows] for k in EPISODE_FIELDS)) if rows and "turns" in rows[0] else None
    return Generation(prompt_ids=[[] for _ in rows], completion_ids=[r["completion_ids"] for r in rows],
                      logprobs=[[] for _ in rows], texts=[r["text"] for r in rows],
                      truncated=[r["truncated"] for r in rows], seconds=seconds,
                      loss_masks=[r["loss_mask"] for r in rows] if rows and "loss_mask" in rows[0] else [],
                      episodes=episodes)


class PeakMemory:
    """Samples the RSS of this process plus its children (vLLM's engine runs in one)."""

    def __init__(self, interval_s: float = 0.2):
        self.peak, self.interval_s = 0, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def write_results(run_dir: Path, model_path, predictions: list[dict], metrics: dict) -> None:
    """predictions.jsonl and metrics.json: what eval.compare and the study report read."""
    with (run_dir / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps({"model": str(model_path), **metrics}, indent=2))


def _prediction_problem(row: dict) -> str | None:
    if isinstance(row.get("id"), str | int) and isinstance(row.get("correct"), bool):
        return None
    return "not a predictions row (needs an 'id' and a boolean 'correct')"


def read_predictions(path: str | Path) -> dict[str, bool]:
    """A predictions.jsonl as {question id: correct}: what eval.compare and the scripts read."""
    return {str(row["id"]): row["correct"] for row in read_jsonl(path, check=_prediction_problem)}


def print_summary(model: str, split: str, metrics: dict, run_dir: Path, title: str) -> None:
    """The evaluation's headline numbers, as every engine prints them."""
    print_table([
        ("model", model),
        ("split", f"{split} ({metrics['num_samples']} questions)"),
        ("accuracy", f"{metrics['accuracy']:.3f}  95% CI [{metrics['accuracy_ci_low']:.3f}, "
                     f"{metrics['accuracy_ci_high']:.3f}]"),
        ("mean completion tokens", f"{metrics['mean_completion_tokens']:.1f}"),
        ("tokens/s", f"{metrics['tokens_per_s']:.0f}"),
        ("latency per sample", f"{metrics['latency_per_sample_s']:.3f} s (batched)"),
        ("peak memory", f"{metrics['peak_memory_gb']:.2f} GiB"),
        ("parameters", f"{metrics['parameters'] / 1e6:.1f} M"),
        ("run dir", str(run_dir)),
    ], title)


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(k) for k, _ in rows)
    out(f"\n{title}")
    for k, v in rows:
        out(f"  {k:<{width}}  {v}")
