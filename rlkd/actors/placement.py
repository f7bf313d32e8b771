"""Where the actors run: Ray placement groups for the learner workers and rollout actors.

`plan` is pure data (the bundles, the strategy, the bundle each actor takes), so it is tested
without Ray; `reserve` turns it into placement groups and `Placement.options` into the options
an actor is created with.

- `rollout.colocate=true` (default): bundle i holds learner worker i and rollout actor i, so
  every learner shares a node with a rollout actor (weights then sync through shared memory on
  CPU) and both take their own share of the bundle's CPUs and GPUs. The bundles follow
  `rollout.placement`.
- `rollout.colocate=false`: the learners get a placement group of their own, packed because
  their all-reduce wants one node; the rollout actors' group follows `rollout.placement`.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlkd.config import Config

STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}
RESOURCE_KEYS = {"CPU": "rollout.cpus_per_actor, learner.cpus_per_worker",
                 "GPU": "rollout.gpus_per_actor, learner.gpus"}


@dataclass(frozen=True)
class Slot:
    """One actor's share of one bundle."""

    group: int  # index into Plan.groups
    bundle: int
    cpus: float
    gpus: float


@dataclass(frozen=True)
class GroupSpec:
    name: str
    bundles: list[dict[str, float]]
    strategy: str  # Ray's PACK | SPREAD


@dataclass(frozen=True)
class Plan:
    groups: list[GroupSpec]
    learners: list[Slot]  # by rank
    rollouts: list[Slot]  # by actor index

    def total(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for g in self.groups for b in g.bundles)


def _bundle(slots: list[Slot]) -> dict[str, float]:
    totals = {"CPU": sum(s.cpus for s in slots), "GPU": sum(s.gpus for s in slots)}
    return {k: v for k, v in totals.items() if v > 0}


def plan(cfg: Config) -> Plan:
    """The placement groups for `learner.num_workers` learners and `rollout.num_actors` engines."""
    r, lrn = cfg.rollout, cfg.learner
    strategy = STRATEGIES[r.placement.value]
    if r.colocate:
        n = max(lrn.num_workers, r.num_actors)
        learners = [Slot(0, i, lrn.cpus_per_worker, lrn.gpus) for i in range(lrn.num_workers)]
        rollouts = [Slot(0, i, r.cpus_per_actor, r.gpus_per_actor) for i in range(r.num_actors)]
        bundles = [_bundle([s for s in learners + rollouts if s.bundle == i]) for i in range(n)]
        return Plan([GroupSpec("actors", bundles, strategy)], learners, rollouts)
    learners = [Slot(0, i, lrn.cpus_per_worker, lrn.gpus) for i in range(lrn.num_workers)]
    rollouts = [Slot(1, i, r.cpus_per_actor, r.gpus_per_actor) for i in range(r.num_actors)]
    return Plan(
        [GroupSpec("learners", [_bundle([s]) for s in learners], "PACK"),
         GroupSpec("rollouts", [_bundle([s]) for s in rollouts], strategy)],
        learners, rollouts)


def local_num_cpus(cfg: Config) -> int:
    """CPUs a local Ray instance advertises: the cores, or what the plan reserves if more.
    Rollout and learner phases alternate, so on one machine they take turns on every core."""
    return cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(plan(cfg).total("CPU")))


@ray.remote(num_cpus=0)
def _address() -> tuple[str, int]:
    """This node's IP and a port free on it, for the learners' process-group rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


@dataclass
class Placement:
    plan: Plan
    groups: list[PlacementGroup]

    def options(self, slot: Slot) -> dict:
        """Ray actor options that put an actor in its bundle with its share of the resources."""
        return {
            "num_cpus": slot.cpus,
            "num_gpus": slot.gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.groups[slot.group], placement_group_bundle_index=slot.bundle),
        }

    def address(self, slot: Slot) -> tuple[str, int]:
        """(IP, free port) on the node of `slot`'s bundle."""
        strategy = PlacementGroupSchedulingStrategy(
            self.groups[slot.group], placement_group_bundle_index=slot.bundle)
        return ray.get(_address.options(scheduling_strategy=strategy).remote())

    def remove(self) -> None:
        for group in self.groups:
            remove_placement_group(group)


def check_fits(p: Plan, nodes: list[dict[str, float]]) -> None:
    """One-line error when no cluster of these nodes' resources can hold the plan."""
    for resource in ("CPU", "GPU"):
        need, have = p.total(resource), sum(n.get(resource, 0.0) for n in nodes)
        if need > have:
            raise RuntimeError(
                f"the actors reserve {need:g} {resource} but the Ray cluster has {have:g}: lower "
                f"rollout.num_actors, learner.num_workers or {RESOURCE_KEYS[resource]}, or add nodes")
    for spec in p.groups:
        for i, bundle in enumerate(spec.bundles):
            if not any(all(n.get(k, 0.0) >= v for k, v in bundle.items()) for n in nodes):
                raise RuntimeError(f"placement group '{spec.name}' bundle {i} {bundle} fits on no "
                                   f"single node of the Ray cluster")


def reserve(p: Plan, timeout_s: float) -> Placement:
    """Create the plan's placement groups and wait until the cluster has placed every bundle."""
    check_fits(p, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    groups = [placement_group(spec.bundles, strategy=spec.strategy, name="") for spec in p.groups]
    placement = Placement(p, groups)
    for spec, group in zip(p.groups, groups, strict=True):
        if not group.wait(timeout_seconds=timeout_s):
            placement.remove()
            raise RuntimeError(
                f"placement group '{spec.name}' ({spec.strategy} of {spec.bundles}) was not "
                f"placed within ray.placement_timeout_s={timeout_s:g}; free resources: "
                f"{ray.available_resources()}")
    return placement
