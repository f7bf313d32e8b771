"""Placement plans (pure), the cluster-fit check, NCCL rank blocks and resource validation."""

from types import SimpleNamespace

import pytest
from vllm.distributed.weight_transfer.base import WeightTransferInitRequest
from vllm.distributed.weight_transfer.nccl_common import (
    NCCLWeightTransferInitInfo,
    worker_init_payload,
)

from rlkd.actors.learner import shard_rows
from rlkd.actors.placement import check_fits, local_num_cpus, plan
from rlkd.actors.rollout import RolloutWorker, nccl_rank_offset, nccl_world_size
from rlkd.compose import load_config
from rlkd.errors import ConfigError


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_default_colocates_one_learner_and_one_engine_in_one_bundle():
    p = plan(_cfg())
    assert len(p.groups) == 1 and p.groups[0].strategy == "PACK"
    assert p.groups[0].bundles == [{"CPU": 2.0}]
    assert p.learners[0].bundle == p.rollouts[0].bundle == 0
    assert p.learners[0].cpus == p.rollouts[0].cpus == 1.0 and p.learners[0].gpus == 0


def test_colocated_spread_pairs_learner_i_with_engine_i():
    p = plan(_cfg("rollout.num_actors=3", "learner.num_workers=2", "rollout.placement=spread",
                  "rollout.cpus_per_actor=2", "learner.cpus_per_worker=0.5"))
    (group,) = p.groups
    assert group.strategy == "SPREAD"
    assert group.bundles == [{"CPU": 2.5}, {"CPU": 2.5}, {"CPU": 2.0}]
    assert [s.bundle for s in p.learners] == [0, 1]
    assert [s.bundle for s in p.rollouts] == [0, 1, 2]
    assert p.total("CPU") == 7.0


def test_more_learners_than_engines_get_bundles_of_their_own():
    p = plan(_cfg("learner.num_workers=4", "rollout.num_actors=1"))
    assert p.groups[0].bundles == [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]


def test_separate_gpu_placement_packs_learners_and_gives_each_engine_its_tp_gpus():
    p = plan(_cfg("rollout.colocate=false", "rollout.placement=spread", "rollout.num_actors=2",
                  "rollout.gpus_per_actor=2", "rollout.tensor_parallel_size=2",
                  "learner.num_workers=2", "learner.gpus=1"))
    learners, rollouts = p.groups
    assert (learners.strategy, rollouts.strategy) == ("PACK", "SPREAD")
    assert learners.bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert rollouts.bundles == [{"CPU": 1.0, "GPU": 2.0}] * 2
    assert {s.group for s in p.learners} == {0} and {s.group for s in p.rollouts} == {1}
    assert p.total("GPU") == 6.0


def test_check_fits_names_the_shortfall():
    p = plan(_cfg("rollout.num_actors=2", "rollout.placement=spread"))  # bundles 2 + 1 CPU
    check_fits(p, [{"CPU": 2.0}, {"CPU": 1.0}])
    with pytest.raises(RuntimeError, match=r"reserve 3 CPU but the Ray cluster has 2"):
        check_fits(p, [{"CPU": 1.0}, {"CPU": 1.0}])
    with pytest.raises(RuntimeError, match=r"bundle 0 \{'CPU': 2.0\} fits on no single node"):
        check_fits(p, [{"CPU": 1.5}, {"CPU": 1.5}])
    gpu = plan(_cfg("rollout.gpus_per_actor=1", "learner.gpus=1", "rollout.colocate=false"))
    with pytest.raises(RuntimeError, match=r"reserve 2 GPU .* rollout.gpus_per_actor, learner.gpus"):
        check_fits(gpu, [{"CPU": 8.0, "GPU": 1.0}])


def test_local_ray_advertises_at_least_what_the_plan_reserves():
    assert local_num_cpus(_cfg("ray.num_cpus=3")) == 3
    assert local_num_cpus(_cfg("rollout.num_actors=8", "rollout.cpus_per_actor=4")) >= 33


@pytest.mark.parametrize("num_actors, tp", [(1, 1), (3, 1), (2, 4)])
def test_nccl_rank_blocks_tile_the_group_after_the_sender(num_actors, tp):
    ranks = [nccl_rank_offset(i, tp) + w for i in range(num_actors) for w in range(tp)]
    assert sorted(ranks) == list(range(1, nccl_world_size(num_actors, tp)))


def test_each_engine_rewrites_the_shared_init_request_to_its_own_rank_block():
    # vLLM's sync client sends every engine the trainer's payload, rank_offset=1 for all.
    shared = worker_init_payload(NCCLWeightTransferInitInfo(
        master_address="10.0.0.1", master_port=29600, rank_offset=1, world_size=nccl_world_size(3, 2)))
    received = []
    for i in range(3):
        rpc = SimpleNamespace(collective_rpc=lambda method, kwargs: received.append((method, kwargs)))
        engine = SimpleNamespace(llm=rpc, nccl_rank_offset=nccl_rank_offset(i, 2))
        RolloutWorker.init_weight_transfer_engine(engine, WeightTransferInitRequest(init_info=shared))
    assert [method for method, _ in received] == ["init_weight_transfer_engine"] * 3
    infos = [NCCLWeightTransferInitInfo(**kwargs["init_info"]) for _, kwargs in received]
    assert [info.rank_offset for info in infos] == [1, 3, 5]
    assert {info.world_size for info in infos} == {7} and shared["rank_offset"] == 1


def test_ranks_split_each_mini_batch_into_disjoint_equal_shares():
    rows = [7, 3, 5, 1, 0, 2]
    shares = [shard_rows(rows, r, 3) for r in range(3)]
    assert shares == [[7, 3], [5, 1], [0, 2]]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["learner.num_workers=3"], ["learner.num_workers=3", "does not divide", "16"]),
        (["learner.num_workers=0"], ["learner.num_workers=0 must be >= 1"]),
        (["rollout.tensor_parallel_size=2", "rollout.gpus_per_actor=1", "learner.gpus=1"],
         ["rollout.tensor_parallel_size=2", "rollout.gpus_per_actor=2"]),
        (["rollout.gpus_per_actor=0.5", "learner.gpus=1"], ["rollout.gpus_per_actor=0.5", "whole GPUs"]),
        (["rollout.gpus_per_actor=1"], ["learner.gpus=0.0", "whole GPUs"]),
        (["rollout.cpus_per_actor=-1"], ["rollout.cpus_per_actor=-1.0 must be >= 0"]),
        (["learner.cpus_per_worker=0"], ["learner.cpus_per_worker=0"]),
        (["rollout.placement=scatter"], ["'rollout.placement'", "pack", "spread"]),
    ],
)
def test_resource_errors_are_one_line_and_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        _cfg(*overrides)
    message = str(info.value)
    assert "\n" not in message
    assert not [t for t in expected if t not in message], message
