"""Data-parallel DeepSpeed learners: real Ray actors in a placement group, one gloo process group,
on a tiny random Llama. Two ranks must take exactly the step one rank takes on the same batch."""

import json

import pytest
import ray
import torch
from safetensors.torch import load
from test_learner import _batch, tiny_model  # noqa: F401  (tiny_model is a fixture)
from test_learner_reference import (
    VARIED,
    assert_matches,
    learner_overrides,
    make_batch,
    reference_step,
)
from transformers import AutoModelForCausalLM

from rlkd.actors.cluster import ACTOR_ENV, Actors, call_learners, start_learners, stop_actors
from rlkd.actors.placement import plan, reserve
from rlkd.actors.weight_source import ExportSource
from rlkd.compose import load_config
from rlkd.config import REPO_ROOT


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV})
    yield
    ray.shutdown()


def _step(path, num_workers: int, batch, overrides=None):
    """One train_step on `num_workers` learner actors; (rank 0 metrics, params of every rank)."""
    cfg = load_config(None, [*(overrides or [
        "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.mini_batches=2", "grpo.ppo_epochs=2",
        "learner.lr=1e-3", "learner.max_tokens_per_micro_batch=12", "rollout.max_new_tokens=16",
        "learner.dtype=float32"]),
        f"learner.num_workers={num_workers}", "rollout.colocate=false"])
    placement = reserve(plan(cfg), timeout_s=60)
    learners = start_learners(cfg, path, placement)
    actors = Actors(learners[0], [], "shm", learners, placement)
    try:
        metrics = call_learners(actors, "train_step", batch)
        # A lambda travels by value: Ray workers cannot import this test module.
        params = ray.get([lr.__ray_call__.remote(
            lambda self: {k: v.detach().clone() for k, v in self.engine.module.named_parameters()})
            for lr in learners])
    finally:
        stop_actors(actors)
    return metrics, params


def test_two_ranks_stay_identical_and_equal_one_rank_on_the_global_batch(local_ray, tiny_model):  # noqa: F811
    batch = _batch(seed=2)  # ragged lengths: ranks hold different token counts
    one_metrics, (one,) = _step(tiny_model, 1, batch)
    two_metrics, (rank0, rank1) = _step(tiny_model, 2, batch)
    changed = [k for k in one if not torch.equal(one[k], rank0[k])]
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        # Packing sums the gradients in another order on two ranks; Adam amplifies that fp32
        # noise on near-zero gradients (see test_learner_reference), so 1% of the learning rate.
        torch.testing.assert_close(rank0[name], one[name], atol=1e-5, rtol=1e-5)
    assert changed  # the step moved the weights, so agreement is not vacuous
    for key in ("train/loss", "train/clip_frac", "train/ratio_mean", "train/grad_norm"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], rel=1e-4, abs=1e-6), key


def test_two_ranks_with_packing_shared_prompts_and_zero_signal_equal_the_reference(local_ray, tiny_model):  # noqa: F811
    """Each rank gets one whole group; group 1 has no reward variance, so rank 1 scores nothing
    and only joins the gradient reduction."""
    batch = make_batch(VARIED, "group")
    overrides = learner_overrides("token_mean", 0.0, 0.7, 1, 1, 20, True)
    metrics, (rank0, rank1) = _step(tiny_model, 2, batch, overrides)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert_matches(metrics, rank0, reference_step(tiny_model, batch, agg="token_mean", beta=0.0, temperature=0.7,
                                                  epochs=1, minis=1, seed=0))


@pytest.mark.parametrize("lora", [False, True])
def test_zero3_nccl_source_hands_over_full_gathered_weights(local_ray, tiny_model, tmp_path, lora):  # noqa: F811
    # Under ZeRO-3 module parameters are empty placeholders; what the NCCL sender declares and
    # yields must be the full tensors, equal to what the shared-memory export writes, and (LoRA
    # merged) give a plain model the learner's own forward.
    ds = json.loads((REPO_ROOT / "deepspeed_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    cfg = load_config(None, [
        "grpo.group_size=4", "grpo.prompts_per_step=2", "learner.lr=1e-3", "rollout.max_new_tokens=16",
        "learner.dtype=float32", "rollout.dtype=float32", f"learner.deepspeed_config={tmp_path / 'zero3.json'}",
        "learner.num_workers=2", "rollout.colocate=false",
        *(["learner.lora.rank=4", "learner.lora.target_modules=[q_proj,o_proj,up_proj]"] if lora else [])])
    placement = reserve(plan(cfg), timeout_s=60)
    learners = start_learners(cfg, tiny_model, placement)
    actors = Actors(learners[0], [], "shm", learners, placement)
    try:
        call_learners(actors, "train_step", _batch(seed=3))  # weights that differ from the file

        def handed_over(self):  # what send_weights_nccl iterates, on every rank together
            source = ExportSource(self.engine.module, self.zero3)
            self.engine.module.eval()
            with torch.no_grad():  # a forward is collective under ZeRO-3 too
                logits = self.engine.module(input_ids=torch.arange(3, 20)[None]).logits[0]
            return ({m.name: m.shape for m in source.metadata()}, {n: t.clone() for n, t in source},
                    max(p.numel() for p in self.engine.module.parameters()), logits)

        (meta, sent, placeholder, logits), (meta1, sent1, _, _) = ray.get(
            [lr.__ray_call__.remote(handed_over) for lr in learners])
        exported = ray.get([lr.export_weights.remote("bytes") for lr in learners])[0]
    finally:
        stop_actors(actors)
    hf = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    assert placeholder == 0  # the module holds partitions only: a plain read would send nothing
    exported = load(exported.blob)
    assert meta == meta1 == {k: tuple(v.shape) for k, v in hf.items()}
    for name, tensor in sent.items():
        assert tuple(tensor.shape) == meta[name]
        assert torch.equal(tensor, exported[name]), name
        assert torch.equal(tensor, sent1[name]), name
    assert any(not torch.equal(sent[k], hf[k]) for k in hf)  # trained: the comparison is not vacuous
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    plain.load_state_dict(sent, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=torch.arange(3, 20)[None]).logits[0], logits,
                                   atol=1e-5, rtol=1e-5)
