"""GRPO driver. The loop is the algorithm; Ray, vLLM and DeepSpeed live in the actor modules.

    for each step:
        sample prompts -> generate G completions each (vLLM rollout actors)
        -> rewards -> group advantages -> learner update (DeepSpeed) -> weight sync
        -> log, periodic eval on held-out questions, checkpoint

With rollout.max_staleness = k > 0 the generation of step n+k overlaps step n's update
(rlkd/offpolicy.py: the schedule, and why it resumes exactly).
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from rlkd.actors.cluster import (
    Actors,
    call_learners,
    init_ray,
    save_checkpoint,
    start_actors,
    stop_actors,
    sync_weights,
)
from rlkd.actors.recovery import (
    Progress,
    RolloutGuard,
    SignalGuard,
    SignalLostError,
    booked_on_interrupt,
    count_bad_steps,
    hold_interrupts,
    learner_died,
    training_tail,
)
from rlkd.actors.rollout import generate_sharded
from rlkd.collapse import CollapseWatch
from rlkd.config import Config, Overlong
from rlkd.console import out, say, terminal
from rlkd.data import PromptSampler
from rlkd.errors import InputError
from rlkd.losses import BASELINES, group_advantages
from rlkd.offpolicy import RolloutsAhead, staleness_metrics
from rlkd.preflight import load_inputs, reward_name
from rlkd.resume import (
    checkpoint_step,
    driver_state,
    restore_driver_state,
    resume_checkpoint,
    truncate_metrics,
)
from rlkd.sampling import repeat_each, sample_step
from rlkd.scoring import score, write_results
from rlkd.tracking import Timer, Tracker, plot_curves, read_metrics
from rlkd.types import SamplingSpec, TrainBatch


def train(cfg: Config, run_dir: Path, actors: Actors | None = None) -> dict[str, float]:
    """Run GRPO; returns the last step's metrics. Given `actors`, trains them and leaves them
    running; otherwise starts its own and stops them at the end."""
    g, t = cfg.grpo, cfg.trainer
    inputs = load_inputs(cfg)
    tokenizer, eval_set = inputs.tokenizer, inputs.eval_set
    cfg = replace(cfg, data=inputs.data)  # prompts describe the environment's tools, if any
    reward_fns, reward_weights = inputs.reward_fns, inputs.reward_weights
    resume_from = resume_checkpoint(cfg, run_dir)
    start_step = checkpoint_step(resume_from) if resume_from else 0
    if start_step >= t.max_steps:
        out(f"rlkd: {resume_from} is at step {start_step}, trainer.max_steps={t.max_steps}: "
              "nothing left to train")
        return {}

    own_actors = actors is None
    if own_actors:
        init_ray(cfg)
        actors = start_actors(cfg, inputs.model_path)
    sampler = PromptSampler(inputs.train_set, cfg.run.seed)
    bad_steps = 0
    guard = RolloutGuard(actors.learner, actors.rollouts, partial(sync_weights, actors),
                         cfg.rollout.max_restarts)
    truncate_metrics(run_dir / "metrics.jsonl", start_step)
    tracker = Tracker(run_dir, purge_step=start_step + 1)
    spec = SamplingSpec(n=g.group_size, max_tokens=cfg.rollout.max_new_tokens,
                        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        environment=inputs.environment)

    def generate(prompts, spec, rows=None):
        return guard("generate", partial(generate_sharded, actors.rollouts, prompts, spec, rows))

    signal_guard = SignalGuard(t, reward_fns)
    collapse = CollapseWatch(t.collapse_window, t.collapse_length_ratio, list(reward_fns))
    collapse.replay(read_metrics(run_dir / "metrics.jsonl"))  # a resumed run's steps 1..start_step
    eval_spec = SamplingSpec(n=1, max_tokens=cfg.eval.max_new_tokens, temperature=0.0, environment=inputs.environment)
    k = cfg.rollout.max_staleness

    def produce(step: int):  # on the driver's thread (k = 0) or the background one
        return sample_step(cfg, sampler, tokenizer, generate, reward_fns, reward_weights, replace(spec), step)

    ahead: RolloutsAhead | None = None
    metrics: dict[str, float] = {}
    progress = Progress(start_step, start_step, start_step)
    done_state = None

    def held_out(step: int) -> dict[str, float]:
        """Greedy accuracy on the eval set; its predictions go to eval/step-N/ for eval.compare."""
        preds, m = guard("eval", partial(score, partial(generate_sharded, actors.rollouts), tokenizer,
                                         eval_set, cfg.data, eval_spec))
        eval_dir = run_dir / "eval" / f"step-{step}"
        eval_dir.mkdir(parents=True, exist_ok=True)
        write_results(eval_dir, f"step {step}", preds, m)
        return {f"eval/{k}": v for k, v in m.items()}

    def checkpoint() -> None:
        with hold_interrupts(f"writing checkpoint-{progress.done}"):
            save_checkpoint(actors, run_dir, progress.done, t.keep_checkpoints, done_state)
            progress.saved = progress.done

    def cleanup() -> None:
        bar.close()  # its stream never raises (console.Unbreakable)
        tracker.close()
        _plots(run_dir, cfg)
        if own_actors:
            stop_actors(actors)
        if ahead is not None:  # after the actors: a generation still running ends with them
            ahead.close()

    bar = tqdm(range(start_step + 1, t.max_steps + 1), desc="grpo", unit="step", dynamic_ncols=True, file=terminal(),
               initial=start_step, total=t.max_steps)
    # Steps hold Ctrl-C from update to bookkeeping; should the learner still be a step past
    # `done` (an error cut the step short), no checkpoint of its weights resumes exactly.
    tail = training_tail(progress, run_dir, checkpoint, resumable=t.save_state, cleanup=cleanup,
                         died=learner_died,
                         can_save=lambda: ray.get(actors.learner.steps_done.remote()) == progress.done)
    with tail:
        pending = {}
        if resume_from:
            state = call_learners(actors, "load_checkpoint", str(resume_from))
            _, bad_steps = restore_driver_state(state, sampler)
            pending = _pending_rollouts(state, k, resume_from)
            sync_weights(actors)
            _note(bar, f"rlkd: resumed from {resume_from}")
        elif t.eval_every:  # the untrained policy, so the curve and eval/ start from it
            tracker.log(0, held_out(0))
        ahead = RolloutsAhead(produce, k, t.max_steps, pending)
        for step in bar:
            progress.step = step
            timer, start = Timer(step), time.perf_counter()
            with timer("generate"):
                ro = ahead.take(step)
            ahead.start_ahead(step)  # k > 0: step + k generates while this step trains
            with timer("reward"):
                advantages_N, adv_metrics = group_advantages(
                    torch.tensor(ro.rewards_N), g.group_size, scale=g.adv_scale.value,
                    baseline=BASELINES[g.adv_estimator.value])
            gen = ro.gen
            # Overlong filtering: a cut-off completion keeps its place (ranks shard by position)
            # but no tokens, so no loss term and no share of any denominator.
            masked = [g.overlong == Overlong.mask and cut for cut in gen.truncated]
            batch = TrainBatch(
                prompt_ids=repeat_each(gen.prompt_ids, g.group_size),
                completion_ids=[[] if m else c for c, m in zip(gen.completion_ids, masked, strict=True)],
                rollout_logprobs=[[] if m else lp for lp, m in zip(gen.logprobs, masked, strict=True)],
                advantages=advantages_N.tolist(),
                loss_masks=[[] if m else lm for lm, m in zip(gen.loss_masks, masked, strict=True)] if gen.loss_masks else [],
            )
            # A Ctrl-C that lands from here on finds the step finished (the update is held): the
            # step is logged before the interrupt acts, so a resumed run lists every step once.
            with booked_on_interrupt(tracker, step, lambda: metrics, timer):  # noqa: B023 (read late, on purpose)
                # From the moment an update is sent until its step is booked, Ctrl-C waits: the
                # learner finishes the update anyway, and the checkpoint on the way out holds it.
                with hold_interrupts(f"finishing step {step} (its update is on the learner)"):
                    with timer("train"):
                        metrics = call_learners(actors, "train_step", batch)
                    bad_steps = count_bad_steps(bad_steps, metrics["train/skipped_steps"], step, t.max_bad_steps)
                    if k:  # the generation ahead lands before the sync replaces its weights
                        with timer("wait_rollouts"):
                            ahead.settle()
                    with timer("sync"):
                        guard("weight sync", partial(sync_weights, actors))
                    lengths = gen.policy_tokens()  # tool tokens are not the policy's length
                    metrics.update(ro.metrics)
                    metrics["rollout/failures"] = guard.failures
                    metrics.update({f"adv/{k}": v for k, v in adv_metrics.items()})
                    metrics.update({
                        "completion/mean_tokens": sum(lengths) / len(lengths),
                        "completion/truncated_frac": sum(gen.truncated) / len(gen.truncated),
                        "rollout/tokens_per_s": ro.metrics["sampling/tokens_generated"] / max(gen.seconds, 1e-9),
                        "time/step": time.perf_counter() - start,  # generate to sync: eval and saves apart
                    })
                    if k:
                        metrics.update(staleness_metrics(gen.policy_versions, step - 1, k, lengths))
                    progress.done = step
                    done_state = driver_state(step, sampler, bad_steps) if t.save_state else None
                    if done_state is not None and k:  # generated ahead, not yet trained on
                        done_state |= {"max_staleness": k, "pending_rollouts": ahead.pending()}
                if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                    with timer("eval"):
                        metrics.update(held_out(step))
                if t.save_every and step % t.save_every == 0:
                    with hold_interrupts(f"writing checkpoint-{step}"), timer("checkpoint"):
                        checkpoint()
            metrics.update(timer.metrics())
            if k:  # and the bar shows how far generation has run ahead of training
                metrics.update(ahead.idle_metrics(metrics))
                metrics["offpolicy/generated_through"] = float(max(ahead.pending(), default=step))
            tracker.log(step, metrics)
            bar.set_postfix(_postfix(metrics))
            stop = signal_guard.check(step, metrics)
            hacking = collapse.observe(step, metrics)
            if hacking:
                _note(bar, f"rlkd: {hacking}")
                stop = stop or (hacking if t.stop_on_collapse else None)
            if stop:
                if progress.saved < progress.done:
                    checkpoint()
                raise SignalLostError(f"{stop}; checkpoint-{progress.saved} in {run_dir} holds step "
                                      f"{progress.saved}")
        if progress.saved < progress.done:
            checkpoint()
    return metrics


def _note(bar: tqdm, message: str) -> None:
    """A line for the terminal (and the run log) above the progress bar. tqdm's own `write`
    prints to sys.stdout, which is the run log once library output is captured."""
    with bar.external_write_mode(file=terminal()):
        say(message)


def _pending_rollouts(state: dict, k: int, checkpoint: Path) -> dict:
    """The rollouts a checkpoint generated ahead of its step; resuming needs the same k."""
    saved = state.get("max_staleness", 0)
    if saved != k:
        raise InputError(f"{checkpoint} was saved with rollout.max_staleness={saved}; resume it with the "
                         f"same value (got {k}) so that its rollouts generated ahead are trained as they were")
    return state.get("pending_rollouts", {})


def _postfix(m: dict[str, float]) -> dict[str, str]:
    keys = {"reward": "reward/total_mean", "acc": "reward/gsm8k_correct", "len": "completion/mean_tokens",
            "kl": "train/kl", "s/step": "time/step", "eval": "eval/accuracy", "generated": "offpolicy/generated_through"}
    return {k: f"{m[v]:.3g}" for k, v in keys.items() if v in m}


def _plots(run_dir: Path, cfg: Config) -> None:
    path = run_dir / "metrics.jsonl"
    per_fn = [f"reward/{reward_name(f)}" for f in cfg.rewards.funcs]
    # With one reward the total is that reward again (times its weight): one panel, not two.
    reward_keys = [*(["reward/total_mean"] if len(per_fn) > 1 else []), *per_fn, "eval/accuracy"]
    plot_curves(path, reward_keys, run_dir / "rewards.png", "GRPO rewards and held-out accuracy")
    if cfg.rollout.environment:
        plot_curves(path, ["tool/call_rate", "tool/calls_mean", "tool/tokens_frac", "tool/errors"],
                    run_dir / "tools.png", f"GRPO tool use ({cfg.rollout.environment})")
    plot_curves(path, ["completion/mean_tokens", "train/clip_frac", "train/logp_mismatch", "train/kl",
                       "time/generate", "time/train", "time/sync"], run_dir / "training.png", "GRPO training")
