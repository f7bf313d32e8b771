"""LoRA adapters on the learner's policy (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv:2106.09685), through PEFT.

Only the adapters train. Everything downstream of the learner (rollout engines, checkpoints,
evaluation) gets the merged weights W + (alpha / r) B A, which is exactly what the learner's
forward computes (`rlkd.weight_source` merges them on export); the base model with the adapters
switched off is the reference policy for `grpo.beta > 0`, so there is no second copy of it.
"""

from __future__ import annotations

import peft
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlkd.config import LoraConfig
from rlkd.errors import ConfigError

ADAPTER_DIR = "adapter"  # inside a checkpoint: the adapter alone, in PEFT's format


def apply_lora(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool) -> peft.PeftModel:
    """`model` with adapters on `lora.target_modules`; every base weight frozen."""
    wrapped = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM"))
    if gradient_checkpointing:
        # The frozen embeddings' output needs grad, or re-entrant checkpointing drops the
        # adapters' gradients inside each checkpointed layer.
        wrapped.enable_input_require_grads()
    return wrapped


def check_lora(model_path: str, lora: LoraConfig) -> None:
    """Target names that match no linear layer, before any actor starts (PEFT would fail in
    the learner, after Ray and vLLM have started). The model is built on the meta device."""
    if lora.rank == 0:
        return
    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)})
    missing = [t for t in lora.target_modules if t not in linear]
    if missing:
        raise ConfigError(f"learner.lora.target_modules={list(lora.target_modules)}: {missing} "
                          f"match no linear layer of {model_path} (it has {linear})")
    if "lm_head" in lora.target_modules and getattr(config, "tie_word_embeddings", False):
        raise ConfigError(f"learner.lora.target_modules: lm_head is tied to the embeddings in "
                          f"{model_path}; an adapter on it would untie them (the engines re-tie)")
