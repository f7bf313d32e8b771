"""GSM8K evaluation and paired comparison.

    python -m rlkd.eval model.name=smollm2-135m-instruct
    python -m rlkd.eval eval.compare=[runs/a/predictions.jsonl,runs/b/predictions.jsonl]

Generation runs on vLLM in this process (no Ray needed); scoring uses the same answer parser as
the GSM8K reward, so a "correct" here is a reward of 1 in training.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil
from tqdm import tqdm
from transformers import AutoTokenizer

from rlkd.answer import answers_match, extract_answer
from rlkd.compose import from_cli
from rlkd.config import Config, ConfigError, DataConfig, InputError
from rlkd.console import out, terminal
from rlkd.data import Example, build_prompt, load_split, split_held_out
from rlkd.hardware import rollout_dtype
from rlkd.models import count_parameters, resolve_model
from rlkd.preflight import check_context, check_prompt_lengths
from rlkd.rollout import Generation, RolloutWorker, SamplingSpec
from rlkd.stats import mcnemar_exact, mean_ci, wilson_interval
from rlkd.tracking import make_run_dir

Generate = Callable[[list[str], SamplingSpec], Generation]


def score(generate: Generate, tokenizer, examples: list[Example], data: DataConfig,
          spec: SamplingSpec, chunk: int = 128) -> tuple[list[dict], dict[str, float]]:
    """Generate one completion per question and grade it; returns (predictions, metrics)."""
    prompts = [build_prompt(tokenizer, ex.question, data) for ex in examples]
    parts = []
    # Chunks only drive the progress bar: 64 concurrent sequences already saturate a CPU engine.
    with tqdm(total=len(prompts), desc="eval", unit="q", dynamic_ncols=True, file=terminal(), disable=len(prompts) <= chunk) as bar:
        for start in range(0, len(prompts), chunk):
            parts.append(generate(prompts[start:start + chunk], replace(spec, first_prompt=start)))
            bar.update(len(parts[-1].prompt_ids))
            done = sum(g.num_tokens for g in parts) / max(sum(g.seconds for g in parts), 1e-9)
            bar.set_postfix(tok_s=f"{done:.0f}")
    gen = Generation.concat(parts)
    gen.seconds = sum(g.seconds for g in parts)  # chunks ran one after another
    predictions = []
    for ex, text, ids, cut in zip(examples, gen.texts, gen.completion_ids, gen.truncated, strict=True):
        parsed = extract_answer(text)
        predictions.append({
            "id": ex.id, "question": ex.question, "gold": ex.answer, "completion": text,
            "parsed": parsed, "correct": answers_match(parsed, ex.answer),
            "num_tokens": len(ids), "truncated": cut,
        })
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
    if n > 1:
        _, metrics["completion_tokens_ci_low"], metrics["completion_tokens_ci_high"] = mean_ci(lengths)
    return predictions, metrics


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


def evaluate(cfg: Config, run_dir: Path) -> dict[str, float]:
    """Evaluate cfg.model.name on cfg.data.split; writes metrics.json and predictions.jsonl."""
    if cfg.eval.compare:
        return compare(*cfg.eval.compare, out=run_dir / "comparison.json")
    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir or None)
    check_context(str(model_path), cfg.model.max_model_len)
    examples = load_split(cfg.data, cfg.data.split)
    if cfg.data.held_out:  # the slice a training run held out of this split
        examples = split_held_out(cfg.data, examples)[1]
    examples = examples[:cfg.eval.num_samples] if cfg.eval.num_samples > 0 else examples
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_prompt_lengths(tokenizer, examples, cfg, "eval.max_new_tokens", cfg.eval.max_new_tokens)
    spec = SamplingSpec(n=1, max_tokens=cfg.eval.max_new_tokens,
                        temperature=cfg.eval.temperature, seed=cfg.run.seed)
    start = time.perf_counter()
    with PeakMemory() as mem:
        worker = RolloutWorker(str(model_path), max_model_len=cfg.model.max_model_len,
                               dtype=rollout_dtype(cfg), enforce_eager=cfg.rollout.enforce_eager,
                               kv_cache_gb=cfg.rollout.kv_cache_gb, seed=cfg.run.seed,
                               use_gpu=cfg.rollout.gpus_per_actor > 0,
                               gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
        predictions, metrics = score(worker.generate, tokenizer, examples, cfg.data, spec)
    metrics.update(
        parameters=count_parameters(model_path), peak_memory_gb=mem.peak / 2**30,
        engine_startup_s=worker.startup_seconds, wall_s=time.perf_counter() - start,
    )
    write_results(run_dir, model_path, predictions, metrics)
    print_summary(cfg.model.name, cfg.data.split, metrics, run_dir, "GSM8K evaluation")
    return metrics


def _read_predictions(path: str) -> dict[str, bool]:
    rows = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not a predictions row (invalid JSON: {e})") from None
        if not (isinstance(row, dict) and isinstance(row.get("id"), str | int)
                and isinstance(row.get("correct"), bool)):
            raise ConfigError(f"{path}:{lineno}: not a predictions row (needs an 'id' and a boolean 'correct')")
        rows[str(row["id"])] = row["correct"]
    return rows


def compare(path_a: str, path_b: str, out: Path | None = None) -> dict[str, float]:
    """Paired McNemar exact test over the questions both prediction files answered."""
    for p in (path_a, path_b):
        if not Path(p).exists():
            raise ConfigError(f"eval.compare: no such predictions file '{p}'")
    a, b = _read_predictions(path_a), _read_predictions(path_b)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ConfigError(f"eval.compare: '{path_a}' and '{path_b}' share no question ids")
    test = mcnemar_exact([a[i] for i in shared], [b[i] for i in shared])
    result = {
        "n": len(shared), "accuracy_a": sum(a[i] for i in shared) / len(shared),
        "accuracy_b": sum(b[i] for i in shared) / len(shared), **test,
    }
    print_table([
        ("A", path_a), ("B", path_b), ("paired questions", str(len(shared))),
        ("accuracy A / B", f"{result['accuracy_a']:.3f} / {result['accuracy_b']:.3f}"),
        ("A wrong, B right", str(test["b01"])), ("A right, B wrong", str(test["b10"])),
        ("McNemar exact p", f"{test['p_value']:.4g}"),
    ], "Paired comparison")
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str]) -> None:
    cfg, recipe = from_cli(argv, "eval_gsm8k", forced=("task=eval",))
    try:
        evaluate(cfg, make_run_dir(cfg, recipe))
    except InputError as e:
        raise SystemExit(f"rlkd: error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
