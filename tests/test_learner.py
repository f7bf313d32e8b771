"""The DeepSpeed learner on a tiny random Llama (real DeepSpeed, gloo, CPU)."""

import random

import pytest
import torch
from safetensors.torch import load, load_file
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlkd.actors.learner import DTYPES, Learner
from rlkd.compose import load_config
from rlkd.hardware import rollout_dtype
from rlkd.packing import collate
from rlkd.types import TrainBatch


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tok.save_pretrained(path)
    return str(path)


def _batch(n=8, seed=0) -> TrainBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 64) for _ in range(rng.randrange(3, 9))] for _ in range(n)]
    comps = [[rng.randrange(1, 64) for _ in range(rng.randrange(1, 12))] for _ in range(n)]
    comps[3] = []  # an empty completion contributes nothing and must not break the step
    return TrainBatch(prompts, comps, [[-rng.random() * 4 for _ in c] for c in comps],
                      [rng.gauss(0, 1) for _ in range(n)])


def _learner(path, *overrides) -> Learner:
    cfg = load_config(None, ["grpo.group_size=4", "grpo.prompts_per_step=2",
                                     "learner.lr=1e-3", "rollout.max_new_tokens=16", *overrides])
    return Learner(cfg, path, master_port=29731)


def test_collate_aligns_targets_with_completion_tokens():
    b = TrainBatch([[5, 6, 7]], [[8, 9]], [[-0.5, -1.5]], [1.0])
    t = collate(b)
    # Position t predicts token t+1: completion tokens 8, 9 are targets at positions 2 and 3.
    assert t["input_ids_BL"].tolist() == [[5, 6, 7, 8, 9]]
    assert t["mask_BT"].tolist() == [[0, 0, 1, 1]]
    assert t["rollout_logprobs_BT"].tolist() == [[0, 0, -0.5, -1.5]]


def test_step_changes_weights_and_export_round_trips(tiny_model, tmp_path):
    learner = _learner(tiny_model, "learner.micro_batch_size=4", "grpo.ppo_epochs=2", "grpo.mini_batches=2")
    before = {k: v.detach().clone() for k, v in learner.engine.module.named_parameters()}
    learner.train_step(_batch(seed=1))
    after = dict(learner.engine.module.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    shm = learner.export_weights("shm")
    blob = learner.export_weights("bytes")
    for state in (load_file(shm.path), load(blob.blob)):
        assert state.keys() == after.keys()  # tied lm_head travels once, as embed_tokens
        for k, v in state.items():
            # Exported in the rollout dtype (rollout.dtype=auto: bf16 where vLLM runs it).
            assert torch.equal(v, after[k].detach().to(v.dtype)) and v.dtype == DTYPES[rollout_dtype(learner.cfg)]
    saved = learner.save_checkpoint(str(tmp_path / "checkpoint-1"))
    reloaded = LlamaForCausalLM.from_pretrained(saved)
    for k, v in reloaded.named_parameters():
        assert torch.equal(v, after[k].detach()), k
    # Training runs without a KV cache; the checkpoint must still generate with one.
    assert reloaded.config.use_cache is True
    learner.close()
