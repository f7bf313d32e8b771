"""rlkd.config: the recipes, the schema's docs, one-line errors and command-line overrides."""

import re
import shlex
import subprocess
import sys
from dataclasses import fields, is_dataclass
from enum import Enum

import pytest
from omegaconf import OmegaConf

from rlkd import config
from rlkd.compose import (
    all_keys,
    field_docs,
    from_cli,
    load_config,
    parse_argv,
    recipe_names,
    recipe_path,
)
from rlkd.config import AdvScale, Config, OnError, Task, TrainerConfig
from rlkd.errors import ConfigError

RECIPES = recipe_names()



def one_line_error(recipe=None, overrides=()) -> str:
    """The ConfigError message of load_config, checked to be a single line."""
    with pytest.raises(ConfigError) as info:
        load_config(recipe, list(overrides))
    message = str(info.value)
    assert message and "\n" not in message and message == message.strip(), repr(message)
    return message


def write_recipe(tmp_path, text: str) -> str:
    path = tmp_path / "my_recipe.yaml"
    path.write_text(text)
    return str(path)


def flatten(node, prefix: str = "") -> dict:
    """Dotted key -> value for every leaf of a nested mapping (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def schema_classes(cls=Config):
    """Every config dataclass reachable from `cls`, `cls` first."""
    yield cls
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            yield from schema_classes(type(default))


# --- recipes ------------------------------------------------------------------------------------


def test_recipes_exist():
    assert {"grpo_gsm8k", "eval_gsm8k"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.task, Task)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_first_line_is_its_launch_command(name):
    first = recipe_path(name).read_text().splitlines()[0]
    match = re.fullmatch(rf"# python -m rlkd\.(train|eval) recipe={re.escape(name)}(\s.*)?", first)
    assert match, f"first line of {name}.yaml is not its launch command: {first!r}"
    # The documented command line itself parses, with the entry point's forced task.
    recipe, overrides = parse_argv(shlex.split(first[1:])[3:])
    forced = ["task=eval"] if match[1] == "eval" else []
    assert recipe == name
    load_config(recipe, [*forced, *overrides])


@pytest.mark.parametrize(
    "name",
    RECIPES,
)
def test_recipe_holds_only_differences_from_defaults(name):
    recipe = OmegaConf.to_container(OmegaConf.load(recipe_path(name))) or {}
    defaults = OmegaConf.structured(Config)
    same = []
    for key, value in flatten(recipe).items():
        default = OmegaConf.select(defaults, key)
        if isinstance(default, Enum):
            default = default.value
        elif OmegaConf.is_config(default):
            default = OmegaConf.to_container(default)
        if value == default:
            same.append(f"{key}={value!r}")
    assert not same, f"{name}.yaml repeats defaults: {', '.join(same)}"


def test_unknown_recipe_suggests_the_nearest():
    message = one_line_error("grpo_gsm8")
    assert "unknown recipe 'grpo_gsm8'" in message
    assert "did you mean 'grpo_gsm8k'" in message
    assert all(name in message for name in RECIPES)


# --- schema docs --------------------------------------------------------------------------------


def test_every_config_dataclass_is_walked():
    declared = {c for c in vars(config).values() if isinstance(c, type) and is_dataclass(c)}
    walked = list(schema_classes())
    assert len(walked) == len(set(walked)) and set(walked) == declared


@pytest.mark.parametrize("cls", list(schema_classes()), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    undocumented = [f.name for f in fields(cls) if not docs.get(f.name, "").strip()]
    assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["trainer.max_stepz=2"],
            ["argument 'trainer.max_stepz=2'", "unknown key", "'trainer.max_steps'"],
        ),
        (["max_steps=2"], ["unknown key 'max_steps'", "'trainer.max_steps'"]),
        (["trainer.max_steps=abc"], ["argument 'trainer.max_steps=abc'", "'trainer.max_steps'"]),
        (["run.seed=1.5"], ["'run.seed'"]),
        (["rollout.enforce_eager=maybe"], ["'rollout.enforce_eager'", "maybe"]),
        (["rewards.weights=[a,b]"], ["'rewards.weights[0]'"]),
        (["grpo.adv_scale=foo"], ["'grpo.adv_scale'", "'foo'", "group", "batch", "none"]),
        (["rewards.on_error=ignore"], ["'rewards.on_error'", "raise", "zero"]),
        (["trainer=5"], ["'trainer'"]),
        (["~trainer.max_steps"], ["deleting keys is not supported"]),
        (["trainer.max_steps"], ["argument 'trainer.max_steps'"]),
        (
            ["rewards.funcs=[gsm8k_correct]", "rewards.weights=[1.0,0.2]"],
            ["rewards.funcs has 1 entries", "rewards.weights has 2"],
        ),
        (["rewards.funcs=[gsm8k_correct,a.py:f,m:g]", "rewards.weights=[1]"], ["has 3", "has 1"]),
        # An unknown name is reported as unknown, whatever rewards.weights holds.
        (["rewards.funcs=[no_such_reward]"], ["reward 'no_such_reward': unknown name"]),
        (["learner.lr=-1"], ["learner.lr=-1.0 must be > 0"]),
        (["rollout.temperature=-0.5"], ["rollout.temperature=-0.5 must be >= 0"]),
        (["rollout.top_p=1.5"], ["rollout.top_p=1.5 must be in (0, 1]"]),
        # A nucleus biases GRPO's importance weights: refused for training at start-up.
        (["rollout.top_p=0.9"], ["rollout.top_p=0.9", "biased", "rollout.top_p=1"]),
        (["learner.max_grad_norm=0"], ["learner.max_grad_norm=0.0 must be > 0"]),
        (["rollout.gpu_memory_utilization=0"], ["rollout.gpu_memory_utilization=0.0 must be in (0, 1]"]),
        (["grpo.mini_batches=3"], ["grpo.mini_batches=3", "does not divide", "=16"]),
        (["grpo.group_size=0"], ["grpo.group_size=0 must be >= 1"]),
        (["grpo.beta=-0.1"], ["grpo.beta", ">= 0"]),
        (
            ["rollout.max_new_tokens=1024"],
            ["rollout.max_new_tokens=1024", "model.max_model_len=1024"],
        ),
        (
            ["model.max_model_len=200", "rollout.max_new_tokens=64"],
            ["eval.max_new_tokens=384", "model.max_model_len=200"],
        ),
        (["eval.compare=[a.jsonl]"], ["eval.compare needs exactly two"]),
        (["grpo.loss=ppo"], ["'grpo.loss'", "'ppo'", "grpo", "gspo", "cispo"]),
        (["grpo.adv_estimator=rloo", "grpo.group_size=1"], ["grpo.adv_estimator=rloo", "group_size >= 2"]),
        (["data.max_solution_steps=-1"], ["data.max_solution_steps=-1 must be >= 0"]),
        (["trainer.collapse_length_ratio=1.5"], ["trainer.collapse_length_ratio=1.5 must be in (0, 1)"]),
        (["trainer.collapse_window=-2"], ["trainer.collapse_window=-2 must be >= 0"]),
    ],
)
def test_cli_errors_are_one_line_and_name_the_culprit(overrides, expected):
    message = one_line_error("grpo_gsm8k", overrides)
    missing = [text for text in expected if text not in message]
    assert not missing, f"{missing} not in {message!r}"


@pytest.mark.parametrize(
    "text, line, expected",
    [
        (
            "task: eval\ntrainer:\n  max_stepz: 3\n",
            3,
            ["unknown key 'trainer.max_stepz'", "'trainer.max_steps'"],
        ),
        ("task: eval\nfoo: 1\n", 2, ["unknown key 'foo'"]),
        ("# a comment\ntrainer:\n  max_steps: abc\n", 3, ["'trainer.max_steps'", "'abc'"]),
        ("data:\n  split: test\ngrpo:\n  adv_scale: nope\n", 4, ["'grpo.adv_scale'", "'nope'"]),
        # The key's leaf name also appears at the start of a quoted value line.
        ("data:\n  instruction: 'max_steps: 3'\ntrainer:\n  max_steps: x\n", 4, ["max_steps"]),
    ],
)
def test_recipe_key_errors_name_file_and_line(tmp_path, text, line, expected):
    path = write_recipe(tmp_path, text)
    message = one_line_error(path)
    assert message.startswith(f"{path}:{line}: "), message
    missing = [t for t in expected if t not in message]
    assert not missing, f"{missing} not in {message!r}"


def test_recipe_error_line_of_a_leaf_shared_by_two_sections(tmp_path):
    path = write_recipe(tmp_path, "rollout:\n  max_new_tokens: 64\neval:\n  max_new_tokens: x\n")
    assert one_line_error(path).startswith(f"{path}:4: ")


def test_invalid_yaml_recipe(tmp_path):
    path = write_recipe(tmp_path, "task: eval\ntrainer: [1\n")
    message = one_line_error(path)
    assert message.startswith(f"{path}: invalid YAML")
    assert "line 2" in message


def test_recipe_that_is_a_list(tmp_path):
    path = write_recipe(tmp_path, "- task: eval\n- trainer: 1\n")
    assert one_line_error(path) == f"{path}: a recipe must be a mapping of keys to values"


def test_cross_field_check_applies_to_recipes(tmp_path):
    path = write_recipe(tmp_path, "rewards:\n  funcs: [gsm8k_correct]\n")
    assert "rewards.funcs has 1 entries but rewards.weights has 2" in one_line_error(path)


def test_empty_recipe_is_the_defaults(tmp_path):
    path = write_recipe(tmp_path, "# nothing but a comment\n")
    assert load_config(path) == load_config(None) == Config()


def test_bare_argument_without_equals():
    with pytest.raises(ConfigError, match=r"^argument 'max_steps': expected key=value"):
        parse_argv(["recipe=grpo_gsm8k", "max_steps"])
    with pytest.raises(SystemExit) as info:
        from_cli(["max_steps"], "grpo_gsm8k")
    assert str(info.value.code).startswith("rlkd: error: argument 'max_steps'")


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_of_every_kind():
    cfg = load_config(
        "grpo_gsm8k",
        [
            "rewards.funcs=[gsm8k_correct,pkg.mod:b]",
            "rewards.weights=[1,2]",
            "grpo.clip_low=0.1",
            "learner.lr=3e-6",
            "rollout.enforce_eager=false",
            "learner.gradient_checkpointing=true",
            "data.instruction='Solve it.'",
            'data.system_prompt="Be brief, please."',
            "run.name=123",
            "grpo.adv_scale=batch",
            "rewards.on_error=zero",
            "task=eval",
        ],
    )
    assert cfg.rewards.funcs == ["gsm8k_correct", "pkg.mod:b"]
    assert cfg.rewards.weights == [1.0, 2.0]
    assert all(type(w) is float for w in cfg.rewards.weights)
    assert cfg.grpo.clip_low == 0.1 and cfg.learner.lr == 3e-6
    assert cfg.rollout.enforce_eager is False and cfg.learner.gradient_checkpointing is True
    assert cfg.data.instruction == "Solve it."
    assert cfg.data.system_prompt == "Be brief, please."
    assert cfg.run.name == "123"
    assert cfg.grpo.adv_scale is AdvScale.batch
    assert cfg.rewards.on_error is OnError.zero
    assert cfg.task is Task.eval


def test_result_is_the_typed_tree():
    cfg = load_config("eval_gsm8k")
    assert type(cfg) is Config and type(cfg.trainer) is TrainerConfig
    assert cfg.task is Task.eval and cfg.rewards.on_error is OnError.raise_


def test_precedence_defaults_recipe_cli(tmp_path):
    assert load_config(None).data.split == "train"
    assert load_config("eval_gsm8k").data.split == "test"
    assert load_config("eval_gsm8k", ["data.split=validation"]).data.split == "validation"
    # Keys a recipe leaves alone keep their defaults.
    assert load_config("eval_gsm8k").trainer == TrainerConfig()

    path = write_recipe(tmp_path, "trainer:\n  max_steps: 3\n  eval_every: 0\n")
    cfg = load_config(path, ["trainer.max_steps=4"])
    assert (cfg.trainer.max_steps, cfg.trainer.eval_every) == (4, 0)
    assert cfg.trainer.save_every == TrainerConfig().save_every
    # Later arguments win over earlier ones.
    assert load_config(path, ["trainer.max_steps=5", "trainer.max_steps=6"]).trainer.max_steps == 6


# --- from_cli -----------------------------------------------------------------------------------


def test_from_cli_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as info:
        from_cli(["trainer.max_steps=3", "--help"], None)
    assert info.value.code == 0
    out = capsys.readouterr().out
    missing = [key for key in all_keys() if f"\n  {key}=" not in out]
    assert not missing, f"--help does not list {missing}"
    assert all(name in out for name in RECIPES)
    assert field_docs(TrainerConfig)["max_steps"] in out
    assert "{group|batch|none}" in out


def test_from_cli_error_exits_with_one_line():
    with pytest.raises(SystemExit) as info:
        from_cli(["trainer.max_stepz=1"], "grpo_gsm8k")
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("rlkd: error: ")
    assert "'trainer.max_steps'" in message


def test_from_cli_recipe_and_forced_overrides():
    cfg, recipe = from_cli(["trainer.max_steps=3"], "grpo_gsm8k")
    assert recipe == "grpo_gsm8k" and cfg.trainer.max_steps == 3
    cfg, recipe = from_cli(["recipe=eval_gsm8k"], "grpo_gsm8k")
    assert recipe == "eval_gsm8k" and cfg.data.split == "test"
    cfg, recipe = from_cli([], "grpo_gsm8k", forced=("task=eval",))
    assert cfg.task is Task.eval
    assert from_cli([], None) == (Config(), None)


def test_train_entry_point_bad_key_is_a_one_line_error(tmp_path):
    """The real `python -m rlkd.train` (imports the whole stack, so ~30 s on a busy CPU)."""
    proc = subprocess.run(
        [sys.executable, "-m", "rlkd.train", "trainer.max_stepz=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    # Heavy imports may log to stderr first (Triton, DeepSpeed); the error is the last line.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rlkd: error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "'trainer.max_steps'" in errors[0]
    assert not list(tmp_path.iterdir()), "a config error must not create a run directory"


def test_a_nucleus_is_free_where_nothing_trains_on_its_logprobs():
    for recipe in ("eval_gsm8k", "cot_gsm8k", "sft_gsm8k"):
        assert load_config(recipe, ["rollout.top_p=0.9"]).rollout.top_p == 0.9


@pytest.mark.parametrize("overrides, message", [
    (["task=sft", "rollout.environment=calculator"], r"rollout.environment='calculator' works with task=grpo and eval only \(got task=sft\)"),
    (["rollout.max_turns=0"], r"rollout.max_turns=0 must be >= 1"),
    (["rollout.tool_timeout_s=0"], r"rollout.tool_timeout_s=0.0 must be > 0"),
    (['data.fewshot=[["only a question"]]'], r"data.fewshot: each entry is \[question, answer\]"),
])
def test_environment_and_fewshot_errors_are_one_line(overrides, message):
    assert re.search(message, one_line_error(None, overrides))


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_staleness=-1"], r"rollout.max_staleness=-1 must be >= 0 \(0 is the synchronous loop\)"),
    (["task=distill", "rollout.max_staleness=1"], r"rollout.max_staleness=1 works with task=grpo only \(got task=distill\)"),
    (["rollout.cpu_cores=[0,0]"], r"rollout.cpu_cores=\[0, 0\]: CPU ids must be distinct and >= 0"),
    (["learner.cpu_cores=[4096]"], r"learner.cpu_cores=\[4096\]: this machine runs on CPUs \[0"),
])
def test_async_and_core_binding_errors_are_one_line(overrides, message):
    assert re.search(message, one_line_error(None, overrides))


def test_enum_values_are_accepted_as_written_in_the_docs():
    assert load_config(None, ["rewards.on_error=raise"]).rewards.on_error == OnError.raise_
    assert load_config(None, ["rewards.on_error=zero"]).rewards.on_error == OnError.zero
