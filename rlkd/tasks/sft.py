"""Supervised fine-tuning warm start (task=sft) on the same DeepSpeed learner actor as GRPO.

    python -m rlkd.train recipe=sft_gsm8k sft.data=runs/cot-…/kept.jsonl

    examples (filtered teacher CoT, or GSM8K's gold rationales) -> chat-templated prompt + target
    for each epoch, each shuffled batch: learner NLL step on target tokens only
    every trainer.eval_every steps: held-out NLL (+ greedy accuracy through a vLLM actor)
    -> HF checkpoints a GRPO run can start from: model.name=<run dir>/checkpoint-<step>

`sft.target=answer_only` trains question -> '#### N' (the No-CoT-SFT baseline).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import ray
from tqdm import tqdm
from transformers import AutoTokenizer

from rlkd.actors.cluster import (
    Actors,
    cpu_transport,
    free_port,
    init_ray,
    rollout_actor,
    save_checkpoint,
    sync_weights,
)
from rlkd.actors.learner import LearnerActor
from rlkd.actors.recovery import (
    Progress,
    booked_on_interrupt,
    hold_interrupts,
    shutdown,
    training_tail,
)
from rlkd.actors.rollout import generate_sharded
from rlkd.config import Config, SFTTarget
from rlkd.console import out, terminal
from rlkd.data import (
    build_prompt,
    encode_prompt,
    gold_text,
    load_split,
    read_jsonl,
    split_held_out,
    training_pool,
)
from rlkd.errors import ConfigError
from rlkd.lora import check_lora
from rlkd.models import resolve_model
from rlkd.scoring import score
from rlkd.tracking import Timer, Tracker, plot_curves
from rlkd.types import SamplingSpec, TrainBatch


@dataclass(frozen=True)
class SFTExample:
    id: str
    question: str
    target: str  # the assistant turn, without the end-of-turn token


def _empty_fields(fields: tuple[str, ...], row: dict) -> str | None:
    missing = [k for k in fields if not row.get(k)]
    return f"missing field(s) {', '.join(missing)}" if missing else None


def read_dataset(path: str) -> list[dict]:
    """Rows of a `task=cot` dataset: its kept.jsonl / kept.parquet, or the run dir holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "kept.jsonl"
    if not p.is_file():
        raise ConfigError(f"sft.data={path}: no such file")
    if p.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"sft.data={path}: expected a .jsonl or .parquet file")
    fields = ("id", "question", "gold", "text")
    if p.suffix == ".jsonl":
        rows = read_jsonl(p, check=partial(_empty_fields, fields))
    else:
        rows = list(datasets.load_dataset("parquet", data_files=str(p), split="train"))
        for i, row in enumerate(rows, 1):
            if problem := _empty_fields(fields, row):
                raise ConfigError(f"{p}:row {i}: {problem}")
    if not rows:
        raise ConfigError(f"sft.data={path}: the dataset is empty (did the filters drop everything?)")
    return rows


def sft_examples(cfg: Config) -> list[SFTExample]:
    """The training examples, without the questions data.held_out keeps for evaluation."""
    s = cfg.sft
    answer_only = s.target == SFTTarget.answer_only
    train, held = split_held_out(cfg.data, load_split(cfg.data, cfg.data.split))
    if s.data:
        rows = read_dataset(s.data)
        out = [SFTExample(r["id"], r["question"], f"#### {r['gold']}" if answer_only else r["text"].strip())
               for r in rows]
    else:
        out = [SFTExample(ex.id, ex.question, f"#### {ex.answer}" if answer_only else gold_text(ex, s.strip_calculator))
               for ex in training_pool(cfg.data, train)]
    held_ids = {ex.id for ex in held}
    out = [ex for ex in out if ex.id not in held_ids]
    return out[:s.num_examples] if s.num_examples > 0 else out


def tokenize(examples: list[SFTExample], tokenizer, cfg: Config) -> tuple[TrainBatch, int]:
    """Prompt (chat template, generation prompt) and target + end-of-turn token ids; sequences
    longer than sft.max_seq_len are dropped and counted."""
    end = tokenizer.eos_token or ""
    prompts, completions, dropped = [], [], 0
    for ex in examples:
        p = encode_prompt(tokenizer, build_prompt(tokenizer, ex.question, cfg.data))
        c = tokenizer(ex.target + end, add_special_tokens=False)["input_ids"]
        if len(p) + len(c) > cfg.sft.max_seq_len:
            dropped += 1
            continue
        prompts.append(p)
        completions.append(c)
    batch = TrainBatch(prompts, completions, [[0.0] * len(c) for c in completions], [0.0] * len(completions))
    return batch, dropped


def batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Index batches for every epoch, reshuffled per epoch; a ragged last batch is dropped so
    every optimizer step sees the same number of sequences."""
    out = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        out += [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out


def train(cfg: Config, run_dir: Path) -> dict[str, float]:
    s, t = cfg.sft, cfg.trainer
    model_path = str(resolve_model(cfg.model.name, cfg.model.cache_dir or None))
    check_lora(model_path, cfg.learner.lora)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = sft_examples(cfg)
    random.Random(cfg.run.seed).shuffle(examples)
    held_out = min(s.held_out, len(examples) // 5)
    data, dropped = tokenize(examples[held_out:], tokenizer, cfg)
    held, _ = tokenize(examples[:held_out], tokenizer, cfg)
    if len(data) < s.batch_size:
        raise ConfigError(f"sft.batch_size={s.batch_size} is larger than the {len(data)} training examples")
    plan = batches(len(data), s.batch_size, s.epochs, cfg.run.seed)
    if t.max_steps > 0:
        plan = plan[:t.max_steps]
    eval_acc = bool(t.eval_every and s.eval_accuracy)
    eval_set = []
    if eval_acc:
        eval_set = (split_held_out(cfg.data, load_split(cfg.data, cfg.data.split))[1][:t.eval_samples]
                    if cfg.data.held_out else load_split(cfg.data, cfg.data.eval_split, limit=t.eval_samples))
    out(f"sft: {len(data)} examples ({dropped} longer than sft.max_seq_len dropped), {held_out} held out, "
          f"{len(plan)} steps of {s.batch_size}, target={s.target.value}, packing={s.packing}")
    (run_dir / "sft_data.json").write_text(json.dumps(
        {"examples": len(data), "dropped_too_long": dropped, "held_out": held_out, "steps": len(plan),
         "target": s.target.value, "source": s.data or f"gsm8k gold rationales ({cfg.data.split})"}, indent=2))

    init_ray(cfg)
    learner = LearnerActor.options(num_cpus=0, num_gpus=cfg.learner.gpus).remote(
        cfg, model_path, master_port=free_port())
    out(f"[rlkd] learner precision: {ray.get(learner.precision.remote())}")
    rollouts = [rollout_actor(cfg, model_path)] if eval_acc else []
    actors = Actors(learner, rollouts, cpu_transport(learner, rollouts))
    tracker = Tracker(run_dir)
    eval_spec = SamplingSpec(n=1, max_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    pack_len = s.max_seq_len if s.packing else 0
    metrics: dict[str, float] = {}
    progress = Progress()
    bar = tqdm(plan, desc="sft", unit="step", dynamic_ncols=True, file=terminal())

    def checkpoint() -> str:
        with hold_interrupts(f"writing checkpoint-{progress.done}"):
            path = save_checkpoint(actors, run_dir, progress.done, t.keep_checkpoints)
            progress.saved = progress.done
        return path

    def cleanup() -> None:
        bar.close()  # its stream never raises (console.Unbreakable)
        tracker.close()
        plot_curves(run_dir / "metrics.jsonl", ["train/loss", "eval/heldout_nll"], run_dir / "loss.png",
                    "SFT loss (token-mean NLL)")
        plot_curves(run_dir / "metrics.jsonl", ["eval/accuracy"], run_dir / "accuracy.png", "SFT held-out accuracy")
        shutdown([learner], rollouts)

    # SFT checkpoints are weights to start from, not resumable states; Ctrl-C during an update
    # waits for it and saves its step.
    with training_tail(progress, run_dir, checkpoint, resumable=False, cleanup=cleanup):
        for step, idx in enumerate(bar, 1):
            progress.step = step
            timer = Timer(step)
            # Once the update is held, a Ctrl-C anywhere in the step logs the step before it acts.
            with booked_on_interrupt(tracker, step, lambda: metrics, timer):  # noqa: B023 (read late, on purpose)
                with hold_interrupts(f"finishing step {step} (its update is on the learner)"), timer("train"):
                    metrics = ray.get(learner.sft_step.remote(data.select(idx), pack_len))
                    metrics["train/epoch"] = (step * s.batch_size) / len(data)
                    progress.done = step
                if t.eval_every and (step % t.eval_every == 0 or step == len(plan)):
                    with timer("eval"):
                        if held_out:
                            metrics["eval/heldout_nll"] = ray.get(learner.eval_loss.remote(held))
                        if eval_acc:
                            sync_weights(actors)
                            _, m = score(partial(generate_sharded, rollouts), tokenizer, eval_set, cfg.data,
                                         eval_spec)
                            metrics.update({f"eval/{k}": v for k, v in m.items()})
                if t.save_every and step % t.save_every == 0:
                    checkpoint()
            metrics.update(timer.metrics())
            metrics["time/step"] = metrics["time/train"]
            tracker.log(step, metrics)
            bar.set_postfix({k: f"{metrics[v]:.3g}" for k, v in
                             {"loss": "train/loss", "heldout": "eval/heldout_nll", "acc": "eval/accuracy",
                              "s/step": "time/step"}.items() if v in metrics})
        path = checkpoint()
        out(f"sft checkpoint: {path}\n  next: python -m rlkd.train recipe=grpo_gsm8k model.name={path}")
    return metrics
