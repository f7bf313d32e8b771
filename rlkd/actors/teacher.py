"""Teachers: the vLLM scoring actor, and the shared-vocabulary check run before anything starts.

Where the teacher runs depends on what the objective needs from it:
- MiniLLM's reward needs only log p_T(y_t) of the tokens the student sampled. `TeacherActor`
  gets them from vLLM's prompt logprobs: one prefill per sequence, [N, T] floats back through
  Ray (~40 KB for 16 sequences of 300 tokens), on any node or GPU, with vLLM's batching.
- The full-vocabulary terms (MiniLLM's single-step KL, GKD's JSD, forward KL) need p_T(.) at
  every position: 16 x 300 x 49k floats is ~1 GB per step, too much to ship through Ray. For
  those the frozen teacher lives inside the learner process (`rlkd.actors.distill_learner`), like
  GRPO's reference model, and its logits never leave it.
Teachers never train. Teacher and student must share one tokenizer; checkpoints whose
embedding matrices are padded to different sizes are fine, logits are cut to the shared size.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
from transformers import AutoConfig, AutoTokenizer

from rlkd.errors import InputError

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

import vllm  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402


class VocabMismatchError(InputError):
    """Teacher and student tokenize differently; the message names both checkpoints."""


def shared_vocab_size(student: str | Path, teachers: list[str | Path]) -> int:
    """Check every teacher tokenizes like the student; return the logit width they share.

    Same tokens with the same ids and the same special tokens is required: a token-level
    divergence between different vocabularies compares unrelated distributions. The shared
    width is the smallest `vocab_size` among the models (embedding padding differs by model).
    """
    ref = AutoTokenizer.from_pretrained(student)
    ref_vocab = ref.get_vocab()
    sizes = [AutoConfig.from_pretrained(student).vocab_size]
    for teacher in teachers:
        tok = AutoTokenizer.from_pretrained(teacher)
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            differ = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=lambda kv: kv[1])
            example = differ[0][0] if differ else "?"
            raise VocabMismatchError(
                f"teacher {teacher} and student {student} have different vocabularies "
                f"({len(vocab)} vs {len(ref_vocab)} tokens, {len(differ)} (token, id) pairs "
                f"differ, e.g. {example!r}); distillation needs one shared tokenizer"
            )
        if tok.eos_token != ref.eos_token:
            raise VocabMismatchError(
                f"teacher {teacher} ends turns with {tok.eos_token!r} but student {student} "
                f"with {ref.eos_token!r}; distillation needs one shared tokenizer"
            )
        sizes.append(AutoConfig.from_pretrained(teacher).vocab_size)
    if min(sizes) < len(ref_vocab):
        raise VocabMismatchError(
            f"a model's vocab_size {min(sizes)} is smaller than its tokenizer ({len(ref_vocab)} tokens)"
        )
    return min(sizes)


class TeacherWorker:
    """A frozen vLLM engine that returns log p_T of given tokens (prompt logprobs)."""

    def __init__(self, model_path: str, *, max_model_len: int = 1024, dtype: str = "float32",
                 enforce_eager: bool = True, kv_cache_gb: int = 2, use_gpu: bool = False,
                 gpu_memory_utilization: float = 0.4):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        start = time.perf_counter()
        extra = {"gpu_memory_utilization": gpu_memory_utilization} if use_gpu else {}
        # Prompt logprobs are computed in prefill; a cached prefix would skip its positions.
        self.llm = vllm.LLM(model_path, dtype=dtype, max_model_len=max_model_len,
                            enforce_eager=enforce_eager, enable_prefix_caching=False, **extra)
        self.startup_seconds = time.perf_counter() - start

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """log p_T(c_t | prompt, c_<t) for every completion token; rows align with the inputs."""
        rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
        params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params,
                                    use_tqdm=False)
        scores = []
        for out, p, c in zip(outputs, prompt_ids, completion_ids, strict=True):
            # prompt_logprobs[i] is the distribution over token i given tokens < i (None at 0).
            steps = out.prompt_logprobs[len(p):len(p) + len(c)]
            scores.append([step[tok].logprob for tok, step in zip(c, steps, strict=True)])
        return scores

    def ready(self) -> float:
        return self.startup_seconds

    def shutdown(self) -> None:
        """Stop vLLM's engine processes; Ray's kill of this actor would orphan them."""
        self.llm.llm_engine.engine_core.shutdown()


TeacherActor = ray.remote(TeacherWorker)
