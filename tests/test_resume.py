"""Exact resume and NaN-step skipping on the real DeepSpeed learner (tiny random Llama, CPU),
and the checkpoint bookkeeping that `trainer.resume` relies on."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM
from test_learner import _batch, _learner, tiny_model  # noqa: F401  (the fixture)

from rlkd.config import InputError, load_config
from rlkd.data import Example, PromptSampler
from rlkd.learner import remove_stale_weight_dirs
from rlkd.resume import (
    complete_checkpoints,
    driver_state,
    restore_driver_state,
    resume_checkpoint,
    truncate_metrics,
)

ARGS = ("learner.micro_batch_size=4", "learner.warmup_steps=3", "grpo.mini_batches=2")


def _params(learner):
    return {k: v.detach().clone() for k, v in learner.engine.module.named_parameters()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resumed_learner_continues_bit_exactly(tiny_model, tmp_path):  # noqa: F811
    straight = _learner(tiny_model, *ARGS)
    for seed in range(2):
        straight.train_step(_batch(seed=seed))
    ckpt = straight.save_checkpoint(str(tmp_path / "checkpoint-2"), {"step": 2})
    assert not list(tmp_path.glob("*.tmp"))
    losses = [straight.train_step(_batch(seed=seed))["train/loss"] for seed in (2, 3)]

    resumed = _learner(tiny_model, *ARGS)
    assert resumed.load_checkpoint(ckpt) == {"step": 2}
    assert resumed.steps_done() == 2
    resumed_losses = [resumed.train_step(_batch(seed=seed))["train/loss"] for seed in (2, 3)]
    assert resumed_losses == losses
    _assert_same(_params(resumed), _params(straight))
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()

    # The same weights without the optimizer and scheduler state continue differently, so the
    # test above would catch a resume that restored only the weights.
    weights_only = _learner(tiny_model, *ARGS)
    weights_only.engine.module.load_state_dict(_params_of(ckpt), strict=False)
    _assert_same(_params(weights_only), _params_of(ckpt))
    for seed in (2, 3):
        weights_only.train_step(_batch(seed=seed))
    assert any(not torch.equal(a, b) for a, b in zip(_params(weights_only).values(),
                                                      _params(straight).values(), strict=True))
    for learner in (straight, resumed, weights_only):
        learner.close()


def _params_of(ckpt):
    return {k: v.detach() for k, v in LlamaForCausalLM.from_pretrained(ckpt).named_parameters()}


def test_nan_advantage_skips_the_update(tiny_model):  # noqa: F811
    learner = _learner(tiny_model, "learner.micro_batch_size=4")
    before = _params(learner)
    bad = _batch(seed=1)
    bad.advantages[2] = math.nan
    metrics = learner.train_step(bad)
    assert metrics["train/skipped_steps"] == 1
    assert not math.isfinite(metrics["train/grad_norm"])
    _assert_same(_params(learner), before)
    metrics = learner.train_step(_batch(seed=1))
    assert metrics["train/skipped_steps"] == 0
    assert any(not torch.equal(before[k], v) for k, v in _params(learner).items())
    learner.close()
