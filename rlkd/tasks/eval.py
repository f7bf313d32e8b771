"""Evaluation on a named dataset (GSM8K by default) and paired comparison.

    python -m rlkd.eval model.name=smollm2-135m-instruct
    python -m rlkd.eval eval.compare=[runs/a/predictions.jsonl,runs/b/predictions.jsonl]

Generation runs on vLLM in this process (no Ray needed); scoring uses the same answer parser as
the GSM8K reward, so a "correct" here is a reward of 1 in training. Answers are kept chunk by
chunk in predictions.partial.jsonl (`rlkd.journal`): a Ctrl-C loses only the chunk in flight, and
the same command plus `run.dir=<its dir> trainer.resume=auto` continues.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from transformers import AutoTokenizer

from rlkd.actors.cluster import engine_kwargs
from rlkd.actors.rollout import RolloutWorker
from rlkd.config import Config
from rlkd.data import load_split, split_held_out
from rlkd.errors import ConfigError
from rlkd.journal import journaled
from rlkd.models import count_parameters, resolve_model
from rlkd.preflight import check_context, check_prompt_lengths, load_environment_spec
from rlkd.scoring import (
    PeakMemory,
    print_summary,
    print_table,
    read_predictions,
    score,
    write_results,
)
from rlkd.stats import mcnemar_exact
from rlkd.types import SamplingSpec

JOURNAL = "predictions.partial.jsonl"  # answers of the chunks done so far, until predictions.jsonl


def evaluate(cfg: Config, run_dir: Path) -> dict[str, float]:
    """Evaluate cfg.model.name on cfg.data.split; writes metrics.json and predictions.jsonl."""
    if cfg.eval.compare:
        return compare(*cfg.eval.compare, out=run_dir / "comparison.json")
    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir or None)
    check_context(str(model_path), cfg.model.max_model_len)
    environment, data = load_environment_spec(cfg)
    cfg = replace(cfg, data=data)  # prompts describe the environment's tools, if any
    examples = load_split(cfg.data, cfg.data.split)
    if cfg.data.held_out:  # the slice a training run held out of this split
        examples = split_held_out(cfg.data, examples)[1]
    examples = examples[:cfg.eval.num_samples] if cfg.eval.num_samples > 0 else examples
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_prompt_lengths(tokenizer, examples, cfg, "eval.max_new_tokens", cfg.eval.max_new_tokens)
    spec = SamplingSpec(n=1, max_tokens=cfg.eval.max_new_tokens,
                        temperature=cfg.eval.temperature, seed=cfg.run.seed, environment=environment)
    fingerprint = {"model": str(model_path), "data": cfg.data.name, "split": cfg.data.split,
                                          "held_out": cfg.data.held_out, "questions": len(examples),
                                          "max_tokens": spec.max_tokens, "temperature": spec.temperature,
                                          "seed": spec.seed, "environment": cfg.rollout.environment}
    start = time.perf_counter()
    with PeakMemory() as mem:
        worker = RolloutWorker(str(model_path), **engine_kwargs(cfg, seed=cfg.run.seed))
        with journaled(run_dir, JOURNAL, fingerprint, cfg.trainer.resume, "answers") as journal:
            predictions, metrics = score(worker.generate, tokenizer, examples, cfg.data, spec, journal=journal)
    metrics.update(
        parameters=count_parameters(model_path), peak_memory_gb=mem.peak / 2**30,
        engine_startup_s=worker.startup_seconds, wall_s=time.perf_counter() - start,
    )
    write_results(run_dir, model_path, predictions, metrics)
    journal.path.unlink()  # predictions.jsonl holds every answer now
    print_summary(cfg.model.name, cfg.data.split, metrics, run_dir, f"{cfg.data.name} evaluation")
    return metrics


def compare(path_a: str, path_b: str, out: Path | None = None) -> dict[str, float]:
    """Paired McNemar exact test over the questions both prediction files answered."""
    for p in (path_a, path_b):
        if not Path(p).exists():
            raise ConfigError(f"eval.compare: no such predictions file '{p}'")
    a, b = read_predictions(path_a), read_predictions(path_b)
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

