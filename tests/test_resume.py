"""Exact resume and NaN-step skipping on the real DeepSpeed learner (tiny random Llama, CPU),
and the checkpoint bookkeeping that `trainer.resume` relies on."""

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from ray.exceptions import OutOfMemoryError
from test_learner import _batch, _learner, tiny_model  # noqa: F401  (the fixture)
from transformers import LlamaForCausalLM

from rlkd.actors.learner import remove_stale_weight_dirs
from rlkd.actors.recovery import BadStepsError, actor_died, count_bad_steps, learner_died
from rlkd.compose import load_config
from rlkd.data import PromptSampler
from rlkd.errors import InputError
from rlkd.resume import (
    complete_checkpoints,
    driver_state,
    restore_driver_state,
    resume_checkpoint,
    truncate_metrics,
)
from rlkd.types import Example

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


def _checkpoint(run_dir, step, state=True):
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    if state:
        (path / "trainer_state.pt").write_bytes(b"")
    return path


def test_auto_resume_picks_the_newest_complete_checkpoint(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "trainer.resume=auto"])
    assert resume_checkpoint(cfg, tmp_path) is None  # nothing yet: a fresh start
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 10)  # 10 > 9: by step, not by name
    _checkpoint(tmp_path, 9)
    (tmp_path / "checkpoint-12.tmp").mkdir()  # a kill during the write
    (tmp_path / "checkpoint-12.tmp" / "trainer_state.pt").write_bytes(b"")
    _checkpoint(tmp_path, 11, state=False)  # saved with trainer.save_state=false
    assert complete_checkpoints(tmp_path) == [tmp_path / f"checkpoint-{s}" for s in (2, 9, 10)]
    assert resume_checkpoint(cfg, tmp_path) == newest


def test_explicit_resume_errors_name_the_checkpoint(tmp_path):
    missing = tmp_path / "checkpoint-3"
    cfg = load_config(None, [f"trainer.resume={missing}"])
    with pytest.raises(InputError, match=f"^trainer.resume={missing}: no such checkpoint directory$"):
        resume_checkpoint(cfg, tmp_path)
    _checkpoint(tmp_path, 3, state=False)
    with pytest.raises(InputError, match=r"not a resumable checkpoint \(no trainer_state.pt"):
        resume_checkpoint(cfg, tmp_path)
    _checkpoint(tmp_path, 4)
    cfg = load_config(None, [f"trainer.resume={tmp_path / 'checkpoint-4'}"])
    assert resume_checkpoint(cfg, tmp_path) == tmp_path / "checkpoint-4"


def test_driver_state_round_trips_sampler_and_rngs():
    examples = [Example(str(i), f"q{i}", str(i), "") for i in range(7)]
    sampler = PromptSampler(examples, seed=3)
    sampler.next(5)
    state = driver_state(4, sampler, bad_steps=1)
    expected = ([e.id for e in sampler.next(9)], random.random(), np.random.rand(), torch.rand(1))
    fresh = PromptSampler(examples, seed=3)
    assert restore_driver_state(state, fresh) == (4, 1)
    assert ([e.id for e in fresh.next(9)], random.random(), np.random.rand(), torch.rand(1)) == expected


def test_truncate_metrics_drops_rows_after_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + '\n{"step": 5, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    truncate_metrics(tmp_path / "absent.jsonl", 2)  # a run killed before its first step


def test_stale_weight_dirs_of_dead_learners_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"rlkd-weights-{dead}-abcd1234"
    alive = tmp_path / f"rlkd-weights-{os.getpid()}-abcd1234"
    other = tmp_path / "rlkd-weights-notapid"
    for d in (stale, alive, other):
        d.mkdir()
        (d / "v1.safetensors").write_bytes(b"x")
    remove_stale_weight_dirs(tmp_path)
    assert not stale.exists() and alive.exists() and other.exists()


def test_resume_auto_needs_run_dir():
    with pytest.raises(InputError, match=r"^trainer.resume=auto needs run.dir=<the run directory"):
        load_config(None, ["trainer.resume=auto"])


def test_consecutive_skipped_steps_stop_the_run():
    assert count_bad_steps(0, 1.0, step=4, max_bad_steps=3) == 1
    assert count_bad_steps(1, 0.0, step=5, max_bad_steps=3) == 0  # a good step resets the count
    assert count_bad_steps(1, 2.0, step=5, max_bad_steps=3) == 2
    assert count_bad_steps(99, 1.0, step=5, max_bad_steps=0) == 100  # 0: never stops
    with pytest.raises(BadStepsError, match=r"^3 consecutive steps \(up to step 7\) skipped for a "
                                            r"NaN/inf loss or gradient \(trainer.max_bad_steps=3\)"):
        count_bad_steps(2, 1.0, step=7, max_bad_steps=3)


def test_actor_death_messages_name_what_is_left(tmp_path):
    oom = OutOfMemoryError("1 worker(s) were killed due to the node running low on memory.\nTop 10 ...")
    assert str(actor_died(oom, 3, tmp_path)) == (
        "an actor died during step 3 (OutOfMemoryError: 1 worker(s) were killed due to the node "
        "running low on memory.); no checkpoint was saved yet (trainer.save_every)")
    assert str(learner_died(oom, 3, tmp_path)).endswith("; no checkpoint was saved yet")
    _checkpoint(tmp_path, 2, state=False)  # SFT and distillation save weights only
    _checkpoint(tmp_path, 10, state=False)
    (tmp_path / "checkpoint-12.tmp").mkdir()
    assert str(actor_died(oom, 11, tmp_path)).endswith(
        f"; the weights of step 10 are intact: start a new run from them with model.name={tmp_path}/checkpoint-10")
    assert str(learner_died(oom, 11, tmp_path)).endswith("; no checkpoint was saved yet")  # none resumable
