"""On-policy distillation driver (task=distill): MiniLLM, GKD or forward KL from frozen teachers.

    build the student (model.name, or pruned out of the first teacher) -> check shared vocab
    for each step:
        sample prompts -> student completions (vLLM; teacher-mixed on the learner if alpha > 0;
        GKD: with probability 1 - lmbda, GSM8K reference solutions instead)
        -> teacher log-probs of the sampled tokens (MiniLLM) -> optional task-reward advantages
        -> learner distill_step -> weight sync
        -> log; every trainer.eval_every steps: held-out reverse KL and accuracy; checkpoint

Batch shape comes from grpo.prompts_per_step x grpo.group_size, the clip range from grpo.clip_*.
The held-out reverse KL is the Monte-Carlo estimate mean_t [log q_S(y_t) - log p_T(y_t)] over
tokens the student samples at temperature 1: unbiased for KL(q_S || p_T) per token of a
sequence, and measured the same way whichever objective trains.
"""

from __future__ import annotations

import math
import random
import time
from functools import partial
from pathlib import Path

import ray
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from rewards import compute_rewards, load_reward
from rlkd.actors.cluster import (
    free_port,
    init_ray,
    save_checkpoint,
    start_actors,
    stop_actors,
    sync_weights,
    teacher_actor,
)
from rlkd.actors.distill_learner import DistillLearnerActor, needs_learner_teachers
from rlkd.actors.recovery import (
    Progress,
    booked_on_interrupt,
    hold_interrupts,
    shutdown,
    training_tail,
)
from rlkd.actors.rollout import generate_sharded
from rlkd.actors.teacher import shared_vocab_size
from rlkd.config import Config
from rlkd.config_distill import DistillObjective, StudentInit
from rlkd.console import out, terminal
from rlkd.data import PromptSampler, build_prompt, encode_prompt, gold_text, load_split
from rlkd.lora import check_lora
from rlkd.losses import BASELINES, group_advantages
from rlkd.models import count_parameters, resolve_model
from rlkd.preflight import reward_name
from rlkd.prune import prune
from rlkd.sampling import repeat_each, reward_columns, reward_metrics
from rlkd.scoring import score
from rlkd.tracking import Timer, Tracker, plot_curves
from rlkd.types import DistillBatch, Example, SamplingSpec


def build_student(cfg: Config, run_dir: Path, teacher_path: str) -> str:
    """model.name, or (student.init=prune) a layer subset of the first teacher saved in run_dir."""
    if cfg.student.init == StudentInit.prune:
        path = run_dir / "student-init"
        counts = prune(teacher_path, path, cfg.student.layers)
        out(f"rlkd: pruned student {path}: {counts['student_layers']} layers, "
              f"{counts['student_params']:,} parameters (teacher {counts['teacher_params']:,})")
        return str(path)
    return str(resolve_model(cfg.model.name, cfg.model.cache_dir or None))


def reference_ids(tokenizer, ex: Example, max_tokens: int) -> list[int]:
    """The gold solution in the '#### N' format the prompt asks for, ending the turn."""
    ids = tokenizer(gold_text(ex), add_special_tokens=False).input_ids
    return (ids + [tokenizer.eos_token_id])[:max_tokens]


def reverse_kl_estimate(student_lps: list[list[float]], teacher_lps: list[list[list[float]]],
                        weights: list[float]) -> float:
    """Token mean of log q_S(y_t) - log sum_k w_k p_k(y_t) over the student's samples."""
    total, count = 0.0, 0
    w = [x / sum(weights) for x in weights]
    for i, row in enumerate(student_lps):
        for t, lq in enumerate(row):
            lp = math.log(sum(wk * math.exp(teacher_lps[k][i][t]) for k, wk in enumerate(w)) or 1e-300)
            total, count = total + lq - lp, count + 1
    return total / max(count, 1)


def train(cfg: Config, run_dir: Path) -> dict[str, float]:
    """Distil cfg.distill.teachers into the student; returns the last step's metrics."""
    d, g, t = cfg.distill, cfg.grpo, cfg.trainer
    cache = cfg.model.cache_dir or None
    teacher_paths = [str(resolve_model(name, cache)) for name in d.teachers]
    student_path = build_student(cfg, run_dir, teacher_paths[0])
    check_lora(student_path, cfg.learner.lora)
    vocab_size = shared_vocab_size(student_path, teacher_paths)
    sizes = {"params/student": count_parameters(student_path),
             **{f"params/teacher_{k}": count_parameters(p) for k, p in enumerate(teacher_paths)}}
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    train_set = load_split(cfg.data, cfg.data.split)
    held_out = load_split(cfg.data, cfg.data.eval_split, limit=max(t.eval_samples, d.kl_eval_prompts))
    reward_fns = {reward_name(spec): load_reward(spec) for spec in cfg.rewards.funcs}
    reward_weights = dict(zip(reward_fns, cfg.rewards.weights, strict=True))

    init_ray(cfg)
    # A free rendezvous port: DeepSpeed's default 29500 may be taken by another run on the node.
    learner = DistillLearnerActor.options(num_cpus=0, num_gpus=cfg.learner.gpus).remote(
        cfg, student_path, teacher_paths, vocab_size, master_port=free_port())
    actors = start_actors(cfg, student_path, learner=learner)
    # Sampled-token scoring goes to vLLM teacher actors unless the learner holds the teachers.
    teachers = [] if needs_learner_teachers(cfg) else [teacher_actor(cfg, p) for p in teacher_paths]
    ray.get([a.ready.remote() for a in teachers])

    def teacher_logprobs(prompt_ids, completion_ids) -> list[list[list[float]]]:  # [K][N]
        if teachers:
            return ray.get([a.score.remote(prompt_ids, completion_ids) for a in teachers])
        return ray.get(learner.teacher_logprobs.remote(prompt_ids, completion_ids))

    kl_prompts = [build_prompt(tokenizer, ex.question, cfg.data) for ex in held_out[:d.kl_eval_prompts]]
    kl_spec = SamplingSpec(n=d.kl_eval_samples, max_tokens=cfg.rollout.max_new_tokens,
                           temperature=1.0, seed=cfg.run.seed + 7)

    def held_out_metrics() -> dict[str, float]:
        gen = generate_sharded(actors.rollouts, kl_prompts, kl_spec)
        scores = teacher_logprobs(repeat_each(gen.prompt_ids, d.kl_eval_samples), gen.completion_ids)
        out = {"eval/reverse_kl": reverse_kl_estimate(gen.logprobs, scores, d.teacher_weights)}
        _, acc = score(partial(generate_sharded, actors.rollouts), tokenizer, held_out[:t.eval_samples],
                       cfg.data, SamplingSpec(n=1, max_tokens=cfg.eval.max_new_tokens, temperature=0.0))
        out.update({f"eval/{k}": v for k, v in acc.items()})
        return out

    sampler = PromptSampler(train_set, cfg.run.seed)
    sft_sampler = PromptSampler(train_set, cfg.run.seed + 1)
    coin = random.Random(cfg.run.seed)
    tracker = Tracker(run_dir)
    spec = SamplingSpec(n=g.group_size, max_tokens=cfg.rollout.max_new_tokens,
                        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    N = g.prompts_per_step * g.group_size
    metrics: dict[str, float] = {}
    progress = Progress()
    bar = tqdm(range(1, t.max_steps + 1), desc=d.objective.value, unit="step", dynamic_ncols=True, file=terminal())

    def checkpoint() -> None:
        with hold_interrupts(f"writing checkpoint-{progress.done}"):
            save_checkpoint(actors, run_dir, progress.done, t.keep_checkpoints)
            progress.saved = progress.done

    def cleanup() -> None:
        bar.close()  # its stream never raises (console.Unbreakable)
        tracker.close()
        plot_curves(run_dir / "metrics.jsonl", ["eval/reverse_kl", "train/single_step_kl", "train/jsd",
                                                "train/forward_kl", "eval/accuracy"],
                    run_dir / "distill.png", f"{d.objective.value}: student vs teacher")
        stop_actors(actors)
        shutdown([], teachers)

    # As SFT: checkpoints are weights to start from; Ctrl-C during an update waits for it.
    with training_tail(progress, run_dir, checkpoint, resumable=False, cleanup=cleanup):
        tracker.log(0, {**sizes, **(held_out_metrics() if t.eval_every else {})})
        for step in bar:
            progress.step = step
            timer, start = Timer(step), time.perf_counter()
            on_policy = d.objective != DistillObjective.gkd or coin.random() < d.lmbda
            examples = sampler.next(g.prompts_per_step if on_policy else N)
            prompts = [build_prompt(tokenizer, ex.question, cfg.data) for ex in examples]
            spec.seed = cfg.run.seed * 1_000_003 + step
            advantages = [0.0] * N
            with timer("generate"):
                if not on_policy:
                    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
                    completion_ids = [reference_ids(tokenizer, ex, cfg.rollout.max_new_tokens) for ex in examples]
                elif d.mix_alpha > 0:
                    ids = [encode_prompt(tokenizer, p) for p in prompts]
                    gen = ray.get(learner.sample_mixed.remote(ids, g.group_size, spec.max_tokens, spec.seed))
                else:
                    gen = generate_sharded(actors.rollouts, prompts, spec)
                if on_policy:
                    prompt_ids, completion_ids = repeat_each(gen.prompt_ids, g.group_size), gen.completion_ids
            if on_policy:
                with timer("reward"):
                    rewards_N, per_fn, errors = compute_rewards(
                        reward_fns, reward_weights, gen.texts, on_error=cfg.rewards.on_error.value,
                        **reward_columns(examples, prompts, g.group_size, gen.truncated,
                                         [len(c) for c in gen.completion_ids]))
                    if d.task_coef:
                        advantages = group_advantages(torch.tensor(rewards_N), g.group_size, scale=g.adv_scale.value,
                                                      baseline=BASELINES[g.adv_estimator.value])[0].tolist()
                metrics_extra = reward_metrics(reward_fns, gen.texts, rewards_N, per_fn, errors)
            else:
                metrics_extra = {}
            with timer("teacher"):
                minillm_actors = teachers and d.objective == DistillObjective.minillm
                scores = teacher_logprobs(prompt_ids, completion_ids) if minillm_actors else []
            sft = sft_sampler.next(N) if d.lm_coef else []
            batch = DistillBatch(
                prompt_ids, completion_ids, scores, advantages,
                sft_prompt_ids=[encode_prompt(tokenizer, build_prompt(tokenizer, ex.question, cfg.data))
                                for ex in sft],
                sft_completion_ids=[reference_ids(tokenizer, ex, cfg.rollout.max_new_tokens) for ex in sft],
                student_logprobs=gen.logprobs if on_policy else [])
            # Once the update is held, a Ctrl-C anywhere in the step logs the step before it acts.
            with booked_on_interrupt(tracker, step, lambda: metrics, timer):  # noqa: B023 (read late, on purpose)
                with hold_interrupts(f"finishing step {step} (its update is on the learner)"):
                    with timer("train"):
                        metrics = ray.get(learner.distill_step.remote(batch))
                    with timer("sync"):
                        sync_weights(actors)
                    lengths = [len(c) for c in completion_ids]
                    metrics.update(metrics_extra)
                    metrics.update({"train/on_policy": float(on_policy),
                                    "completion/mean_tokens": sum(lengths) / len(lengths),
                                    "time/step": time.perf_counter() - start})
                    progress.done = step
                if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                    with timer("eval"):
                        metrics.update(held_out_metrics())
                if t.save_every and step % t.save_every == 0:
                    checkpoint()
            metrics.update(timer.metrics())
            tracker.log(step, metrics)
            bar.set_postfix({k: f"{metrics[v]:.3g}" for k, v in
                             {"loss": "train/loss", "kl": "eval/reverse_kl", "s/step": "time/step"}.items()
                             if v in metrics})
        checkpoint()
    return metrics
