"""The one typed config tree, its recipes and its command line.

`python -m rlkd.train recipe=NAME a.b=c` composes three layers, each validated against the
dataclass schema below: the defaults, `recipes/NAME.yaml` (only differences from the defaults)
and the command-line overrides (Hydra's override grammar). An unknown key or a wrong type is a
one-line `ConfigError` naming the file or argument and the key, with the nearest valid key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
REPO_ROOT = RECIPES_DIR.parent


class InputError(ValueError):
    """Bad user input (config, data, model, reward, checkpoint) found before heavy work starts;
    the message is one line naming the culprit, and the CLI prints it without a traceback."""


class RunStopped(RuntimeError):
    """A run stopped on purpose (repeated actor failures, NaN steps); one line says why and what
    to resume from, and the CLI prints it without a traceback."""


class ConfigError(InputError):
    """A bad recipe, key or value; the message is one line naming the culprit."""


class Task(str, Enum):
    grpo = "grpo"
    eval = "eval"
    cot = "cot"
    sft = "sft"
    distill = "distill"


class AdvScale(str, Enum):
    group = "group"
    batch = "batch"
    none = "none"


class LossAgg(str, Enum):
    token_mean = "token_mean"
    seq_mean_token_mean = "seq_mean_token_mean"
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"


class PromptMode(str, Enum):
    plain = "plain"
    gt_primed = "gt_primed"
    gold = "gold"


class Select(str, Enum):
    shortest = "shortest"
    confident = "confident"
    first = "first"


class SFTTarget(str, Enum):
    cot = "cot"
    answer_only = "answer_only"


class OnError(str, Enum):
    raise_ = "raise"
    zero = "zero"


class DistillObjective(str, Enum):
    minillm = "minillm"
    gkd = "gkd"
    forward_kl = "forward_kl"


class TeacherWeighting(str, Enum):
    fixed = "fixed"
    confidence = "confidence"


class StudentInit(str, Enum):
    model = "model"
    prune = "prune"
class PlacementStrategy(str, Enum):
    pack = "pack"
    spread = "spread"


@dataclass
class RunConfig:
    name: str = ""
    """Run name; empty means the recipe name. The run directory is <out_dir>/<name>-<timestamp>."""
    out_dir: str = "runs"
    """Parent folder of run directories."""
    dir: str = ""
    """Exact run directory to use instead of <out_dir>/<name>-<timestamp>."""
    seed: int = 0
    """Seed for prompt order, sampling and model init; a rerun with the same seed reproduces."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Local checkpoint directory, Hugging Face hub id, or the embedded default."""
    cache_dir: str = ""
    """Where the embedded model is materialised; empty means $RLKD_CACHE_DIR or ~/.cache/rlkd."""
    max_model_len: int = 1024
    """Context length (prompt + completion) given to vLLM."""


@dataclass
class DataConfig:
    path: str = ""
    """Local GSM8K directory (<split>.jsonl or .parquet) or file; empty means the hub dataset."""
    hub_id: str = "openai/gsm8k"
    """Hugging Face dataset id used when `path` is empty."""
    hub_config: str = "main"
    """Dataset config name on the hub."""
    split: str = "train"
    """Split to train on (or to evaluate, for task=eval)."""
    eval_split: str = "test"
    """Split used for periodic evaluation during training."""
    system_prompt: str = ""
    """System message for the chat template; empty keeps the model's own default."""
    instruction: str = (
        "Solve the following math problem step by step. "
        "End your answer with a final line of the form '#### <number>'."
    )
    """Text placed before each question in the user message."""
    skip_bad_rows: bool = False
    """Skip malformed rows (and report the count) instead of stopping at the first one."""


@dataclass
class RewardsConfig:
    funcs: list[str] = field(default_factory=lambda: ["gsm8k_correct", "format_answer_line"])
    """Reward functions: built-in names, `pkg.module:fn`, or `path/to/file.py:fn`."""
    weights: list[float] = field(default_factory=lambda: [1.0, 0.2])
    """One weight per entry of `funcs`; the reward is their weighted sum."""
    on_error: OnError = OnError.raise_
    """`raise` stops the run naming the function; `zero` scores the batch 0 and counts it."""


@dataclass
class RolloutConfig:
    num_actors: int = 1
    """Number of vLLM rollout actors; prompts are sharded across them."""
    gpus_per_actor: float = 0.0
    """GPUs per rollout actor; 0 runs vLLM on CPU. With NCCL sync each actor needs whole GPUs."""
    tensor_parallel_size: int = 1
    """GPUs one vLLM engine shards the model over, on one node; needs gpus_per_actor equal to it."""
    cpus_per_actor: float = 1.0
    """CPUs each rollout actor reserves in its placement-group bundle."""
    placement: PlacementStrategy = PlacementStrategy.pack
    """`pack` rollout actors onto as few nodes as possible, or `spread` them across nodes."""
    colocate: bool = True
    """Learner worker i shares rollout actor i's placement-group bundle (node); false: own group."""
    kv_cache_gb: int = 2
    """KV-cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = 0.4
    """Fraction of GPU memory vLLM may take (GPU only)."""
    enforce_eager: bool = True
    """Skip graph capture: start-up drops from ~80 s to ~20 s on CPU."""
    dtype: str = "float32"
    """vLLM weight dtype; float32 on CPUs without AVX-512 bf16, bfloat16 on GPUs."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold for training rollouts."""
    max_new_tokens: int = 128
    """Completion length cap during training."""
    max_restarts: int = 3
    """Times a dead rollout actor (killed, OOM, dead vLLM engine) is restarted with the current
    weights and its generation retried; one more failure stops the run."""


@dataclass
class LearnerConfig:
    deepspeed_config: str = "deepspeed_configs/zero2.json"
    """DeepSpeed JSON config (relative to the repo root or absolute)."""
    lr: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (optimizer steps)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; gradients accumulate over a mini-batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    dtype: str = "float32"
    """Learner compute dtype: float32 on CPU, bfloat16 on GPU."""
    gpus: float = 0.0
    """GPUs per learner worker; 0 trains on CPU with the gloo backend."""
    num_workers: int = 1
    """DeepSpeed data-parallel learner workers (one process group: gloo on CPU, NCCL on GPU)."""
    cpus_per_worker: float = 1.0
    """CPUs each learner worker reserves in its placement-group bundle."""


@dataclass
class GRPOConfig:
    group_size: int = 8
    """Completions sampled per prompt (G)."""
    prompts_per_step: int = 2
    """Prompts per step; a step trains on prompts_per_step * group_size completions."""
    adv_scale: AdvScale = AdvScale.group
    """Advantage scaling: `group` std (GRPO), `none` (Dr.GRPO) or `batch` std."""
    clip_low: float = 0.2
    """Lower PPO clip range: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """Upper PPO clip range (DAPO clip-higher): ratio <= 1 + clip_high."""
    beta: float = 0.0
    """k3 KL coefficient to the frozen reference; 0 loads no reference model."""
    loss_agg: LossAgg = LossAgg.token_mean
    """How per-token losses are averaged."""
    tis_cap: float = 2.0
    """Cap of the truncated importance weight correcting vLLM-vs-learner logprobs; 0 disables."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per epoch; the rollout batch is split into this many mini-batches."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Number of GRPO steps (rollout batch + update + weight sync)."""
    eval_every: int = 25
    """Evaluate on a held-out slice every N steps (0 disables)."""
    eval_samples: int = 64
    """Held-out questions per periodic evaluation."""
    save_every: int = 50
    """Save an HF checkpoint every N steps (0 saves only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints to keep; older ones are deleted."""
    save_state: bool = True
    """Checkpoints also hold optimizer, scheduler, RNG and data-cursor state (about 4x the size
    of the weights), which `resume` needs to continue exactly."""
    resume: str = ""
    """`auto`: continue from the newest complete checkpoint in run.dir (start fresh if none); a
    checkpoint directory: continue from it; empty: start fresh."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps whose update was skipped for a NaN/inf loss or
    gradient (each skip is logged as train/skipped_steps); 0 never stops."""


@dataclass
class EvalConfig:
    num_samples: int = 0
    """Evaluate on the first N questions (0 means the whole split)."""
    max_new_tokens: int = 384
    """Completion length cap for evaluation."""
    temperature: float = 0.0
    """0 is greedy decoding."""
    compare: list[str] = field(default_factory=list)
    """Two predictions.jsonl files: run a paired McNemar test instead of evaluating."""


@dataclass
class CotConfig:
    prompt_mode: PromptMode = PromptMode.plain
    """`plain` CoT; `gt_primed`: the teacher is shown the gold answer and explains it;
    `gold`: no teacher, GSM8K's human rationales."""
    temperatures: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    """Teacher sampling temperatures; each question gets `samples_per_temperature` at each."""
    samples_per_temperature: int = 1
    """Samples per question per temperature (k)."""
    num_questions: int = 0
    """First N questions of `data.split` (0 means all)."""
    max_new_tokens: int = 384
    """Teacher completion length cap."""
    primed_instruction: str = (
        "The correct final answer is {answer}. Explain step by step how to get it, without "
        "mentioning that the answer was given. End with a final line of the form '#### {answer}'."
    )
    """Added to the user message in `gt_primed` mode; `{answer}` is the gold answer."""
    strip_calculator: bool = True
    """Remove GSM8K's `<<48/2=24>>` calculator annotations from gold rationales."""
    trim_after_answer: bool = True
    """Cut a sample after its first '#### N' line (small models keep talking); its token count
    and confidence then cover the kept prefix only."""
    samples: str = ""
    """Existing samples.jsonl to re-filter instead of generating."""
    batch_questions: int = 64
    """Questions per generation call (one progress-bar tick)."""


@dataclass
class FilterConfig:
    correct: bool = True
    """Drop samples whose final answer does not match the gold answer."""
    answer_line: bool = True
    """Drop samples without a final '#### <number>' line."""
    min_tokens: int = 1
    """Drop samples shorter than this many tokens."""
    max_tokens: int = 0
    """Drop samples longer than this many tokens (0: no bound)."""
    drop_truncated: bool = True
    """Drop samples cut off by the length cap."""
    max_gold_ratio: float = 0.0
    """Conciseness: drop samples longer than this multiple of the gold rationale (0: off)."""
    min_mean_logprob: float = 0.0
    """Confidence: drop samples whose mean token logprob is below this (0: off), e.g. -0.4."""
    dedup_jaccard: float = 0.9
    """Near-duplicates: drop a sample whose word-trigram Jaccard similarity to a kept sample of
    the same question is at least this (0: off)."""
    select: Select = Select.shortest
    """Order of a question's surviving samples: shortest, most confident, or as generated."""
    max_per_question: int = 1
    """Keep at most this many samples per question (0: all survivors)."""


@dataclass
class SFTConfig:
    data: str = ""
    """Filtered dataset from `task=cot` (its kept.jsonl, or the run dir); empty: GSM8K's gold
    rationales of `data.split`."""
    target: SFTTarget = SFTTarget.cot
    """`cot`: the rationale then the '#### N' line; `answer_only`: only '#### N'."""
    strip_calculator: bool = True
    """Remove `<<48/2=24>>` annotations from gold rationales."""
    num_examples: int = 0
    """Train on the first N examples (0: all)."""
    held_out: int = 32
    """Examples held out of the SFT data for the periodic held-out loss."""
    epochs: int = 1
    """Passes over the training examples."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    max_seq_len: int = 768
    """Longer prompt+target sequences are dropped (and counted)."""
    packing: bool = False
    """Pack several sequences into each row (attention kept within each sequence)."""
    eval_accuracy: bool = True
    """At each eval, also measure greedy accuracy on `trainer.eval_samples` test questions."""


@dataclass
class StudentConfig:
    init: StudentInit = StudentInit.model
    """Distillation student: `model` is model.name; `prune` cuts it out of the first teacher."""
    layers: str = "every_other"
    """Teacher layers a pruned student keeps: `every_other`, `first:K` or indices `0,2,5`."""


@dataclass
class DistillConfig:
    objective: DistillObjective = DistillObjective.minillm
    """`minillm`: reverse-KL policy gradient; `gkd`: generalized JSD; `forward_kl`: Hinton KD."""
    teachers: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])
    """Teacher checkpoints (local dir, hub id or embedded name); they share the student's tokenizer."""
    teacher_weights: list[float] = field(default_factory=lambda: [1.0])
    """One weight per teacher for `fixed` weighting; normalised to sum to 1."""
    teacher_weighting: TeacherWeighting = TeacherWeighting.fixed
    """`fixed`: teacher_weights; `confidence`: per example, softmax of each teacher's mean token logprob."""
    confidence_temperature: float = 1.0
    """Temperature of the confidence softmax over teachers."""
    gamma: float = 1.0
    """MiniLLM discount of the reward-to-go."""
    length_norm: bool = True
    """MiniLLM: divide the reward-to-go by the number of tokens it sums."""
    whiten: bool = True
    """MiniLLM: standardise the returns over the batch (mean 0, std 1), as the reference code does."""
    single_step: bool = True
    """MiniLLM: take the current token's reward in exact expectation (full-vocabulary KL)."""
    single_step_coef: float = 1.0
    """Weight of the single-step KL term."""
    mix_alpha: float = 0.0
    """MiniLLM teacher-mixed sampling weight; > 0 samples on the learner, not vLLM (slow)."""
    task_coef: float = 0.0
    """Weight of the rewards.funcs group advantage added to the MiniLLM return (GRPO + KD)."""
    lm_coef: float = 0.0
    """Weight of an NLL term on GSM8K reference solutions (MiniLLM's language-modelling loss)."""
    jsd_beta: float = 0.5
    """GKD: 0 is forward KL, 1 reverse KL."""
    lmbda: float = 0.5
    """GKD: fraction of steps trained on student samples; the rest on GSM8K reference solutions."""
    temperature: float = 1.0
    """Softmax temperature of the gkd / forward_kl divergences."""
    kl_eval_prompts: int = 16
    """Held-out questions on which the student-teacher reverse KL is measured at each eval."""
    kl_eval_samples: int = 2
    """Student samples per held-out question for that measurement."""


@dataclass
class RayConfig:
    address: str = ""
    """Address of an existing Ray cluster (`auto` or host:port); empty starts a local one."""
    num_cpus: int = 0
    """CPUs a local Ray instance advertises; 0 means the cores, or what the actors reserve if
    more (rollout and learner phases alternate, so they share the cores)."""
    placement_timeout_s: int = 300
    """How long to wait for the cluster to fit the actors' placement groups."""


@dataclass
class Config:
    task: Task = Task.grpo
    """What the run does: `grpo` trains, `eval` evaluates `model.name`, `distill` distils teachers."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory and seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """GSM8K source and prompt format."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """Reward functions and their weights."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """vLLM rollout actors and sampling."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """DeepSpeed learner and optimizer."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO objective."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training loop schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster."""
    cot: CotConfig = field(default_factory=CotConfig)
    """Teacher chain-of-thought generation (task=cot); the teacher is model.name."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """Filters applied to teacher samples (task=cot)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning (task=sft)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """How task=distill builds its student."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation objective and teachers (task=distill)."""


ConfigStore.instance().store(name="rlkd", node=Config)


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
        if isinstance(f.type, str) and f.type in globals() and isinstance(globals()[f.type], type):
            enum_cls = globals()[f.type]
            if issubclass(enum_cls, Enum):
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
        "rollout.num_actors": cfg.rollout.num_actors,
        "rollout.tensor_parallel_size": cfg.rollout.tensor_parallel_size,
        "learner.num_workers": cfg.learner.num_workers,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
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
    if cfg.rollout.max_restarts < 0 or cfg.trainer.max_bad_steps < 0:
        raise ConfigError("rollout.max_restarts and trainer.max_bad_steps must be >= 0")
    if cfg.eval.compare and len(cfg.eval.compare) != 2:
        raise ConfigError(f"eval.compare needs exactly two predictions files, got {cfg.eval.compare}")
    if cfg.task == Task.distill:
        validate_distill(cfg)


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
        if not (layers == "every_other" or re.fullmatch(r"first:\d+|\d+(,\d+)*", layers)):
            raise ConfigError(f"student.layers={layers!r}: expected every_other, first:K or indices like 0,2,5")


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
