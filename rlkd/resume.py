"""Exact resume: which checkpoint to continue from, and the driver's share of its state.

A checkpoint `checkpoint-<step>/` appears only by a rename once completely written, and only
those saved with `trainer.save_state` hold `trainer_state.pt`: the step, the prompt sampler's
cursor and the driver's RNG states, next to the learner's optimizer, scheduler and RNG state.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from rlkd.config import Config
from rlkd.data import PromptSampler
from rlkd.errors import InputError

TRAINER_STATE = "trainer_state.pt"  # same name as rlkd.actors.learner.TRAINER_STATE, without its imports


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Resumable checkpoints of `run_dir`, oldest first; `.tmp` leftovers of a kill are skipped."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    return sorted((p for p in found if (p / TRAINER_STATE).is_file()), key=checkpoint_step)


def resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume` asks for, or None to start fresh; a one-line InputError
    if an explicit one is missing or cannot be resumed (before any heavy work)."""
    choice = cfg.trainer.resume
    if not choice:
        return None
    if choice == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(choice)
    if not path.is_dir():
        raise InputError(f"trainer.resume={choice}: no such checkpoint directory")
    if not (path / TRAINER_STATE).is_file() or not path.name.split("-")[-1].isdigit():
        raise InputError(
            f"trainer.resume={choice}: not a resumable checkpoint (no {TRAINER_STATE}; it was "
            "saved with trainer.save_state=false, or is not a checkpoint-<step> directory)"
        )
    return path


def driver_state(step: int, sampler: PromptSampler, bad_steps: int) -> dict:
    return {
        "step": step,
        "sampler": sampler.state_dict(),
        "bad_steps": bad_steps,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def restore_driver_state(state: dict, sampler: PromptSampler) -> tuple[int, int]:
    """Put the sampler and RNGs back; returns (step, consecutive bad steps) of the checkpoint."""
    sampler.load_state_dict(state["sampler"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["bad_steps"]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after `step` by the run that died, so each step is logged once."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a row torn by the kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
