"""The data contracts: the small typed records that cross actor boundaries (driver -> rollout
actor -> driver -> learner) and tie the layers together. Plain dataclasses of lists and numbers,
no tensors, so Ray pickles them cheaply and every layer can import them without loading Ray,
vLLM or DeepSpeed (as torchtune's `dev/rl/datatypes` does).

    Example       one validated dataset row (rlkd.data)
    SamplingSpec  what to sample: n, length cap, temperature, seed, environment (driver -> rollout actor)
    Episodes      per-completion tool use of a multi-turn generation (rollout actor -> driver)
    Generation    what was sampled: token ids, logprobs, texts, loss masks (rollout actor -> driver)
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
    environment: EnvironmentSpec | None = None
    """Multi-turn episodes with tools instead of single completions; max_tokens is then each
    episode's budget, its model and tool tokens together."""


@dataclass(frozen=True)
class EnvironmentSpec:
    """Which environment answers tool calls, and its limits (rollout.environment & co)."""

    spec: str
    """A REGISTRY name, `pkg.module:Class` or `path/to/env.py:Class` (environments.load_environment)."""
    max_turns: int
    """Policy turns per episode at most; the last one's text is the answer."""
    timeout_s: float
    """A tool call that takes longer ends its episode (rlkd/tool_sandbox.py)."""
    tools: dict[str, list[str]] = field(default_factory=dict)
    """Each tool's name -> its parameter names (environments.tools_of, read by the driver)."""


@dataclass
class Episodes:
    """Per completion of a multi-turn generation, what its episode did ([P*n] each)."""

    turns: list[int] = field(default_factory=list)
    tool_calls: list[int] = field(default_factory=list)
    tool_errors: list[int] = field(default_factory=list)
    """Calls answered `error:` (the policy's mistake, or the tool's error message)."""
    failures: list[str] = field(default_factory=list)
    """Why a tool ended the episode (raised, hung, too long), or ""."""
    tool_tokens: list[int] = field(default_factory=list)

    @staticmethod
    def concat(parts: list[Episodes]) -> Episodes:
        return Episodes(*([x for p in parts for x in getattr(p, k)] for k in vars(Episodes())))

    def select(self, idx: list[int]) -> Episodes:
        return Episodes(*([getattr(self, k)[i] for i in idx] for k in vars(self)))


@dataclass
class Generation:
    """Completions of one `generate` call, prompt-major: prompt p's samples are [p*n, (p+1)*n)."""

    prompt_ids: list[list[int]]  # [P] ragged
    completion_ids: list[list[int]]  # [P*n] ragged
    logprobs: list[list[float]]  # [P*n] ragged: sampling logprob of each completion token
    texts: list[str]  # [P*n]
    truncated: list[bool]  # [P*n]: hit max_tokens before EOS
    seconds: float = 0.0
    # [P*n] ragged, or [] for single-turn: 1 on tokens the policy sampled, 0 on tool tokens
    # (their logprobs are 0.0 placeholders); loss, ratios and length statistics read only the 1s.
    loss_masks: list[list[int]] = field(default_factory=list)
    episodes: Episodes | None = None  # multi-turn only
    # [P*n]: the weights version that sampled each completion (the rollout actor's, counted in
    # learner steps), which rollout.max_staleness bounds; [] where no rollout actor sampled.
    policy_versions: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)

    def policy_tokens(self) -> list[int]:
        """Per completion, the tokens the policy sampled (all of them, single-turn)."""
        if not self.loss_masks:
            return [len(ids) for ids in self.completion_ids]
        return [sum(m) for m in self.loss_masks]

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
            loss_masks=_concat_masks([(g.loss_masks, g.completion_ids) for g in parts]),
            episodes=Episodes.concat([g.episodes for g in parts]) if any(g.episodes for g in parts) else None,
            policy_versions=[x for g in parts for x in g.policy_versions] if all(g.policy_versions for g in parts) else [],
        )


def _concat_masks(parts: list[tuple[list[list[int]], list[list[int]]]]) -> list[list[int]]:
    """Masks of concatenated parts; [] when no part has one, all-ones for a part without."""
    if not any(masks for masks, _ in parts):
        return []
    return [m for masks, ids in parts for m in (masks or [[1] * len(c) for c in ids])]


@dataclass
class TrainBatch:
    """One rollout batch, rows aligned: completion i continues prompt i."""

    prompt_ids: list[list[int]]  # [N] ragged
    completion_ids: list[list[int]]  # [N] ragged
    rollout_logprobs: list[list[float]]  # [N] ragged, vLLM's sampling logprobs
    advantages: list[float]  # [N]
    # [N] ragged, or [] when every completion token was sampled (single-turn): 0 on tool tokens.
    loss_masks: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, idx: list[int]) -> TrainBatch:
        return TrainBatch(*([column[i] for i in idx] if column else [] for column in vars(self).values()))


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
