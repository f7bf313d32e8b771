"""Weight sync into a running vLLM: after an update, vLLM samples from exactly the new weights.

Each group of tensors is perturbed on its own, so a transport that drops one group (as a tied
lm_head once did: vLLM's CPU backend kept a pre-packed copy of the old embedding) fails here.
"""

import zlib
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from rlkd.actors.learner import Learner
from rlkd.actors.rollout import RolloutWorker
from rlkd.compose import load_config
from rlkd.models import resolve_model
from rlkd.types import SamplingSpec, TrainBatch, WeightUpdate

pytestmark = pytest.mark.e2e

PROMPT = "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engines():
    path = str(resolve_model("smollm2-135m-instruct"))
    worker = RolloutWorker(path, max_model_len=512)
    yield worker, AutoModelForCausalLM.from_pretrained(path)
    worker.shutdown()  # frees the engine's processes and KV cache before the next module


def _mismatch(worker, hf) -> float:
    """Mean |vLLM sampling logprob - transformers logprob| over a sampled completion."""
    gen = worker.generate([PROMPT], SamplingSpec(n=1, max_tokens=24, temperature=1.0, seed=0))
    prompt, completion = gen.prompt_ids[0], gen.completion_ids[0]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion])).logits[0, :-1]
    ref = torch.log_softmax(logits, -1)[len(prompt) - 1:].gather(1, torch.tensor(completion)[:, None])
    return (ref[:, 0] - torch.tensor(gen.logprobs[0])).abs().mean().item()


@pytest.mark.parametrize("group", ["embed_tokens", "self_attn", "mlp", "norm"])
@pytest.mark.parametrize("transport", ["path", "blob"])
def test_sync_lands_every_tensor_group(engines, group, transport, tmp_path):
    worker, hf = engines
    # zlib, not hash(): str hashes change per process, and the weights these perturbations leave
    # behind are what the later tests in this module sample from.
    torch.manual_seed(zlib.crc32(group.encode()) % 1000)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if group in name:
                p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    weights = {k: v.detach().clone() for k, v in hf.named_parameters()}
    if transport == "path":
        file = tmp_path / "w.safetensors"
        file.write_bytes(save(weights))
        update = WeightUpdate(version=1, path=str(file))
    else:
        update = WeightUpdate(version=1, blob=save(weights))
    worker.update_weights(update)
    assert _mismatch(worker, hf) < 1e-4


def test_seeded_batch_beyond_the_token_budget_samples_reproducibly(engines):
    # ~14k prompt tokens: more than one scheduler step's budget. With chunked prefill vLLM's CPU
    # backend crashed here ("CPU Generator does not use offset") on seeded requests.
    worker, _ = engines
    prompts = [f"Story {i}: " + "the number seven walked into a bar and " * 12 for i in range(100)]
    spec = SamplingSpec(n=1, max_tokens=4, temperature=0.7, seed=11)
    first, second = worker.generate(prompts, spec), worker.generate(prompts, spec)
    assert sum(len(p) for p in first.prompt_ids) > 8192
    assert first.texts == second.texts


def test_every_prompt_and_step_samples_its_own_stream(engines):
    # One seed per call used to give sample i of every prompt the stream seed + i: the same
    # prompt twice in a call drew the same completions, and step s+1 replayed step s shifted by one.
    worker, _ = engines
    spec = SamplingSpec(n=2, max_tokens=16, temperature=1.0, seed=5)
    same = worker.generate([PROMPT] * 4, spec)
    assert len(set(same.texts)) == 8
    next_step = worker.generate([PROMPT], replace(spec, seed=6))
    assert next_step.texts[0] != same.texts[1]
    # A prompt's stream depends on its place in the whole batch, not on how it was sharded.
    other = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    both = worker.generate([PROMPT, other], spec)
    alone = worker.generate([other], replace(spec, first_prompt=1))
    assert both.texts[2:] == alone.texts


def test_lora_step_syncs_the_merged_weights(engines, tmp_path):
    # After a LoRA step vLLM must sample from W + s B A, the learner's own forward, not from the
    # base model (adapters dropped) or the unscaled sum.
    worker, base = engines
    path = str(resolve_model("smollm2-135m-instruct"))
    cfg = load_config(None, ["learner.lora.rank=8", "learner.lr=1e-3", "learner.dtype=float32",
                                     "rollout.dtype=float32", "grpo.group_size=4", "grpo.prompts_per_step=1"])
    learner = Learner(cfg, path, master_port=29761)
    gen = worker.generate([PROMPT], SamplingSpec(n=4, max_tokens=16, temperature=1.0, seed=1))
    learner.train_step(TrainBatch(gen.prompt_ids * 4, gen.completion_ids, gen.logprobs, [1.0, -1.0, 0.5, -0.5]))
    worker.update_weights(learner.export_weights("shm"))
    learner.engine.module.eval()
    try:
        assert _mismatch(worker, learner.engine.module) < 1e-4
        assert _mismatch(worker, base) > 1e-3  # the step moved the model: the check has teeth
    finally:
        learner.close()
