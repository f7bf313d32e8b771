"""GRPO driver. The loop is the algorithm; Ray, vLLM and DeepSpeed live in the actor modules.

    for each step:
        sample prompts -> generate G completions each (vLLM rollout actors)
        -> rewards -> group advantages -> learner update (DeepSpeed) -> weight sync
        -> log, periodic eval on held-out questions, checkpoint
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import ray
import torch
from ray.exceptions import OutOfMemoryError, RayActorError
from tqdm import tqdm

from rlkd.config import Config, Overlong
from rlkd.console import close_quietly, out, say, terminal
from rlkd.data import PromptSampler
from rlkd.eval import score, write_results
from rlkd.hardware import resolve_rollout_dtype
from rlkd.learner import LearnerActor, TrainBatch
from rlkd.losses import BASELINES, group_advantages
from rlkd.placement import Placement, local_num_cpus, plan, reserve
from rlkd.preflight import load_inputs, reward_name
from rlkd.recovery import (
    RolloutGuard,
    SignalGuard,
    SignalLostError,
    count_bad_steps,
    interrupted,
    learner_died,
    save_on_interrupt,
    shutdown,
)
from rlkd.resume import (
    checkpoint_step,
    driver_state,
    restore_driver_state,
    resume_checkpoint,
    truncate_metrics,
)
from rlkd.rollout import RolloutActor, SamplingSpec, generate_sharded, nccl_world_size
from rlkd.sampling import repeat_each, sample_step
from rlkd.tracking import Timer, Tracker, plot_curves

# Environment every actor (and the vLLM processes it spawns) starts with.
ACTOR_ENV = {
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Actors:
    learner: ray.actor.ActorHandle  # rank 0 of `learners`
    rollouts: list[ray.actor.ActorHandle]
    transport: str  # "shm" | "bytes" | "nccl"
    learners: list[ray.actor.ActorHandle] = field(default_factory=list)  # data-parallel ranks
    placement: Placement | None = None

    def __post_init__(self):
        # A single learner is rank 0 of a one-rank group: every per-rank call must reach it.
        self.learners = self.learners or [self.learner]


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    # Empty ray.address starts a private local instance instead of silently joining whatever
    # `ray start` cluster runs on this machine; `ray job submit` sets RAY_ADDRESS to join.
    joins = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    ray.init(
        address=cfg.ray.address or (None if joins else "local"),
        num_cpus=None if joins else local_num_cpus(cfg),
        include_dashboard=False,
        runtime_env={"env_vars": ACTOR_ENV},
        log_to_driver=True,
    )


def start_learners(cfg: Config, model_path: str, placement: Placement) -> list[ray.actor.ActorHandle]:
    """learner.num_workers DeepSpeed ranks in their bundles; they rendezvous on rank 0's node."""
    slots = placement.plan.learners
    master_addr, master_port = placement.address(slots[0])
    return [
        LearnerActor.options(**placement.options(slot)).remote(
            cfg, model_path, rank=rank, world_size=len(slots),
            master_addr=master_addr, master_port=master_port)
        for rank, slot in enumerate(slots)
    ]


def start_rollouts(cfg: Config, model_path: str, placement: Placement) -> list[ray.actor.ActorHandle]:
    """rollout.num_actors vLLM engines in their bundles, started (blocks until they are)."""
    dtype, why = resolve_rollout_dtype(cfg.rollout.dtype.value, gpu=cfg.rollout.gpus_per_actor > 0)
    out(f"[rlkd] rollout precision: {dtype} ({why})")
    rollouts = [
        RolloutActor.options(**placement.options(slot), max_restarts=cfg.rollout.max_restarts).remote(
            model_path,
            max_model_len=cfg.model.max_model_len,
            dtype=dtype,
            enforce_eager=cfg.rollout.enforce_eager,
            kv_cache_gb=cfg.rollout.kv_cache_gb,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            tensor_parallel_size=cfg.rollout.tensor_parallel_size,
            use_gpu=cfg.rollout.gpus_per_actor > 0,
            seed=cfg.run.seed + i,
            actor_index=i,
        )
        for i, slot in enumerate(placement.plan.rollouts)
    ]
    ray.get([r.ready.remote() for r in rollouts])
    return rollouts


def start_actors(cfg: Config, model_path: str, learner: ray.actor.ActorHandle | None = None) -> Actors:
    """Learner ranks (or the one `learner` given, for distillation) and rollout.num_actors vLLM
    engines in placement groups; picks the weight transport."""
    use_gpu = cfg.rollout.gpus_per_actor > 0
    placement = reserve(plan(cfg), cfg.ray.placement_timeout_s)
    learners = [learner] if learner is not None else start_learners(cfg, model_path, placement)
    rollouts = start_rollouts(cfg, model_path, placement)
    learner = learners[0]
    out(f"[rlkd] learner precision: {ray.get(learner.precision.remote())}")
    if use_gpu:
        transport = "nccl"
        world = nccl_world_size(cfg.rollout.num_actors, cfg.rollout.tensor_parallel_size)
        _, port = placement.address(placement.plan.learners[0])  # free on the sender's node
        ray.get([rank.init_nccl_sync.remote(rollouts, port, world) for rank in learners])
    else:
        nodes = set(ray.get([r.node_id.remote() for r in rollouts]))
        same_node = nodes == {ray.get(learner.node_id.remote())}
        transport = "shm" if same_node else "bytes"
    return Actors(learner, rollouts, transport, learners, placement)


def call_learners(actors: Actors, method: str, *args):
    """Run `method` on every data-parallel rank (they step together); returns rank 0's result.
    Arguments go into the object store once, for all ranks."""
    refs = [ray.put(a) for a in args]
    return ray.get([getattr(learner, method).remote(*refs) for learner in actors.learners])[0]


def stop_actors(actors: Actors) -> None:
    shutdown(actors.learners, actors.rollouts)
    if actors.placement is not None:
        actors.placement.remove()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def sync_weights(actors: Actors) -> None:
    """Push the learner's weights to every rollout actor: one export, read by all."""
    if actors.transport == "nccl":  # every rank: ZeRO-3 gathers each layer collectively
        ray.get([learner.send_weights_nccl.remote() for learner in actors.learners])
        return
    # Every rank exports (ZeRO-3 gathers collectively); rank 0's update goes to every actor.
    updates = [learner.export_weights.remote(actors.transport) for learner in actors.learners]
    ray.get([*(r.update_weights.remote(updates[0]) for r in actors.rollouts), *updates[1:]])


def save_checkpoint(actors: Actors, run_dir: Path, step: int, keep: int, state: dict | None = None) -> str:
    """`state` (the driver's, for exact resume) makes the learners add their optimizer state."""
    path = call_learners(actors, "save_checkpoint", str(run_dir / f"checkpoint-{step}"), state)
    checkpoints = sorted(run_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for partial_write in run_dir.glob("checkpoint-*.tmp"):  # left by a run killed mid-write
        shutil.rmtree(partial_write, ignore_errors=True)
    return path


def train(cfg: Config, run_dir: Path, actors: Actors | None = None) -> dict[str, float]:
    """Run GRPO; returns the last step's metrics. Given `actors`, trains them and leaves them
    running; otherwise starts its own and stops them at the end."""
    g, t = cfg.grpo, cfg.trainer
    inputs = load_inputs(cfg)
    tokenizer, eval_set = inputs.tokenizer, inputs.eval_set
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
                        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    def generate(prompts, spec):
        return guard("generate", partial(generate_sharded, actors.rollouts, prompts, spec))

    signal_guard = SignalGuard(t, reward_fns)
    eval_spec = SamplingSpec(n=1, max_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    metrics: dict[str, float] = {}
    step = done = saved = start_step  # current, last finished and last checkpointed step
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
        nonlocal saved
        save_checkpoint(actors, run_dir, done, t.keep_checkpoints, done_state)
        saved = done

    bar = tqdm(range(start_step + 1, t.max_steps + 1), desc="grpo", unit="step", dynamic_ncols=True, file=terminal(),
               initial=start_step, total=t.max_steps)
    try:
        if resume_from:
            state = call_learners(actors, "load_checkpoint", str(resume_from))
            _, bad_steps = restore_driver_state(state, sampler)
            sync_weights(actors)
            bar.write(f"rlkd: resumed from {resume_from}")
        elif t.eval_every:  # the untrained policy, so the curve and eval/ start from it
            tracker.log(0, held_out(0))
        for step in bar:
            timer, start = Timer(), time.perf_counter()
            with timer("generate"):
                ro = sample_step(cfg, sampler, tokenizer, generate, reward_fns, reward_weights, spec, step)
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
            )
            with timer("train"):
                metrics = call_learners(actors, "train_step", batch)
            bad_steps = count_bad_steps(bad_steps, metrics["train/skipped_steps"], step, t.max_bad_steps)
            with timer("sync"):
                guard("weight sync", partial(sync_weights, actors))

            lengths = [len(c) for c in gen.completion_ids]
            metrics.update(timer.metrics())
            metrics.update(ro.metrics)
            metrics["rollout/failures"] = guard.failures
            metrics.update({f"adv/{k}": v for k, v in adv_metrics.items()})
            metrics.update({
                "completion/mean_tokens": sum(lengths) / len(lengths),
                "completion/truncated_frac": sum(gen.truncated) / len(gen.truncated),
                "rollout/tokens_per_s": ro.metrics["sampling/tokens_generated"] / max(gen.seconds, 1e-9),
                "time/step": time.perf_counter() - start,
            })
            if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                metrics.update(held_out(step))
            done = step
            done_state = driver_state(step, sampler, bad_steps) if t.save_state else None
            if t.save_every and step % t.save_every == 0:
                checkpoint()
            tracker.log(step, metrics)
            bar.set_postfix(_postfix(metrics))
            stop = signal_guard.check(step, metrics)
            if stop:
                if saved < done:
                    checkpoint()
                raise SignalLostError(f"{stop}; checkpoint-{saved} in {run_dir} holds step {saved}")
        if saved < done:
            checkpoint()
    except (RayActorError, OutOfMemoryError) as e:  # the guard handles rollouts': the learner died
        raise learner_died(e, step, run_dir) from e
    except KeyboardInterrupt:
        # An update already sent to the learner finishes there: then its weights are one step
        # past `done` and no checkpoint of them can be resumed exactly.
        if saved < done and ray.get(actors.learner.steps_done.remote()) == done:
            say(f"rlkd: interrupted after step {done}: saving a checkpoint before exiting")
            save_on_interrupt(checkpoint)
        raise interrupted(step, saved, run_dir, resumable=t.save_state) from None
    finally:
        close_quietly(bar)
        tracker.close()
        _plots(run_dir, cfg)
        if own_actors:
            stop_actors(actors)
    return metrics


def _postfix(m: dict[str, float]) -> dict[str, str]:
    keys = {"reward": "reward/total_mean", "acc": "reward/gsm8k_correct", "len": "completion/mean_tokens",
            "kl": "train/kl", "s/step": "time/step", "eval": "eval/accuracy"}
    return {k: f"{m[v]:.3g}" for k, v in keys.items() if v in m}


def _plots(run_dir: Path, cfg: Config) -> None:
    path = run_dir / "metrics.jsonl"
    per_fn = [f"reward/{reward_name(f)}" for f in cfg.rewards.funcs]
    # With one reward the total is that reward again (times its weight): one panel, not two.
    reward_keys = [*(["reward/total_mean"] if len(per_fn) > 1 else []), *per_fn, "eval/accuracy"]
    plot_curves(path, reward_keys, run_dir / "rewards.png", "GRPO rewards and held-out accuracy")
    plot_curves(path, ["completion/mean_tokens", "train/clip_frac", "train/logp_mismatch", "train/kl",
                       "time/generate", "time/train", "time/sync"], run_dir / "training.png", "GRPO training")
