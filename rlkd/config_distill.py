"""The distillation pipeline's sections of the config tree: the student, the distillation
objective and the one-command study, with their choices. `rlkd.config.Config` holds them as
`student`, `distill` and `study`; the rest of the tree lives in `rlkd.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum


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


class StudyScale(str, Enum):
    tiny = "tiny"
    default = "default"
    large = "large"


class StudyVariant(str, Enum):
    """The rows a distillation study can hold (`study.variants`); rlkd.tasks.study.VARIANTS says what
    each one trains."""

    no_kd = "no_kd"
    answer_only = "answer_only"
    cot_unfiltered = "cot_unfiltered"
    cot_correct = "cot_correct"
    cot_confident = "cot_confident"
    cot_gt_primed = "cot_gt_primed"
    gold = "gold"
    grpo = "grpo"
    minillm = "minillm"
    teacher = "teacher"
    int4 = "int4"


@dataclass
class StudentConfig:
    init: StudentInit = StudentInit.model
    """Distillation student: `model` is model.name; `prune` cuts it out of the first teacher."""
    layers: str = "every_other"
    """Teacher layers a pruned student keeps: `every_other`, `first:K`, indices `0,2,5`, or all
    but some, `drop:12,14`."""


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
    teacher_cache_gb: float = 4.0
    """MiniLLM with the single-step term: CPU memory for the in-process teachers' full next-token
    distributions, kept from the reward pass for the loss pass so the teachers run once per step
    (tokens x vocabulary x 4 bytes: 16 x 128 tokens of SmolLM2's 49k vocabulary take 0.4 GiB);
    micro-batches beyond it run the teachers again."""
    mix_alpha: float = 0.0
    """MiniLLM teacher-mixed sampling weight; > 0 samples on the learner, not vLLM (slow)."""
    task_coef: float = 0.0
    """Weight of the rewards.funcs group advantage added to the MiniLLM return (GRPO + KD)."""
    lm_coef: float = 0.0
    """Weight of an NLL term on GSM8K reference solutions (MiniLLM's language-modelling loss)."""
    jsd_beta: float = 0.5
    """GKD: 0 is forward KL, 1 reverse KL. The generalised JSD is divided by beta (1 - beta)
    so that it tends to the forward/reverse KL at the ends (Agarwal et al.); at 0.5 that makes
    the loss (and its gradient) 4x TRL's GKDTrainer, like a 4x learning rate."""
    lmbda: float = 0.5
    """GKD: fraction of steps trained on student samples; the rest on GSM8K reference solutions."""
    temperature: float = 1.0
    """Softmax temperature of the gkd / forward_kl divergences."""
    kl_eval_prompts: int = 16
    """Held-out questions on which the student-teacher reverse KL is measured at each eval."""
    kl_eval_samples: int = 2
    """Student samples per held-out question for that measurement."""


@dataclass
class StudyConfig:
    scale: StudyScale = StudyScale.default
    """Sizes preset (SCALES below): `tiny` is a smoke run, `default` about an hour on 2 CPU
    cores, `large` the whole GSM8K splits for GPUs; the nonzero counts below override it."""
    variants: list[StudyVariant] = field(default_factory=lambda: list(StudyVariant))
    """Rows of the study: no_kd, answer_only, cot_unfiltered, cot_correct, cot_confident,
    cot_gt_primed, gold, grpo, minillm, teacher, int4 (README, Distillation study)."""
    teacher: str = "smollm2-135m-instruct"
    """Teacher checkpoint (local dir, hub id or embedded name): it writes the CoT, is MiniLLM's
    teacher, the `teacher` row, and the model the default student is pruned from (task=study
    reads this, not model.name)."""
    student: str = ""
    """Student checkpoint; empty prunes one out of the teacher with student.layers."""
    rl_base: StudyVariant = StudyVariant.gold
    """The SFT variant (or no_kd) that GRPO and MiniLLM start from. Default gold: the one SFT set
    whose size does not hang on the teacher's accuracy (a 135M teacher's filters keep a few
    samples), so RL starts from a student that writes the `#### N` line its rewards look for."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """The study runs once per seed (the run.seed of its stages; the study's own run.seed is
    unused); stages that no seed changes (pruning, gold data, greedy teacher/no_kd evals) run once."""
    cot_questions: int = 0
    """Training questions the teacher answers, and the gold rationales' count (0: the scale's)."""
    eval_questions: int = 0
    """First N test questions every model is graded on (0: the scale's)."""
    sft_steps: int = 0
    """Optimizer steps of every SFT variant, the same for all (0: the scale's)."""
    rl_steps: int = 0
    """GRPO and MiniLLM steps (0: the scale's)."""
    confidence_quantile: float = 0.5
    """cot_confident keeps samples whose mean token logprob is at least this quantile of all
    teacher samples' (no correctness label used)."""
    quant_group_size: int = 64
    """Weights per 4-bit scale/zero group in the int4 row: 32, 64, 128 or 256; it must divide the
    student's linear input sizes (576 and 1536 for SmolLM2)."""
    cot_args: list[str] = field(default_factory=list)
    """Extra key=value overrides for every teacher-CoT and filter stage."""
    sft_args: list[str] = field(default_factory=lambda: ["learner.lr=3e-5", "learner.warmup_steps=1"])
    """Extra key=value overrides for every SFT stage (default: a learning rate for short runs)."""
    grpo_args: list[str] = field(default_factory=lambda: ["learner.lr=5e-6"])
    """Extra key=value overrides for the GRPO stage."""
    minillm_args: list[str] = field(default_factory=list)
    """Extra key=value overrides for the MiniLLM stage."""
    eval_args: list[str] = field(default_factory=list)
    """Extra key=value overrides for every evaluation stage."""


@dataclass(frozen=True)
class Sizes:
    cot_questions: int
    """Training questions the teacher answers (0: the whole split)."""
    temperatures: tuple[float, ...]
    cot_max_tokens: int
    sft_steps: int
    sft_batch: int
    rl_steps: int
    rl_prompts: int
    rl_group: int
    rl_max_tokens: int
    eval_questions: int
    """First N test questions (0: all 1319)."""
    eval_max_tokens: int


SCALES = {
    StudyScale.tiny: Sizes(cot_questions=12, temperatures=(0.7,), cot_max_tokens=128, sft_steps=2,
                           sft_batch=4, rl_steps=1, rl_prompts=2, rl_group=2, rl_max_tokens=48,
                           eval_questions=12, eval_max_tokens=96),
    StudyScale.default: Sizes(cot_questions=96, temperatures=(0.3, 0.7), cot_max_tokens=256, sft_steps=16,
                              sft_batch=4, rl_steps=4, rl_prompts=2, rl_group=4, rl_max_tokens=128,
                              eval_questions=96, eval_max_tokens=256),
    StudyScale.large: Sizes(cot_questions=0, temperatures=(0.3, 0.5, 0.7), cot_max_tokens=384, sft_steps=1000,
                            sft_batch=32, rl_steps=200, rl_prompts=16, rl_group=8, rl_max_tokens=384,
                            eval_questions=0, eval_max_tokens=384),
}


def sizes(s: StudyConfig) -> Sizes:
    """The scale's sizes with the explicit nonzero counts of study.* in their place."""
    explicit = {"cot_questions": s.cot_questions, "eval_questions": s.eval_questions,
                "sft_steps": s.sft_steps, "rl_steps": s.rl_steps}
    return replace(SCALES[s.scale], **{k: v for k, v in explicit.items() if v > 0})
