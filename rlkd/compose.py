"""Composing, validating and printing the config tree (`rlkd.config`).

`python -m rlkd.train recipe=NAME a.b=c` composes three layers, each validated against the
dataclass schema: the defaults, `recipes/NAME.yaml` (only differences from the defaults) and the
command-line overrides (Hydra's override grammar). An unknown key or a wrong type is a one-line
`ConfigError` naming the file or argument and the key, with the nearest valid key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import re
import sys
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rewards import REGISTRY as REWARDS
from rewards import load_reward
from rlkd.config import RECIPES_DIR, Config, Overlong, PromptMode, Task
from rlkd.config_distill import DistillObjective, StudentInit
from rlkd.errors import ConfigError, InputError


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value
    return docs


def _walk(cls: type, prefix: str = ""):
    """Yield (dotted key, field, owning class) for every leaf of the schema."""
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            yield from _walk(type(default), key + ".")
        else:
            yield key, f, cls


def all_keys() -> list[str]:
    return [key for key, _, _ in _walk(Config)]


def help_text() -> str:
    """The whole tree with defaults and docs, for `--help`."""
    base = OmegaConf.structured(Config)
    lines = []
    for key, f, cls in _walk(Config):
        value = OmegaConf.select(base, key)
        if isinstance(value, Enum):
            value = value.value
        choices = ""
        # Annotations are strings (postponed evaluation): resolve them where the section lives.
        enum_cls = getattr(sys.modules[cls.__module__], f.type, None) if isinstance(f.type, str) else None
        if isinstance(enum_cls, type) and issubclass(enum_cls, Enum):
                choices = " {" + "|".join(e.value for e in enum_cls) + "}"
        lines.append(f"  {key}={value!r}{choices}\n      {field_docs(cls).get(f.name, '')}")
    return "\n".join(lines)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(err: OmegaConfBaseException, where: str, key_hint: str = "") -> ConfigError:
    key = getattr(err, "full_key", None) or key_hint
    text = str(err).splitlines()[0]
    if not key:
        return ConfigError(f"{where}: {text}")
    if "not in" in text or "Missing key" in text or "Key '" in text:
        return ConfigError(f"{where}: unknown key '{key}'{_suggest(key)}")
    return ConfigError(f"{where}: bad value for '{key}': {text}")


def _yaml_line(path: Path, key: str) -> int | None:
    """Line of the dotted `key` in a block-style recipe, so errors point at it."""
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"(\s*)([A-Za-z_][\w-]*)\s*:", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if [k for _, k in stack] == parts:
            return lineno
    return None


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        close = difflib.get_close_matches(name, recipe_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown recipe '{name}'{hint}; available: {', '.join(recipe_names())}"
        )
    return path


def _merge_recipe(cfg: DictConfig, path: Path) -> DictConfig:
    try:
        recipe = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError carries the line already
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if recipe is None:
        return cfg
    if not isinstance(recipe, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values")
    try:
        return OmegaConf.merge(cfg, recipe)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        line = _yaml_line(path, key) if key else None
        raise _describe(e, f"{path}:{line}" if line else str(path)) from None


def _apply_override(cfg: DictConfig, text: str) -> None:
    try:
        override = OverridesParser.create().parse_override(text)
    except HydraException as e:
        raise ConfigError(f"argument '{text}': {str(e).splitlines()[0]}") from None
    key = override.key_or_group.lstrip("+")
    if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
        raise ConfigError(f"argument '{text}': unknown key '{key}'{_suggest(key)}")
    value = override.value()
    current = OmegaConf.select(cfg, key, default=None)
    if isinstance(current, Enum) and isinstance(value, str) and value in {m.value for m in type(current)}:
        value = type(current)(value)  # OmegaConf matches enum names; `raise_` is spelt `raise`
    if override.is_delete():
        raise ConfigError(f"argument '{text}': deleting keys is not supported")
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as e:
        raise _describe(e, f"argument '{text}'", key) from None


def load_config(recipe: str | None, overrides: list[str] = ()) -> Config:
    """Defaults <- recipes/<recipe>.yaml <- overrides, validated; returns the typed tree."""
    cfg = OmegaConf.structured(Config)
    if recipe:
        cfg = _merge_recipe(cfg, recipe_path(recipe))
    for text in overrides:
        _apply_override(cfg, text)
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _describe(e, "config") from None
    validate(typed)
    return typed


def parse_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split `recipe=NAME` from the key=value overrides."""
    recipe, overrides = None, []
    for arg in argv:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        elif "=" not in arg:
            raise ConfigError(f"argument '{arg}': expected key=value (see --help)")
        else:
            overrides.append(arg)
    return recipe, overrides


def validate(cfg: Config) -> None:
    """Cross-field checks the type system cannot express, before any heavy work starts."""
    r, g = cfg.rewards, cfg.grpo
    from rlkd.data import DATASETS  # reads the datasets library: only once a config exists

    if cfg.data.name not in DATASETS:
        close = difflib.get_close_matches(cfg.data.name, DATASETS, n=1, cutoff=0.5)
        raise ConfigError(f"data.name={cfg.data.name} is not a dataset rlkd knows "
                          f"({', '.join(DATASETS)}){f'; did you mean {close[0]}?' if close else ''}")
    for spec in r.funcs:
        if ":" not in spec and spec not in REWARDS:
            try:
                load_reward(spec)
            except InputError as e:  # unknown name: the built-ins and a suggestion
                raise ConfigError(str(e)) from None
    if len(r.funcs) != len(r.weights):
        raise ConfigError(
            f"rewards.funcs has {len(r.funcs)} entries but rewards.weights has {len(r.weights)}"
        )
    positive = {
        "grpo.group_size": g.group_size,
        "grpo.prompts_per_step": g.prompts_per_step,
        "grpo.ppo_epochs": g.ppo_epochs,
        "grpo.mini_batches": g.mini_batches,
        "learner.micro_batch_size": cfg.learner.micro_batch_size,
        "learner.max_tokens_per_micro_batch": cfg.learner.max_tokens_per_micro_batch,
        "rollout.num_actors": cfg.rollout.num_actors,
        "rollout.tensor_parallel_size": cfg.rollout.tensor_parallel_size,
        "learner.num_workers": cfg.learner.num_workers,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "grpo.max_sampling_rounds": g.max_sampling_rounds,
        "trainer.logp_mismatch_steps": cfg.trainer.logp_mismatch_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    check_ranges(cfg)
    batch = g.group_size * g.prompts_per_step
    if batch % g.mini_batches:
        raise ConfigError(
            f"grpo.mini_batches={g.mini_batches} does not divide the rollout batch "
            f"grpo.prompts_per_step*grpo.group_size={batch}"
        )
    lengths = {"rollout.max_new_tokens": cfg.rollout.max_new_tokens,
               "eval.max_new_tokens": cfg.eval.max_new_tokens,
               "cot.max_new_tokens": cfg.cot.max_new_tokens}
    for key, value in lengths.items():
        if value >= cfg.model.max_model_len:
            raise ConfigError(
                f"{key}={value} leaves no room for the prompt in "
                f"model.max_model_len={cfg.model.max_model_len}"
            )
    validate_resources(cfg)
    if g.beta < 0 or g.clip_low < 0 or g.clip_high < 0 or g.tis_cap < 0:
        raise ConfigError("grpo.beta, grpo.clip_low, grpo.clip_high and grpo.tis_cap must be >= 0")
    if g.adv_estimator.value == "rloo" and g.group_size < 2:
        raise ConfigError(f"grpo.adv_estimator=rloo needs grpo.group_size >= 2 (got {g.group_size}): "
                          "the leave-one-out baseline is the mean of the other completions")
    for key, value in {"cot.samples_per_temperature": cfg.cot.samples_per_temperature,
                       "cot.max_new_tokens": cfg.cot.max_new_tokens,
                       "cot.batch_questions": cfg.cot.batch_questions,
                       "sft.epochs": cfg.sft.epochs, "sft.batch_size": cfg.sft.batch_size}.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if cfg.task == Task.cot and cfg.cot.prompt_mode != PromptMode.gold and not cfg.cot.temperatures:
        raise ConfigError("cot.temperatures is empty: give at least one sampling temperature")
    if any(t < 0 for t in cfg.cot.temperatures):
        raise ConfigError(f"cot.temperatures={cfg.cot.temperatures} must all be >= 0")
    if "{answer}" not in cfg.cot.primed_instruction:
        raise ConfigError("cot.primed_instruction must contain '{answer}'")
    if cfg.filter.min_mean_logprob > 0:
        raise ConfigError(f"filter.min_mean_logprob={cfg.filter.min_mean_logprob} must be <= 0 "
                          "(a mean log-probability)")
    if cfg.trainer.resume == "auto" and not cfg.run.dir:
        raise ConfigError("trainer.resume=auto needs run.dir=<the run directory to continue>")
    if g.overlong == Overlong.penalty and g.overlong_buffer > cfg.rollout.max_new_tokens:
        raise ConfigError(f"grpo.overlong_buffer={g.overlong_buffer} exceeds "
                          f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}")
    if cfg.rollout.top_p < 1 and cfg.task in (Task.grpo, Task.distill):
        raise ConfigError(
            f"rollout.top_p={cfg.rollout.top_p}: vLLM's sampling logprobs are renormalised over the "
            "nucleus while the learner's cover the whole vocabulary, so the importance weights (and "
            "MiniLLM's reward) would be biased; train with rollout.top_p=1")
    if any(len(pair) != 2 for pair in cfg.data.fewshot):
        bad = next(pair for pair in cfg.data.fewshot if len(pair) != 2)
        raise ConfigError(f"data.fewshot: each entry is [question, answer], got {list(bad)}")
    if cfg.rollout.environment and cfg.task not in (Task.grpo, Task.eval):
        raise ConfigError(f"rollout.environment={cfg.rollout.environment!r} works with task=grpo and eval only "
                          f"(got task={cfg.task.value})")
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []  # this machine's CPUs
    for key, cores in {"rollout.cpu_cores": cfg.rollout.cpu_cores, "learner.cpu_cores": cfg.learner.cpu_cores}.items():
        if any(c < 0 for c in cores) or len(set(cores)) != len(cores):
            raise ConfigError(f"{key}={list(cores)}: CPU ids must be distinct and >= 0")
        if cores and not cfg.ray.address and mine and not set(cores) <= set(mine):
            raise ConfigError(f"{key}={list(cores)}: this machine runs on CPUs {mine}")
    if cfg.rollout.max_staleness and cfg.task != Task.grpo:
        raise ConfigError(f"rollout.max_staleness={cfg.rollout.max_staleness} works with task=grpo only "
                          f"(got task={cfg.task.value}): distillation samples the student on-policy")
    if cfg.eval.compare and len(cfg.eval.compare) != 2:
        raise ConfigError(f"eval.compare needs exactly two predictions files, got {cfg.eval.compare}")
    if cfg.task == Task.distill:
        validate_distill(cfg)


def check_ranges(cfg: Config) -> None:
    """Numeric keys whose bad values would otherwise fail deep inside an actor, minutes in."""
    lr, ro, t = cfg.learner, cfg.rollout, cfg.trainer
    ranges = [  # (key, value, ok, allowed)
        ("learner.lr", lr.lr, lr.lr > 0, "> 0"),
        ("learner.weight_decay", lr.weight_decay, lr.weight_decay >= 0, ">= 0"),
        ("learner.warmup_steps", lr.warmup_steps, lr.warmup_steps >= 0, ">= 0"),
        ("learner.max_grad_norm", lr.max_grad_norm, lr.max_grad_norm > 0, "> 0"),
        ("learner.gpus", lr.gpus, lr.gpus >= 0, ">= 0"),
        ("rollout.temperature", ro.temperature, ro.temperature >= 0, ">= 0"),
        ("rollout.top_p", ro.top_p, 0 < ro.top_p <= 1, "in (0, 1]"),
        ("rollout.kv_cache_gb", ro.kv_cache_gb, ro.kv_cache_gb >= 1, ">= 1"),
        ("rollout.gpu_memory_utilization", ro.gpu_memory_utilization, 0 < ro.gpu_memory_utilization <= 1,
         "in (0, 1]"),
        ("rollout.gpus_per_actor", ro.gpus_per_actor, ro.gpus_per_actor >= 0, ">= 0"),
        ("eval.temperature", cfg.eval.temperature, cfg.eval.temperature >= 0, ">= 0"),
        ("eval.num_samples", cfg.eval.num_samples, cfg.eval.num_samples >= 0, ">= 0"),
        ("rollout.max_turns", ro.max_turns, ro.max_turns >= 1, ">= 1"),
        ("rollout.tool_timeout_s", ro.tool_timeout_s, ro.tool_timeout_s > 0, "> 0"),
        ("rollout.max_staleness", ro.max_staleness, ro.max_staleness >= 0, ">= 0 (0 is the synchronous loop)"),
        ("trainer.max_steps", t.max_steps, t.max_steps >= 0, ">= 0"),
        ("trainer.eval_every", t.eval_every, t.eval_every >= 0, ">= 0"),
        ("trainer.eval_samples", t.eval_samples, t.eval_samples >= 1, ">= 1"),
        ("trainer.save_every", t.save_every, t.save_every >= 0, ">= 0"),
        ("trainer.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 0, ">= 0"),
        ("trainer.collapse_window", t.collapse_window, t.collapse_window >= 0, ">= 0 (0 turns the check off)"),
        ("trainer.collapse_length_ratio", t.collapse_length_ratio, 0 < t.collapse_length_ratio < 1, "in (0, 1)"),
        ("model.max_model_len", cfg.model.max_model_len, cfg.model.max_model_len >= 2, ">= 2"),
        ("learner.lora.rank", lr.lora.rank, lr.lora.rank >= 0, ">= 0 (0 trains every weight)"),
        ("learner.lora.alpha", lr.lora.alpha, lr.lora.alpha > 0, "> 0"),
        ("learner.lora.dropout", lr.lora.dropout, 0 <= lr.lora.dropout < 1, "in [0, 1)"),
        ("learner.lora.target_modules", list(lr.lora.target_modules),
         lr.lora.rank == 0 or len(lr.lora.target_modules) > 0, "non-empty"),
    ]
    ranges += [(key, value, value >= 0, ">= 0") for key, value in {
        "rollout.max_restarts": ro.max_restarts, "trainer.max_bad_steps": t.max_bad_steps,
        "trainer.max_zero_signal_steps": t.max_zero_signal_steps, "trainer.max_logp_mismatch": t.max_logp_mismatch,
        "grpo.overlong_buffer": cfg.grpo.overlong_buffer, "grpo.overlong_penalty": cfg.grpo.overlong_penalty,
        "data.held_out": cfg.data.held_out, "data.max_solution_steps": cfg.data.max_solution_steps}.items()]
    for key, value, ok, allowed in ranges:
        if not ok:
            raise ConfigError(f"{key}={value} must be {allowed}")


def validate_distill(cfg: Config) -> None:
    d = cfg.distill
    if not d.teachers or len(d.teachers) != len(d.teacher_weights):
        raise ConfigError(f"distill.teachers has {len(d.teachers)} entries but "
                          f"distill.teacher_weights has {len(d.teacher_weights)}")
    if any(w < 0 for w in d.teacher_weights) or sum(d.teacher_weights) <= 0:
        raise ConfigError(f"distill.teacher_weights={d.teacher_weights} must be >= 0 with a positive sum")
    for key in ("jsd_beta", "lmbda", "mix_alpha", "gamma"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            raise ConfigError(f"distill.{key}={getattr(d, key)} must be in [0, 1]")
    if d.teacher_cache_gb < 0:
        raise ConfigError(f"distill.teacher_cache_gb={d.teacher_cache_gb} must be >= 0")
    for key in ("temperature", "confidence_temperature"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"distill.{key}={getattr(d, key)} must be > 0")
    if d.objective == DistillObjective.minillm and cfg.rollout.temperature != 1.0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature}: MiniLLM's reward is the "
                          "reverse KL of the student's own distribution, so it samples at 1.0")
    if cfg.grpo.ppo_epochs != 1 or cfg.grpo.mini_batches != 1:
        raise ConfigError("task=distill trains on-policy: grpo.ppo_epochs and grpo.mini_batches must be 1")
    if cfg.student.init == StudentInit.prune:
        layers = cfg.student.layers.strip()
        if not (layers == "every_other" or re.fullmatch(r"first:\d+|(drop:)?\d+(,\d+)*", layers)):
            raise ConfigError(f"student.layers={layers!r}: expected every_other, first:K, indices like 0,2,5 "
                              "or drop:1,3")


def validate_resources(cfg: Config) -> None:
    """Actor resources that no cluster could satisfy, or that would deadlock a step."""
    r, lrn = cfg.rollout, cfg.learner
    amounts = {"rollout.gpus_per_actor": r.gpus_per_actor, "rollout.cpus_per_actor": r.cpus_per_actor,
               "learner.gpus": lrn.gpus, "learner.cpus_per_worker": lrn.cpus_per_worker}
    for key, value in amounts.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    minibatch = cfg.grpo.group_size * cfg.grpo.prompts_per_step // cfg.grpo.mini_batches
    if minibatch % lrn.num_workers:
        # Every rank must run the same number of micro-batches, or the all-reduce hangs.
        raise ConfigError(
            f"learner.num_workers={lrn.num_workers} does not divide the mini-batch of "
            f"{minibatch} sequences (grpo.prompts_per_step*grpo.group_size/grpo.mini_batches)")
    if r.tensor_parallel_size > 1 and r.gpus_per_actor != r.tensor_parallel_size:
        raise ConfigError(
            f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs "
            f"rollout.gpus_per_actor={r.tensor_parallel_size}, got {r.gpus_per_actor}")
    if r.gpus_per_actor > 0:
        # NCCL weight sync: one rank per GPU, and the learner sends from a GPU.
        for key in ("rollout.gpus_per_actor", "learner.gpus"):
            if amounts[key] < 1 or amounts[key] != int(amounts[key]):
                raise ConfigError(
                    f"{key}={amounts[key]}: GPU rollouts sync weights over NCCL, which needs "
                    f"whole GPUs (>= 1) for rollout actors and learner workers")
    for cpus, gpus in (("rollout.cpus_per_actor", "rollout.gpus_per_actor"),
                       ("learner.cpus_per_worker", "learner.gpus")):
        if amounts[cpus] == 0 and amounts[gpus] == 0:
            raise ConfigError(f"{cpus}=0 and {gpus}=0: a placement-group bundle needs a resource")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_cli(argv: list[str], default_recipe: str | None, forced: tuple[str, ...] = ()) -> tuple[Config, str | None]:
    """Parse a command line into (config, recipe name); `--help` and bad input exit here."""
    if any(a in ("-h", "--help") for a in argv):
        print("usage: python -m rlkd.train recipe=NAME [key=value ...]\n")
        print(f"recipes ({RECIPES_DIR}): {', '.join(recipe_names())}\n\nkeys:")
        print(help_text())
        raise SystemExit(0)
    try:
        recipe, overrides = parse_argv(argv)
        recipe = recipe or default_recipe
        return load_config(recipe, [*forced, *overrides]), recipe
    except ConfigError as e:
        raise SystemExit(f"rlkd: error: {e}") from None


def hydra_value(value) -> str:
    """`value` in Hydra's override grammar; strings are quoted, so paths with spaces survive."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    # Hydra reads backslashes literally except before a quote or at the end of the string.
    text = "".join("\\\\" if c == "\\" and (i + 1 == len(text) or text[i + 1] == "'") else c
                   for i, c in enumerate(text))
    return "'" + text.replace("'", "\\'") + "'"


def _leaves(node, prefix: str) -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}"))
    return out


def changes(cfg: Config) -> dict[str, str]:
    """`key=value` overrides for every key whose value differs from the defaults (but model.name,
    which each stage sets itself)."""
    ours = _leaves(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "")
    base = _leaves(OmegaConf.to_container(OmegaConf.structured(Config()), enum_to_str=True), "")
    return {k[1:]: f"{k[1:]}={hydra_value(v)}" for k, v in ours.items() if v != base[k] and k != ".model.name"}
