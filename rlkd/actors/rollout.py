"""The rollout actor: a `vllm.LLM` that samples completions with per-token logprobs and takes
new weights in place.

Two weight transports share one entry point, `update_weights`:
- CPU (and cross-node fallback): the learner serialises its weights with safetensors, either to
  a file on node-local shared memory (`WeightUpdate.path`, no copy through Ray) or as bytes
  through Ray's object store (`WeightUpdate.blob`, one put for all actors). A function shipped
  with `collective_rpc` loads them in each vLLM worker with `reload_weights`; bytes, because
  vLLM's RPC serialiser turns tensors into lists.
- GPU: vLLM's NCCL weight-transfer engine. The learner drives the round trip through vLLM's
  `RayVLLMWeightSyncClient`, which calls the four `*_weight_*` methods below on every actor.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from dataclasses import replace

import psutil
import ray

# vLLM reads these at import time: a callable must be allowed through collective_rpc, and the
# CPU backend's default KV-cache reservation fails on small machines.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM keeps a core for its scheduler; rollout and learner phases alternate, so on small CPU
# machines the worker gets every core (1.6x tokens/s at batch 64 on 2 cores).
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

import vllm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from vllm.distributed.weight_transfer.base import (  # noqa: E402
    WeightTransferInitRequest,
    WeightTransferUpdateRequest,
)
from vllm.inputs import TokensPrompt  # noqa: E402

from rlkd.data import encode_prompt  # noqa: E402
from rlkd.episodes import run_episodes  # noqa: E402
from rlkd.tool_calls import TOOL_CALL_CLOSE  # noqa: E402
from rlkd.tool_sandbox import ToolSandbox  # noqa: E402
from rlkd.types import EnvironmentSpec, Episodes, Generation, SamplingSpec, WeightUpdate  # noqa: E402

SEED_BITS = 48  # streams seed + i of two prompts overlap with probability ~ 2n / 2**48
TURN_SEED_STRIDE = 1_000_000_007  # call-seed offset of each further turn of an episode (prime)


def prompt_seed(call_seed: int, index: int) -> int:
    """A well-mixed seed for prompt `index` of a call seeded `call_seed` (SplitMix64's finaliser):
    nearby call seeds (step s, s + 1) and nearby prompts give unrelated streams."""
    x = (call_seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> (64 - SEED_BITS)


def _load_weights_in_worker(worker, path: str | None, blob: bytes | None) -> int:
    """Runs inside each vLLM worker process (shipped by collective_rpc)."""
    from safetensors.torch import load, load_file

    state = load_file(path) if path is not None else load(blob)
    worker.reload_weights(weights_iterator=iter(state.items()))
    # A tied lm_head receives no weights of its own, so reload never re-processes it; on CPU it
    # would keep computing logits from a pre-packed copy of the old embedding.
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)
    return len(state)


def _die_with_process(worker, pid: int, create_time: float) -> None:
    """Runs inside each vLLM worker: when the rollout actor's process is gone (killed, OOM), kill
    this process too, or its engine (several GiB) would outlive it as an orphan."""

    def watch():
        while True:
            try:
                if psutil.Process(pid).create_time() != create_time:  # pid reused
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    if pid != os.getpid():  # in-process engine: it dies with the actor anyway
        threading.Thread(target=watch, daemon=True, name="rlkd-die-with-actor").start()


def _exit_when_engine_dies(engine_core, stopping: threading.Event) -> None:
    """vLLM's sync client waits forever for the outputs of an engine process that died
    mid-request: its liveness monitor marks the engine dead and stops the output thread without
    waking the waiter. A rollout actor without an engine is useless, so it exits; Ray restarts
    it and the driver's pending call fails (and is retried) instead of hanging."""
    resources = getattr(engine_core, "resources", None)
    if resources is None:  # in-process engine: nothing separate to die
        return
    # At interpreter exit vLLM's own exit hook shuts the engine down, which its monitor reports
    # as a death; exit hooks run last-registered first, so this one disarms the watchdog before
    # that, or a finished run (an evaluation that already wrote its results) would exit 1.
    atexit.register(stopping.set)

    def watch():
        while not stopping.wait(1.0):
            if resources.engine_dead and not stopping.is_set():
                print("rlkd: the vLLM engine process died; exiting so that Ray restarts this actor",
                      file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="rlkd-engine-watchdog").start()


class RolloutWorker:
    """Owns one vLLM engine. Plain class: `RolloutActor` is its Ray actor, eval uses it bare."""

    def __init__(
        self,
        model_path: str,
        *,
        max_model_len: int = 1024,
        dtype: str = "float32",
        enforce_eager: bool = True,
        kv_cache_gb: int = 2,
        gpu_memory_utilization: float = 0.4,
        tensor_parallel_size: int = 1,
        use_gpu: bool = False,
        seed: int = 0,
        logprobs_mode: str = "processed_logprobs",
        actor_index: int = 0,
        cpu_cores: list[int] | None = None,
    ):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        if cpu_cores and not use_gpu:  # the engine process inherits the binding
            os.sched_setaffinity(0, cpu_cores)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpu_cores))
        start = time.perf_counter()
        if use_gpu:
            extra = {"weight_transfer_config": {"backend": "nccl"}, "gpu_memory_utilization": gpu_memory_utilization}
        else:
            # A chunked prefill discards the token sampled for a partial prompt and rewinds the
            # request's seeded generator, which CPU generators cannot do ("CPU Generator does
            # not use offset"): seeded batches longer than the token budget would crash.
            extra = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}
        if tensor_parallel_size > 1:
            # Inside a placement group vLLM would pick its Ray executor and ask the group for
            # GPUs this actor already holds; its own processes use the actor's GPUs instead.
            extra["distributed_executor_backend"] = "mp"
        self.nccl_rank_offset = nccl_rank_offset(actor_index, tensor_parallel_size)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)  # the driver's, for encode_prompt
        self.llm = vllm.LLM(
            model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            # Training: the learner scores tokens under the same temperature-scaled distribution
            # that sampled them, so TIS compares like with like. Teacher confidence (task=cot)
            # asks for `raw_logprobs`, comparable across sampling temperatures.
            logprobs_mode=logprobs_mode,
            **extra,
        )
        me = psutil.Process()
        self.llm.collective_rpc(_die_with_process, args=(me.pid, me.create_time()))
        self._stopping = threading.Event()
        _exit_when_engine_dies(self.llm.llm_engine.engine_core, self._stopping)
        self.startup_seconds = time.perf_counter() - start
        self.version = 0  # of the weights loaded, in learner steps (0: the checkpoint started from)
        self._nccl_update_arrived = False
        self._sandbox: ToolSandbox | None = None

    def generate(self, prompts: list[str], spec: SamplingSpec, rows: list[dict] | None = None) -> Generation:
        """spec.n completions per prompt; with spec.environment, multi-turn episodes, whose
        environment's reset receives each prompt's dataset row."""
        if spec.environment is not None:
            return self._episodes(prompts, spec, rows if rows is not None else [{} for _ in prompts])
        greedy = spec.temperature == 0.0
        params = [vllm.SamplingParams(
            n=spec.n,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=1.0 if greedy else spec.top_p,
            seed=None if spec.seed is None else prompt_seed(spec.seed, spec.first_prompt + j),
            logprobs=0,
        ) for j in range(len(prompts))]
        start = time.perf_counter()
        outputs = self.llm.generate(token_prompts(self.tokenizer, prompts), params, use_tqdm=False)
        seconds = time.perf_counter() - start
        gen = Generation([], [], [], [], [], seconds)
        for out in outputs:
            gen.prompt_ids.append(list(out.prompt_token_ids))
            for c in out.outputs:
                ids = list(c.token_ids)
                gen.completion_ids.append(ids)
                gen.logprobs.append([step[t].logprob for t, step in zip(ids, c.logprobs, strict=True)])
                gen.texts.append(c.text)
                gen.truncated.append(c.finish_reason == "length")
        gen.policy_versions = [self.version] * len(gen.completion_ids)
        return gen

    def _episodes(self, prompts: list[str], spec: SamplingSpec, rows: list[dict]) -> Generation:
        """spec.n episodes per prompt, every active one batched into each turn's vLLM call.
        Each turn's context is the episode's token ids so far (rlkd/episodes.py keeps them as
        sampled), so vLLM's prefix cache serves its earlier turns. Episode j*n + i's first turn
        samples from the stream the single-turn path gives prompt j's sample i; turn t adds
        t * TURN_SEED_STRIDE to the call seed."""
        env: EnvironmentSpec = spec.environment
        if self._sandbox is None or self._sandbox.spec != env.spec:
            self.close_sandbox()
            self._sandbox = ToolSandbox(env.spec, timeout_s=env.timeout_s)
        n, greedy = spec.n, spec.temperature == 0.0
        turn = [0]

        def sample(indices: list[int], contexts: list[list[int]], budgets: list[int]):
            params = [vllm.SamplingParams(
                n=1, max_tokens=budget, temperature=spec.temperature, top_p=1.0 if greedy else spec.top_p,
                seed=None if spec.seed is None else prompt_seed(
                    spec.seed + turn[0] * TURN_SEED_STRIDE, spec.first_prompt + e // n) + e % n,
                stop=[TOOL_CALL_CLOSE], include_stop_str_in_output=True, logprobs=0,
            ) for e, budget in zip(indices, budgets, strict=True)]
            turn[0] += 1
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=c) for c in contexts], params, use_tqdm=False)
            return [(list(c.token_ids), [step[t].logprob for t, step in zip(c.token_ids, c.logprobs, strict=True)])
                    for c in (out.outputs[0] for out in outputs)]

        start = time.perf_counter()
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        episodes = run_episodes(sample, self.tokenizer, [p for p in prompt_ids for _ in range(n)],
                                [r for r in rows for _ in range(n)], self._sandbox, env.tools,
                                env.max_turns, spec.max_tokens)
        gen = Generation(
            # An environment's reset text joins the prompt; it is a function of the row, so a
            # group's episodes share it.
            prompt_ids=[episodes[j * n].prompt_ids for j in range(len(prompts))],
            completion_ids=[e.completion_ids for e in episodes],
            logprobs=[e.logprobs for e in episodes],
            texts=[self.tokenizer.decode(e.completion_ids, skip_special_tokens=True) for e in episodes],
            truncated=[e.truncated for e in episodes],
            seconds=time.perf_counter() - start,
            loss_masks=[e.loss_mask for e in episodes],
            episodes=Episodes([e.turns for e in episodes], [e.tool_calls for e in episodes],
                              [e.tool_errors for e in episodes], [e.failure for e in episodes],
                              [e.tool_tokens for e in episodes]),
            policy_versions=[self.version] * len(episodes),
        )
        return gen

    def close_sandbox(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
        self._sandbox = None

    def update_weights(self, update: WeightUpdate | WeightTransferUpdateRequest) -> int:
        """Load new weights; returns the version now loaded. NCCL requests come from vLLM's sync
        client (and `confirm_weights` then sets the version). Older weights than those loaded
        are an error: an update that arrives late must not silently roll the policy back."""
        if isinstance(update, WeightTransferUpdateRequest):
            self.llm.collective_rpc("update_weights", kwargs={"update_info": update.update_info})
        else:
            if update.version < self.version:
                raise RuntimeError(f"stale weight update: v{update.version} arrived after v{self.version}")
            self.llm.collective_rpc(_load_weights_in_worker, args=(update.path, update.blob))
            self.version = update.version
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        return self.version

    # The GPU transport: vLLM's RayVLLMWeightSyncClient calls these by name on every actor.
    def init_weight_transfer_engine(self, request: WeightTransferInitRequest) -> None:
        # vLLM's sync client sends every engine the same offset; independent engines each number
        # their workers from 0, so each takes its own block of ranks in the transfer group.
        info = {**request.init_info, "rank_offset": self.nccl_rank_offset}
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": info})

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self._nccl_update_arrived = True

    def confirm_weights(self, version: int) -> int:
        """After an NCCL broadcast of the learner's `version`: it must have arrived here."""
        if not self._nccl_update_arrived:
            raise RuntimeError(f"the NCCL weight update to v{version} never reached this rollout actor")
        if version < self.version:
            raise RuntimeError(f"stale weight update: v{version} arrived after v{self.version}")
        self._nccl_update_arrived, self.version = False, version
        self.llm.reset_prefix_cache()
        return self.version

    def shutdown(self) -> None:
        """Stop vLLM's engine processes; Ray's kill of this actor would orphan them."""
        self._stopping.set()
        self.close_sandbox()
        self.llm.llm_engine.engine_core.shutdown()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def ready(self) -> float:
        return self.startup_seconds

    def check_engine(self) -> None:
        """Raises if the vLLM engine is dead (its process killed) while this actor lives on."""
        self.llm.generate(["ping"], vllm.SamplingParams(max_tokens=1), use_tqdm=False)


RolloutActor = ray.remote(RolloutWorker)


def token_prompts(tokenizer, prompts: list[str]) -> list[TokensPrompt]:
    """vLLM gets token ids from `encode_prompt`, the tokenization SFT and the learner use."""
    return [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, p)) for p in prompts]


def nccl_rank_offset(actor_index: int, tensor_parallel_size: int) -> int:
    """First rank of rollout actor `actor_index`'s workers in the NCCL weight-transfer group:
    the learner sends as rank 0, actor i's tensor-parallel workers take the next block."""
    return 1 + actor_index * tensor_parallel_size


def nccl_world_size(num_actors: int, tensor_parallel_size: int) -> int:
    return 1 + num_actors * tensor_parallel_size


def shard(items: list, num_shards: int) -> list[list]:
    """Contiguous, near-equal shards; concatenating them restores the order."""
    size, extra = divmod(len(items), num_shards)
    out, start = [], 0
    for i in range(num_shards):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def generate_sharded(actors: list, prompts: list[str], spec: SamplingSpec,
                     rows: list[dict] | None = None) -> Generation:
    """Spread prompts (and their rows, for an environment) over the rollout actors and gather
    the completions in prompt order."""
    chunks = shard(prompts, len(actors))
    row_chunks = shard(rows, len(actors)) if rows is not None else [None] * len(actors)
    firsts = [spec.first_prompt + sum(map(len, chunks[:i])) for i in range(len(chunks))]
    parts = [
        actor.generate.remote(chunk, replace(spec, first_prompt=first), row_chunk)
        for actor, chunk, row_chunk, first in zip(actors, chunks, row_chunks, firsts, strict=True)
        if chunk
    ]
    return Generation.concat(ray.get(parts))
