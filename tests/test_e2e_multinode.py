"""Scale-out on a simulated two-node Ray cluster (`ray.cluster_utils.Cluster`, both nodes on this
machine, with different CPUs and a custom resource each): the rollout actors are spread over the
nodes, the driver joins through `ray.address`, a real GRPO step runs, and after the weight sync
(cross-node, so through the object store) every engine samples from the learner's new weights.
"""

import pytest
import ray
import torch
from conftest import GSM8K_DIR, REPO_ROOT
from ray.cluster_utils import Cluster
from transformers import AutoModelForCausalLM

from rlkd.actors.cluster import init_ray, start_actors, stop_actors
from rlkd.compose import load_config
from rlkd.models import resolve_model
from rlkd.tasks.grpo import train
from rlkd.types import SamplingSpec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n"
GIB = 1024**3


@pytest.fixture(scope="module")
def cluster():
    # Bundle 0 (learner + engine 0) needs 2 CPUs and only the head has them; spread puts
    # engine 1's 1-CPU bundle on the other node.
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 1}, "object_store_memory": 2 * GIB})
    c.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=2 * GIB)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """Actors started on the cluster through `ray.address`, then one GRPO step."""
    cfg = load_config(None, [
        f"ray.address={cluster.address}", f"data.path={GSM8K_DIR}",
        "rollout.num_actors=2", "rollout.placement=spread", "rollout.kv_cache_gb=1",
        "model.max_model_len=512", "rollout.max_new_tokens=32", "grpo.group_size=4",
        "grpo.prompts_per_step=2", "learner.lr=1e-4", "trainer.max_steps=1", "trainer.eval_every=0",
        "learner.dtype=float32", "rollout.dtype=float32",  # exact sync check on any CPU
        "trainer.save_every=0",
        # A dense reward: every group has a learning signal, so the step moves the weights.
        f"rewards.funcs=[{REPO_ROOT}/tests/data/shaping_rewards.py:concise]", "rewards.weights=[1.0]"])
    init_ray(cfg)
    model_path = str(resolve_model(cfg.model.name))
    actors = start_actors(cfg, model_path)
    run_dir = tmp_path_factory.mktemp("multinode")
    try:
        metrics = train(cfg, run_dir, actors)
        yield actors, metrics, run_dir, model_path
    finally:
        stop_actors(actors)


def test_rollout_actors_land_on_different_nodes(cluster, trained):
    actors, *_ = trained
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    rollout_nodes = ray.get([r.node_id.remote() for r in actors.rollouts])
    learner_node = ray.get(actors.learner.node_id.remote())
    assert len(nodes) == 2 and len(set(rollout_nodes)) == 2
    assert "node_a" in nodes[rollout_nodes[0]] and "node_b" in nodes[rollout_nodes[1]]
    assert learner_node == rollout_nodes[0]  # colocated with engine 0
    assert actors.transport == "bytes"


def test_grpo_step_completes(trained):
    _, metrics, run_dir, _ = trained
    for key in ("train/loss", "train/grad_norm", "time/generate", "time/sync", "reward/total_mean"):
        assert key in metrics, key
    assert metrics["train/grad_norm"] > 0
    assert metrics["train/logp_mismatch"] < 1e-3  # both engines sampled from the learner's policy
    assert (run_dir / "checkpoint-1" / "config.json").exists()


def _hf_logprobs(path, prompt_ids, completion_ids) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0, :-1]
    logprobs = torch.log_softmax(logits, -1)[len(prompt_ids) - 1:]
    return logprobs.gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_every_engine_generates_with_the_synced_weights(trained):
    actors, _, run_dir, base_path = trained
    greedy = SamplingSpec(n=1, max_tokens=24, temperature=0.0)
    texts = [g.texts[0] for g in ray.get([r.generate.remote([PROMPT], greedy) for r in actors.rollouts])]
    assert texts[0].strip() and texts[0] == texts[1]
    # Agreement alone would also hold if no engine had synced: each engine's sampling logprobs
    # must match the learner's weights after the step (its checkpoint), not the start weights.
    sample = SamplingSpec(n=1, max_tokens=24, temperature=1.0, seed=0)
    for gen in ray.get([r.generate.remote([PROMPT], sample) for r in actors.rollouts]):
        prompt_ids, completion_ids = gen.prompt_ids[0], gen.completion_ids[0]
        vllm_logprobs = torch.tensor(gen.logprobs[0])
        updated = _hf_logprobs(str(run_dir / "checkpoint-1"), prompt_ids, completion_ids)
        base = _hf_logprobs(base_path, prompt_ids, completion_ids)
        assert (vllm_logprobs - updated).abs().mean() < 1e-4
        assert (vllm_logprobs - base).abs().mean() > 1e-3
