"""The data contracts: the small typed records that cross actor boundaries (driver -> rollout
actor -> driver -> learner) and tie the layers together. Plain dataclasses of lists and numbers,
no tensors, so Ray pickles them cheaply and every layer can import them without loading Ray,
vLLM or DeepSpeed (as torchtune's `dev/rl/datatypes` does).

    Example       one validated dataset row (rlkd.data)
    SamplingSpec  what to sample: n, length cap, temperature, seed (driver -> rollout actor)
    Generation    what was sampled: token ids, logprobs, texts (rollout actor -> driver)
    TrainBatch    one GRPO/SFT batch, rows aligned (driver -> learner)
    DistillBatch  one distillation batch, with teacher logprobs (driver -> distillation learner)
    WeightUpdate  new weights for the CPU transports (learner -> rollout actor)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    id: str  # "<source>:<split>:<row index>", stable across runs and skip_bad_rows
    question: str
    answer: str  # gold final answer, as returned by gold_answer
    rationale: str  # the gold solution before '####', as the dataset's entry writes it


@dataclass
class SamplingSpec:
    n: int = 1
    """Completions per prompt."""
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """Per-call seed. Prompt j of the call gets its own stream, `prompt_seed(seed, j)`, and vLLM
    gives its i-th sample that seed + i: a call is reproducible, no two prompts (or steps) share a
    stream, and sharding over actors changes nothing."""
    first_prompt: int = 0
    """Index of this call's first prompt in the whole batch (set by `generate_sharded`)."""


@dataclass
class Generation:
    """Completions of one `generate` call, prompt-major: prompt p's samples are [p*n, (p+1)*n)."""

    prompt_ids: list[list[int]]  # [P] ragged
    completion_ids: list[list[int]]  # [P*n] ragged
    logprobs: list[list[float]]  # [P*n] ragged: sampling logprob of each completion token
    texts: list[str]  # [P*n]
    truncated: list[bool]  # [P*n]: hit max_tokens before EOS
    seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)

    @staticmethod
    def concat(parts: list[Generation]) -> Generation:
        """Gather shards in order; seconds is the slowest shard (they ran in parallel)."""
        return Generation(
            prompt_ids=[x for g in parts for x in g.prompt_ids],
            completion_ids=[x for g in parts for x in g.completion_ids],
            logprobs=[x for g in parts for x in g.logprobs],
            texts=[x for g in parts for x in g.texts],
            truncated=[x for g in parts for x in g.truncated],
            seconds=max((g.seconds for g in parts), default=0.0),
        )


@dataclass
class TrainBatch:
    """One rollout batch, rows aligned: completion i continues prompt i."""

    prompt_ids: list[list[int]]  # [N] ragged
    completion_ids: list[list[int]]  # [N] ragged
    rollout_logprobs: list[list[float]]  # [N] ragged, vLLM's sampling logprobs
    advantages: list[float]  # [N]

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, idx: list[int]) -> TrainBatch:
        return TrainBatch(*([field[i] for i in idx] for field in vars(self).values()))


@dataclass
class DistillBatch:
    """One distillation batch, rows aligned: completion i continues prompt i."""

    prompt_ids: list[list[int]]  # [N] ragged
    completion_ids: list[list[int]]  # [N] ragged: student samples, or reference solutions
    # [K][N] ragged: log p_k of each completion token, from vLLM teacher actors; [] when the
    # learner holds the teachers and reads them off its own teacher forward.
    teacher_logprobs: list[list[list[float]]]
    task_advantages: list[float]  # [N]: group advantages of rewards.funcs (0 when unused)
    sft_prompt_ids: list[list[int]] = field(default_factory=list)  # [N] or []: LM-term data
    sft_completion_ids: list[list[int]] = field(default_factory=list)
    # [N] ragged: the sampler's log q_S of each completion token (vLLM, or the learner's mixed
    # sampler); MiniLLM's reward and importance weights read it. [] for reference solutions.
    student_logprobs: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class WeightUpdate:
    """New policy weights for the CPU transports; exactly one of path/blob is set."""

    version: int
    path: str | None = None
    """safetensors file on shared memory of the rollout actor's node."""
    blob: bytes | None = field(default=None, repr=False)
    """safetensors bytes, for actors on other nodes."""
