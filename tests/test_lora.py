"""LoRA on the real DeepSpeed learner (tiny random Llama, gloo, CPU), against references written
here: a from-scratch LoRA step (W + s B A through `torch.func.functional_call`, plain AdamW on A
and B only), the plain transformers model loaded with the exported weights, and PEFT's own
loader for the saved adapter."""

import pytest
import torch
from peft import PeftModel
from test_distill_learner import _batch as distill_batch
from test_distill_learner import _learner as distill_learner
from test_distill_learner import tiny  # noqa: F401  (a fixture)
from test_learner import _batch, tiny_model  # noqa: F401  (a fixture)
from test_learner_reference import (
    VARIED,
    assert_matches,
    learner_overrides,
    make_batch,
    reference_step,
)
from transformers import LlamaForCausalLM

from rlkd.actors.learner import Learner
from rlkd.compose import load_config
from rlkd.errors import ConfigError
from rlkd.lora import ADAPTER_DIR, check_lora

RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj", "down_proj"]
LORA = [f"learner.lora.rank={RANK}", f"learner.lora.alpha={ALPHA}",
        f"learner.lora.target_modules=[{','.join(TARGETS)}]", "rollout.dtype=float32"]


def _adapters(learner) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{plain linear name: (A, B)} as the learner holds them now."""
    params = dict(learner.engine.module.named_parameters())
    out = {}
    for name, p in params.items():
        if ".lora_A.default." in name:
            layer = name.removeprefix("base_model.model.").split(".lora_A.")[0]
            out[layer] = (p.detach().clone(), params[name.replace("lora_A", "lora_B")].detach().clone())
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_lora_steps_equal_from_scratch_reference(tiny_model, beta):  # noqa: F811
    # Two on-policy steps: PEFT starts B at 0, so only the second step gives A a gradient.
    batch = make_batch(VARIED, "group")
    overrides = learner_overrides("token_mean", beta, 0.7, 1, 1, 24, True)
    learner = Learner(load_config(None, overrides + LORA), tiny_model, master_port=29751)
    start = _adapters(learner)
    assert {n for n in start} == {f"model.layers.{i}.{'mlp' if t == 'down_proj' else 'self_attn'}.{t}"
                                  for i in range(2) for t in TARGETS}
    trainable = [n for n, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()
                   if not p.requires_grad}
    learner.train_step(batch)
    metrics = learner.train_step(batch)
    merged = learner._named_weights()
    # Only the adapters carry optimizer state.
    state = learner.optimizer.optimizer.state if hasattr(learner.optimizer, "optimizer") else learner.optimizer.state
    moments = sum(s["exp_avg"].numel() for s in state.values())
    assert moments < 2 * sum(a.numel() + b.numel() for a, b in start.values())
    for n, p in learner.engine.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    learner.close()
    expected = reference_step(tiny_model, batch, agg="token_mean", beta=beta, temperature=0.7, epochs=1,
                              minis=1, seed=0, lora=(start, ALPHA / RANK), repeats=2)
    assert set(merged) == set(expected[2])
    assert_matches(metrics, merged, expected)


def test_exported_weights_are_the_learners_forward(tiny_model):  # noqa: F811
    learner = Learner(load_config(None, ["learner.lr=1e-2", *LORA]), tiny_model, master_port=29752)
    for seed in range(2):
        learner.train_step(_batch(seed=seed))
    plain = LlamaForCausalLM.from_pretrained(tiny_model)
    result = plain.load_state_dict(learner._named_weights(), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    base = LlamaForCausalLM.from_pretrained(tiny_model)
    ids = list(range(3, 20))
    learner.engine.module.eval()
    ours = _logits(learner.engine.module, ids)
    torch.testing.assert_close(_logits(plain, ids), ours, atol=1e-5, rtol=1e-5)
    assert (_logits(base, ids) - ours).abs().max() > 1e-3  # the adapters did move the model
    learner.close()


def test_checkpoint_holds_merged_model_and_peft_adapter_and_resumes_exactly(tiny_model, tmp_path):  # noqa: F811
    args = ["learner.lr=1e-2", "learner.warmup_steps=3", *LORA]
    straight = Learner(load_config(None, args), tiny_model, master_port=29753)
    for seed in range(2):
        straight.train_step(_batch(seed=seed))
    ckpt = straight.save_checkpoint(str(tmp_path / "checkpoint-2"), {"step": 2})
    ids = list(range(5, 30))
    straight.engine.module.eval()
    ours = _logits(straight.engine.module, ids)
    straight.engine.module.train()
    torch.testing.assert_close(_logits(LlamaForCausalLM.from_pretrained(ckpt), ids), ours, atol=1e-5, rtol=1e-5)
    adapter = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model), f"{ckpt}/{ADAPTER_DIR}")
    torch.testing.assert_close(_logits(adapter, ids), ours, atol=1e-5, rtol=1e-5)

    losses = [straight.train_step(_batch(seed=seed))["train/loss"] for seed in (2, 3)]
    resumed = Learner(load_config(None, args), tiny_model, master_port=29753)
    assert resumed.load_checkpoint(ckpt) == {"step": 2}
    assert [resumed.train_step(_batch(seed=seed))["train/loss"] for seed in (2, 3)] == losses
    a, b = (dict(x.engine.module.named_parameters()) for x in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for learner in (straight, resumed):
        learner.close()


def test_lora_settings_fail_in_one_line_before_start_up(tiny_model):  # noqa: F811
    with pytest.raises(ConfigError, match=r"learner.lora.rank=-1 must be >= 0"):
        load_config(None, ["learner.lora.rank=-1"])
    with pytest.raises(ConfigError, match=r"learner.lora.dropout=1.0 must be in \[0, 1\)"):
        load_config(None, ["learner.lora.rank=4", "learner.lora.dropout=1.0"])
    with pytest.raises(ConfigError, match=r"learner.lora.target_modules=\[\] must be non-empty"):
        load_config(None, ["learner.lora.rank=4", "learner.lora.target_modules=[]"])
    cfg = load_config(None, ["learner.lora.rank=4", "learner.lora.target_modules=[q_proj,qkv]"])
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no linear layer of .*'q_proj'"):
        check_lora(tiny_model, cfg.learner.lora)
    cfg = load_config(None, ["learner.lora.rank=4", "learner.lora.target_modules=[lm_head]"])
    with pytest.raises(ConfigError, match="lm_head is tied"):
        check_lora(tiny_model, cfg.learner.lora)
    check_lora(tiny_model, load_config(None, LORA).learner.lora)


def _frozen(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.engine.module.named_parameters() if not p.requires_grad}


def test_sft_and_distillation_train_only_the_adapters(tiny_model, tiny):  # noqa: F811
    sft = Learner(load_config("sft_gsm8k", ["learner.lr=1e-2", *LORA]), tiny_model, master_port=29754)
    batch, base = _batch(), _frozen(sft)
    before = sft.eval_loss(batch)
    for _ in range(4):
        sft.sft_step(batch, 24)
    assert sft.eval_loss(batch) < before - 0.02  # the adapters learn
    assert all(torch.equal(p, base[n]) for n, p in _frozen(sft).items())
    sft.close()

    student, teacher = tiny
    distill = distill_learner(student, [teacher], "distill.objective=gkd", "learner.lr=1e-2", *LORA)
    batch, base = distill_batch(seed=2), _frozen(distill)
    losses = [distill.distill_step(batch)["train/jsd"] for _ in range(6)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert base and all(torch.equal(p, base[n]) for n, p in _frozen(distill).items())
    distill.close()
