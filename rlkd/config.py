"""The one typed config tree: every key rlkd reads, its default and its documentation.

Sections are dataclasses; the attribute docstring under each field is what `--help` prints.
`rlkd.compose` turns defaults + recipe + command line into a validated `Config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore

from rlkd.config_distill import DistillConfig, StudentConfig, StudyConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
REPO_ROOT = RECIPES_DIR.parent


class Task(str, Enum):
    grpo = "grpo"
    eval = "eval"
    cot = "cot"
    sft = "sft"
    distill = "distill"
    study = "study"


class AdvScale(str, Enum):
    group = "group"
    batch = "batch"
    none = "none"


class PolicyLoss(str, Enum):
    grpo = "grpo"
    gspo = "gspo"
    cispo = "cispo"


class AdvEstimator(str, Enum):
    grpo = "grpo"
    rloo = "rloo"


class LearnerDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    autocast_bf16 = "autocast_bf16"


class RolloutDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Overlong(str, Enum):
    none = "none"
    mask = "mask"
    penalty = "penalty"


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
    quiet: bool = True
    """Keep the terminal to rlkd's own lines and progress bars; what vLLM, Ray, DeepSpeed and
    torch print goes to <run dir>/logs/run.log. false prints it all to the terminal too."""


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
    name: str = "gsm8k"
    """Named dataset (the registry `rlkd.data.DATASETS`): `gsm8k`, `mawps_asdiv_a`, `arith` or `muldiv`,
    shipped in rlkd/datasets, so nothing needs the network. It also says how a row's gold
    rationale is written, for `path` and `hub_id` too."""
    path: str = ""
    """Local directory (<split>.jsonl or .parquet) or file, read instead of the named dataset's
    own copy."""
    hub_id: str = ""
    """Hugging Face dataset id (e.g. openai/gsm8k), read when `path` is empty."""
    hub_config: str = "main"
    """Dataset config name on the hub."""
    split: str = "train"
    """Split to train on (or to evaluate, for task=eval)."""
    eval_split: str = "test"
    """Split used for periodic evaluation during training."""
    held_out: int = 0
    """Hold out the last N questions of `split`: never trained on, and the periodic evaluation
    (and task=eval) uses them instead of `eval_split`, so settings are tuned off the test set."""
    system_prompt: str = ""
    """System message for the chat template; empty keeps the model's own default."""
    instruction: str = (
        "Solve the following math problem step by step. "
        "End your answer with a final line of the form '#### <number>'."
    )
    """Text placed before each question in the user message."""
    fewshot: list[list[str]] = field(default_factory=list)
    """Worked examples, [[question, answer], ...], shown before the question as earlier chat
    turns (each question with the instruction), or as Question/Answer pairs for a base model.
    Empty with rollout.environment: the environment's own `demonstrations`."""
    max_solution_steps: int = 0
    """Train only on questions whose gold solution (the rationale before '####') has at most N
    lines, one per step; 0 keeps all. A curriculum for small models: GSM8K questions of 2-3
    steps are the ones a 135M model sometimes solves, so their groups carry reward variance.
    Held-out and evaluation questions are never filtered."""
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
    dtype: RolloutDtype = RolloutDtype.auto
    """vLLM weight dtype. `auto`: bfloat16 on GPUs and on CPUs with AVX-512-bf16 or AMX, float32
    elsewhere (the run log says which and why); or `float32`, `bfloat16`, `float16`."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold for training rollouts; must stay 1 for GRPO and distillation,
    whose learner scores the full vocabulary (a nucleus would bias the importance weights)."""
    max_new_tokens: int = 128
    """Completion length cap during training."""
    max_restarts: int = 3
    """Times a dead rollout actor (killed, OOM, dead vLLM engine) is restarted with the current
    weights and its generation retried; one more failure stops the run."""
    environment: str = ""
    """Multi-turn episodes with tools (task=grpo): an environment class, by REGISTRY name
    (`calculator`), dotted path `pkg.module:Class` or file `path/to/env.py:Class`
    (environments/). Its tools are described in the system prompt; max_new_tokens is then each
    episode's budget, the policy's and the tools' tokens together. Empty: single completions."""
    max_turns: int = 4
    """Policy turns per episode at most (with an environment); the last turn's text is scored."""
    tool_timeout_s: float = 5.0
    """A tool call that takes longer ends its episode, recorded and counted; the run goes on."""
    max_staleness: int = 0
    """GRPO: generate up to k steps ahead while the learner trains, on weights at most k versions
    old (rlkd/offpolicy.py: the schedule, and the importance correction the learner applies).
    0: the synchronous loop, each step sampled by the weights it trains."""
    cpu_cores: list[int] = field(default_factory=list)
    """CPU ids each rollout engine's threads are bound to (Linux, vLLM's
    VLLM_CPU_OMP_THREADS_BIND); [] lets vLLM choose. With max_staleness > 0 on one machine,
    give the rollout and the learner (learner.cpu_cores) disjoint cores, or they contend."""


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank r (Hu et al. 2021, through PEFT); 0 trains every weight. With r > 0 only the
    adapters get gradients and optimizer state; the rollout engines, checkpoints and evaluation
    get the merged weights W + (alpha / r) B A."""
    alpha: float = 32.0
    """The adapters' update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input. Above 0 the learner's training forward is no longer the
    merged model the sampler runs, so the importance weights see the difference."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names (last component) of the model's nn.Linear layers that get adapters."""


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
    cpu_cores: list[int] = field(default_factory=list)
    """CPU learner: pin each worker to these CPU ids, one thread each (Linux); [] uses every
    core, since the synchronous loop's rollout and update phases take turns."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (SFT and distillation); gradients accumulate over a
    mini-batch."""
    max_tokens_per_micro_batch: int = 2048
    """GRPO: input tokens per forward/backward. Sequences are packed unpadded into micro-batches
    of at most this many tokens (a longer single sequence gets one of its own)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    dtype: LearnerDtype = LearnerDtype.auto
    """`auto`: bf16 autocast (fp32 master weights and optimizer state) on GPUs and on CPUs with
    AVX-512-bf16 or AMX, fp32 elsewhere (the run log says which and why); `autocast_bf16`,
    `float32`, or `bfloat16` (bf16 weights, DeepSpeed's bf16 mode)."""
    gpus: float = 0.0
    """GPUs per learner worker; 0 trains on CPU with the gloo backend."""
    num_workers: int = 1
    """DeepSpeed data-parallel learner workers (one process group: gloo on CPU, NCCL on GPU)."""
    cpus_per_worker: float = 1.0
    """CPUs each learner worker reserves in its placement-group bundle."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (GRPO, SFT and distillation)."""


@dataclass
class GRPOConfig:
    group_size: int = 8
    """Completions sampled per prompt (G)."""
    prompts_per_step: int = 2
    """Prompts per step; a step trains on prompts_per_step * group_size completions."""
    adv_scale: AdvScale = AdvScale.group
    """Advantage scaling: `group` std (GRPO), `none` (Dr.GRPO) or `batch` std. Stds are
    population stds (defined for a group of 1, and the advantages then have unit variance):
    at group_size=8 they are 1.069x TRL's sample-std advantages, like a 7% larger lr."""
    clip_low: float = 0.2
    """Lower PPO clip range: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """Upper PPO clip range (DAPO clip-higher): ratio <= 1 + clip_high."""
    beta: float = 0.0
    """k3 KL coefficient to the frozen reference; 0 loads no reference model. As in GRPO's
    paper (and TRL, verl), the k3 term's logged value estimates KL(pi || ref) while its
    gradient is that of KL(ref || pi) (the two agree to second order near ref)."""
    loss: PolicyLoss = PolicyLoss.grpo
    """Policy objective (rlkd/losses.py): `grpo`, the PPO-clipped token ratio; `gspo`, the clip
    on the sequence's geometric-mean ratio (Zheng et al. 2025: set clip_low=3e-4 clip_high=4e-4
    and loss_agg=seq_mean_token_mean as in the paper); `cispo`, the clipped, stop-gradient ratio
    weighting log p (MiniMax-M1 2025: clip_low=1 for no lower bound, tune clip_high). The
    truncated importance weight (tis_cap) and the KL term (beta) apply to each."""
    adv_estimator: AdvEstimator = AdvEstimator.grpo
    """Baseline of the advantages: `grpo`, the group mean; `rloo`, the mean of the group's other
    completions (Ahmadian et al. 2024), G/(G-1) times the mean-centred reward. adv_scale then
    applies (RLOO's own form is adv_scale=none)."""
    loss_agg: LossAgg = LossAgg.token_mean
    """How per-token losses are averaged."""
    tis_cap: float = 2.0
    """Cap of the truncated importance weight correcting vLLM-vs-learner logprobs; 0 disables."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    shared_prompt: bool = True
    """Encode each group's prompt once per micro-batch; its completions attend to that one copy
    (gradients identical to scoring every [prompt, completion] row on its own)."""
    mini_batches: int = 1
    """Optimizer steps per epoch; the rollout batch is split into this many mini-batches."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: draw further prompts until prompts_per_step groups have rewards
    that differ (a group whose completions all score alike has no gradient), within
    max_sampling_rounds generate calls; short of that, train on the groups found."""
    max_sampling_rounds: int = 4
    """Generate calls per step at most with dynamic_sampling; later rounds draw as many prompts
    as the keep rate seen so far says are needed, up to 4 x prompts_per_step."""
    overlong: Overlong = Overlong.none
    """Completions cut at rollout.max_new_tokens: `none` trains on them as they are; `mask`
    leaves them out of the loss (DAPO overlong filtering); `penalty` subtracts DAPO's soft
    overlong penalty, rising linearly from 0 to overlong_penalty over the last overlong_buffer
    tokens before the cap."""
    overlong_buffer: int = 64
    """Tokens before the cap over which the overlong penalty rises."""
    overlong_penalty: float = 1.0
    """Reward subtracted from a completion that reaches the cap (overlong=penalty)."""


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
    max_zero_signal_steps: int = 20
    """Stop after this many consecutive steps whose trained groups all had equal rewards (no
    gradient at all), naming the rewards, their means and how often no answer parsed; 0 never
    stops."""
    max_logp_mismatch: float = 0.5
    """Stop when train/logp_mismatch (mean |learner - sampler| token logprob) exceeds this for
    logp_mismatch_steps consecutive steps: the sampler no longer samples the learner's policy
    (weights that did not arrive, or an engine that diverged); 0 never stops. bf16 on both
    sides gives about 0.02-0.05, fp32 about 1e-4."""
    logp_mismatch_steps: int = 3
    """Consecutive steps over max_logp_mismatch before the run stops."""
    collapse_window: int = 10
    """Reward-hacking check (rlkd/collapse.py): steps 1..N are the baseline, the latest N steps
    the current means; 0 turns the check off."""
    collapse_length_ratio: float = 0.5
    """A collapse: the mean completion length falls under this fraction of its baseline while
    the task reward (the first of rewards.funcs) has not risen; the run prints one line."""
    stop_on_collapse: bool = False
    """Stop (after a checkpoint) when the collapse check trips, instead of only printing."""


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
    """What the run does: `grpo` trains, `eval` evaluates `model.name`, `distill` distils teachers,
    `study` runs the whole distillation study."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory and seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset (named, or a local or hub copy) and prompt format."""
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
    study: StudyConfig = field(default_factory=StudyConfig)
    """The one-command distillation study (task=study): variants, sizes, seeds."""


ConfigStore.instance().store(name="rlkd", node=Config)
