"""Ray plumbing shared by every task: the actors a run holds, how they start and stop, how
weights travel from the learner to the rollout engines, and where checkpoints are written.

    init_ray -> start_actors (placement groups, learner ranks, rollout actors, weight transport)
    -> call_learners / sync_weights / save_checkpoint per step -> stop_actors

`rollout_actor` is the one factory of rollout actors and `engine_kwargs` the one set of vLLM
engine settings; tasks never build an actor by hand.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import ray

from rlkd.actors.learner import LearnerActor
from rlkd.actors.placement import Placement, local_num_cpus, plan, reserve
from rlkd.actors.recovery import shutdown
from rlkd.actors.rollout import RolloutActor, nccl_world_size
from rlkd.actors.teacher import TeacherActor
from rlkd.config import Config
from rlkd.console import out
from rlkd.hardware import resolve_rollout_dtype, rollout_dtype

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
    _, why = resolve_rollout_dtype(cfg.rollout.dtype.value, gpu=cfg.rollout.gpus_per_actor > 0)
    out(f"[rlkd] rollout precision: {rollout_dtype(cfg)} ({why})")
    rollouts = [rollout_actor(cfg, model_path, i, placement.options(slot))
                for i, slot in enumerate(placement.plan.rollouts)]
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
        transport = cpu_transport(learner, rollouts)
    return Actors(learner, rollouts, transport, learners, placement)


def cpu_transport(learner: ray.actor.ActorHandle, rollouts: list[ray.actor.ActorHandle]) -> str:
    """`shm` when every rollout actor shares the learner's node (its export is read from shared
    memory), else `bytes` through the object store."""
    nodes = set(ray.get([r.node_id.remote() for r in rollouts]))
    return "shm" if nodes <= {ray.get(learner.node_id.remote())} else "bytes"


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
    """Push the learner's weights to every rollout actor: one export, read by all. Every actor
    must then hold the learner's version: a lost or stale update is an error, never silent."""
    if actors.transport == "nccl":  # every rank: ZeRO-3 gathers each layer collectively
        ray.get([learner.send_weights_nccl.remote() for learner in actors.learners])
        version = ray.get(actors.learner.steps_done.remote())
        held = ray.get([r.confirm_weights.remote(version) for r in actors.rollouts])
    else:
        # Every rank exports (ZeRO-3 gathers collectively); rank 0's update goes to every actor.
        updates = [learner.export_weights.remote(actors.transport) for learner in actors.learners]
        held = ray.get([r.update_weights.remote(updates[0]) for r in actors.rollouts])
        ray.get(updates[1:])
        version = ray.get(actors.learner.steps_done.remote())
    for i, v in enumerate(held):
        if v != version:
            raise RuntimeError(f"rollout actor {i} holds weights v{v} after a sync, the learner v{version}")


def save_checkpoint(actors: Actors, run_dir: Path, step: int, keep: int, state: dict | None = None) -> str:
    """`state` (the driver's, for exact resume) makes the learners add their optimizer state."""
    path = call_learners(actors, "save_checkpoint", str(run_dir / f"checkpoint-{step}"), state)
    checkpoints = sorted(run_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for partial_write in run_dir.glob("checkpoint-*.tmp"):  # left by a run killed mid-write
        shutil.rmtree(partial_write, ignore_errors=True)
    return path


def engine_kwargs(cfg: Config, seed: int | None = None) -> dict:
    """The vLLM engine settings every rollout worker, rollout actor and teacher actor is built
    with (`seed` for samplers; teachers only score)."""
    kwargs = dict(max_model_len=cfg.model.max_model_len, dtype=rollout_dtype(cfg),
                  enforce_eager=cfg.rollout.enforce_eager, kv_cache_gb=cfg.rollout.kv_cache_gb,
                  gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                  use_gpu=cfg.rollout.gpus_per_actor > 0)
    return kwargs if seed is None else {**kwargs, "seed": seed}


def rollout_actor(cfg: Config, model_path: str, index: int = 0, options: dict | None = None,
                  **extra) -> ray.actor.ActorHandle:
    """The one rollout-actor factory: rollout actor `index` of `model_path`, seeded
    run.seed + index, in `options` (a placement bundle) or beside the driver's other actors.
    Not waited for: `ray.get(actor.ready.remote())` blocks until its engine is up."""
    options = options or {"num_cpus": 0, "num_gpus": cfg.rollout.gpus_per_actor}
    return RolloutActor.options(**options, max_restarts=cfg.rollout.max_restarts).remote(
        model_path, **engine_kwargs(cfg, seed=cfg.run.seed + index),
        tensor_parallel_size=cfg.rollout.tensor_parallel_size, actor_index=index,
        cpu_cores=list(cfg.rollout.cpu_cores), **extra)


def teacher_actor(cfg: Config, model_path: str) -> ray.actor.ActorHandle:
    """A vLLM actor that scores sampled tokens under a frozen teacher (rlkd.actors.teacher)."""
    return TeacherActor.options(num_cpus=0, num_gpus=cfg.rollout.gpus_per_actor).remote(
        model_path, **engine_kwargs(cfg))
