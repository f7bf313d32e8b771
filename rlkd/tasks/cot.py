"""Teacher chain-of-thought generation and filtering (task=cot).

    python -m rlkd.train recipe=cot_gsm8k

    for each chunk of training questions:
        for each temperature: the teacher (model.name on the vLLM rollout actors) writes k samples
    record text, length and confidence -> filters -> kept dataset + report

`cot.prompt_mode=gold` skips the teacher and turns GSM8K's human rationales into samples, so every
SFT variant trains on the same record format. `cot.samples=<samples.jsonl>` re-filters an earlier
run's samples without generating again. Outputs in the run dir: samples.jsonl (every sample with
its verdict), kept.jsonl and kept.parquet (the SFT dataset), filter_report.{json,md},
lengths.png, cot_metrics.json. Samples are kept chunk by chunk in samples.partial.jsonl
(`rlkd.journal`): a Ctrl-C loses only the chunk in flight, and the same command plus
`run.dir=<its dir> trainer.resume=auto` continues with the same seeds.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import datasets
import matplotlib.pyplot as plt
import ray
from tqdm import tqdm
from transformers import AutoTokenizer

from rlkd.actors.cluster import init_ray, rollout_actor
from rlkd.actors.recovery import shutdown
from rlkd.actors.rollout import generate_sharded
from rlkd.config import Config, PromptMode
from rlkd.console import out, terminal
from rlkd.data import build_prompt, gold_text, load_split, read_jsonl
from rlkd.errors import ConfigError
from rlkd.filters import apply_filters, report_markdown
from rlkd.journal import Journal, journaled
from rlkd.models import resolve_model
from rlkd.types import Example, SamplingSpec

JOURNAL = "samples.partial.jsonl"  # the chunks of questions done so far, until samples.jsonl
_ANSWER_LINE_END_RE = re.compile(r"####[ \t]*[^\n]*\d[^\n]*")


def trim_after_answer(text: str) -> str:
    """Text up to the end of its first '#### <number>' line (unchanged if there is none)."""
    m = _ANSWER_LINE_END_RE.search(text)
    return text[:m.end()] if m else text


# Provenance fields every sample carries, generated or gold.
SAMPLE_FIELDS = ("id", "question", "gold", "text", "num_tokens", "gold_tokens", "mean_logprob",
                 "min_logprob", "temperature", "prompt_mode", "sample_index", "truncated",
                 "teacher", "seed")


def teacher_prompt(tokenizer, ex: Example, cfg: Config) -> str:
    if cfg.cot.prompt_mode == PromptMode.gt_primed:
        hint = cfg.cot.primed_instruction.format(answer=ex.answer)
        return build_prompt(tokenizer, f"{ex.question}\n\n{hint}", cfg.data)
    return build_prompt(tokenizer, ex.question, cfg.data)


def gold_samples(examples: list[Example], tokenizer, cfg: Config) -> list[dict]:
    out = []
    for ex in examples:
        text = gold_text(ex, cfg.cot.strip_calculator)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append(_record(ex, text, n, n, float("nan"), float("nan"), None, "gold", 0, False,
                           "gsm8k", cfg.run.seed))
    return out


def _record(ex, text, num_tokens, gold_tokens, mean_lp, min_lp, temperature, mode, index,
            truncated, teacher, seed) -> dict:
    values = (ex.id, ex.question, ex.answer, text, num_tokens, gold_tokens, mean_lp, min_lp,
              temperature, mode, index, truncated, teacher, seed)
    return dict(zip(SAMPLE_FIELDS, values, strict=True))


def generate_samples(cfg: Config, tokenizer, examples: list[Example], rollouts: list,
                     journal: Journal) -> tuple[list[dict], dict]:
    """k samples per question per temperature from the teacher; returns (samples, throughput).
    Each chunk of questions goes into `journal` as it finishes; chunks it holds are not redone."""
    c = cfg.cot
    gold_tokens = {ex.id: len(tokenizer(gold_text(ex, c.strip_calculator), add_special_tokens=False)["input_ids"])
                   for ex in examples}
    samples, tokens, gen_seconds, start = [], 0, 0.0, time.perf_counter()
    bar = tqdm(total=len(examples), desc=f"cot ({c.prompt_mode.value})", unit="q", dynamic_ncols=True, file=terminal())
    for c0 in range(0, len(examples), c.batch_questions):
        chunk = examples[c0:c0 + c.batch_questions]
        if (kept := journal.get(c0 // c.batch_questions)) is not None:
            samples.extend(kept[0])
            tokens, gen_seconds = tokens + sum(s["num_tokens"] for s in kept[0]), gen_seconds + kept[1]
            bar.update(len(chunk))
            continue
        prompts = [teacher_prompt(tokenizer, ex, cfg) for ex in chunk]
        chunk_samples, chunk_seconds = [], 0.0
        for ti, temperature in enumerate(c.temperatures):
            # Seeds depend on (run seed, chunk, temperature) only, so a rerun reproduces.
            seed = cfg.run.seed * 1_000_003 + c0 * 31 + ti
            spec = SamplingSpec(n=c.samples_per_temperature, max_tokens=c.max_new_tokens,
                                temperature=temperature, seed=seed)
            gen = generate_sharded(rollouts, prompts, spec)
            tokens, chunk_seconds = tokens + gen.num_tokens, chunk_seconds + gen.seconds
            for i, (ids, lps, text, cut) in enumerate(zip(gen.completion_ids, gen.logprobs, gen.texts,
                                                         gen.truncated, strict=True)):
                ex = chunk[i // spec.n]
                if c.trim_after_answer and (short := trim_after_answer(text)) != text:
                    # Token counts of the prefix: the tokenizer splits it as the teacher did,
                    # up to the last token, which is close enough for length and confidence.
                    n_kept = len(tokenizer(short, add_special_tokens=False)["input_ids"])
                    text, ids, lps, cut = short, ids[:n_kept], lps[:n_kept], False
                finite = [lp for lp in lps if math.isfinite(lp)]
                chunk_samples.append(_record(
                    ex, text, len(ids), gold_tokens[ex.id],
                    sum(finite) / len(finite) if finite else float("nan"),
                    min(finite) if finite else float("nan"),
                    temperature, c.prompt_mode.value, i % spec.n, cut, cfg.model.name, seed))
        journal.add(c0 // c.batch_questions, chunk_samples, chunk_seconds)
        samples.extend(chunk_samples)
        gen_seconds += chunk_seconds
        bar.update(len(chunk))
        elapsed = time.perf_counter() - start
        bar.set_postfix(tok_s=f"{tokens / max(gen_seconds, 1e-9):.0f}",
                        q_min=f"{bar.n / elapsed * 60:.1f}")
    bar.close()
    elapsed = time.perf_counter() - start
    throughput = {
        "questions": len(examples), "samples": len(samples), "completion_tokens": tokens,
        "generate_seconds": gen_seconds, "wall_seconds": elapsed,
        "questions_per_min": len(examples) / elapsed * 60, "samples_per_min": len(samples) / elapsed * 60,
        "tokens_per_s": tokens / max(gen_seconds, 1e-9),
    }
    return samples, throughput


def fingerprint(cfg: Config, teacher: str, questions: int) -> dict:
    """What decides the samples: a resumed run must have the same, or its chunks would not join."""
    c = cfg.cot
    return {"teacher": teacher, "data": cfg.data.name, "split": cfg.data.split, "questions": questions,
            "prompt_mode": c.prompt_mode.value, "temperatures": list(c.temperatures),
            "samples_per_temperature": c.samples_per_temperature, "max_new_tokens": c.max_new_tokens,
            "batch_questions": c.batch_questions, "trim_after_answer": c.trim_after_answer,
            "seed": cfg.run.seed}


def read_samples(path: str) -> list[dict]:
    """samples.jsonl of an earlier cot run; a bad line is a one-line error naming it."""
    p = Path(path)
    if p.is_dir():
        p = p / "samples.jsonl"
    if not p.is_file():
        raise ConfigError(f"cot.samples={path}: no such file")
    rows = read_jsonl(p, required=("id", "gold", "text", "num_tokens"))
    return [{k: v for k, v in row.items() if k in SAMPLE_FIELDS} for row in rows]


def plot_lengths(samples: list[dict], out: Path) -> Path:
    """Token-length histograms: all samples vs kept, and kept per temperature."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    all_n = [s["num_tokens"] for s in samples]
    kept_n = [s["num_tokens"] for s in samples if s["kept"]]
    bins = 30 if all_n else 1
    axes[0].hist(all_n, bins=bins, alpha=0.5, label=f"all ({len(all_n)})")
    axes[0].hist(kept_n, bins=bins, alpha=0.7, label=f"kept ({len(kept_n)})")
    axes[0].set(xlabel="completion tokens", ylabel="samples", title="Sample lengths")
    axes[0].legend()
    for temperature in sorted({s["temperature"] for s in samples}, key=lambda t: -1 if t is None else t):
        n = [s["num_tokens"] for s in samples if s["kept"] and s["temperature"] == temperature]
        if n:
            axes[1].hist(n, bins=20, alpha=0.5, label=f"T={temperature} ({len(n)})")
    axes[1].set(xlabel="completion tokens", title="Kept samples by temperature")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(samples: list[dict], kept: list[dict], report: dict, cfg: Config, run_dir: Path) -> None:
    with (run_dir / "samples.jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    with (run_dir / "kept.jsonl").open("w") as f:
        for s in kept:
            f.write(json.dumps({k: s[k] for k in SAMPLE_FIELDS}) + "\n")
    if kept:
        datasets.Dataset.from_list([{k: s[k] for k in SAMPLE_FIELDS} for s in kept]).to_parquet(
            str(run_dir / "kept.parquet"))
    (run_dir / "filter_report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "filter_report.md").write_text(report_markdown(report, cfg.filter))
    plot_lengths(samples, run_dir / "lengths.png")


def run(cfg: Config, run_dir: Path) -> dict:
    """task=cot: generate (or read) samples, filter them, write the dataset and the report."""
    c = cfg.cot
    throughput: dict = {}
    if c.samples:
        samples = read_samples(c.samples)
    else:
        teacher = str(resolve_model(cfg.model.name, cfg.model.cache_dir or None))
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        examples = load_split(cfg.data, cfg.data.split, limit=c.num_questions)
        if c.prompt_mode == PromptMode.gold:
            samples = gold_samples(examples, tokenizer, cfg)
        else:
            init_ray(cfg)
            rollouts = [rollout_actor(cfg, teacher, i, logprobs_mode="raw_logprobs")
                        for i in range(cfg.rollout.num_actors)]
            try:
                with journaled(run_dir, JOURNAL, fingerprint(cfg, teacher, len(examples)), cfg.trainer.resume,
                               "samples") as journal:
                    ray.get([r.ready.remote() for r in rollouts])
                    samples, throughput = generate_samples(cfg, tokenizer, examples, rollouts, journal)
            finally:
                shutdown([], rollouts)
    kept, report = apply_filters(samples, cfg.filter)
    report["throughput"] = throughput
    write_outputs(samples, kept, report, cfg, run_dir)
    (run_dir / JOURNAL).unlink(missing_ok=True)  # samples.jsonl holds every sample now
    (run_dir / "cot_metrics.json").write_text(json.dumps(throughput, indent=2))
    out(report_markdown(report, cfg.filter))
    if throughput:
        out(f"teacher throughput: {throughput['questions_per_min']:.1f} questions/min, "
              f"{throughput['tokens_per_s']:.0f} tokens/s")
    out(f"kept dataset: {run_dir / 'kept.jsonl'}")
    return report
