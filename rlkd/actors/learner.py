"""The learner actor: a DeepSpeed engine that scores tokens, applies the GRPO loss, steps, and
exports its weights for the rollout actors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import psutil
import ray
import torch
from safetensors.torch import save, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.actors.weight_source import ExportSource, exported
from rlkd.config import REPO_ROOT, Config
from rlkd.hardware import resolve_learner_dtype, rollout_dtype
from rlkd.lora import ADAPTER_DIR, apply_lora
from rlkd.losses import POLICY_LOSSES, selective_log_softmax, sft_loss
from rlkd.packing import (
    MicroBatch,
    build_micro_batch,
    collate,
    collate_packed,
    enable_segment_attention,
    plan_micro_batches,
    score_micro_batch,
)
from rlkd.types import TrainBatch, WeightUpdate

DS_TAG = "deepspeed"  # DeepSpeed's folder inside a checkpoint: optimizer and scheduler state
TRAINER_STATE = "trainer_state.pt"  # present only in checkpoints that can be resumed
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def deepspeed_config(cfg: Config, micro_batches_per_step: int, bf16: bool) -> dict:
    path = Path(cfg.learner.deepspeed_config)
    path = path if path.is_absolute() else REPO_ROOT / path
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.learner.micro_batch_size
    ds["gradient_accumulation_steps"] = micro_batches_per_step
    ds["gradient_clipping"] = cfg.learner.max_grad_norm
    ds["bf16"] = {"enabled": bf16}
    return ds


def shard_rows(rows: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous share of a mini-batch; world_size divides len(rows)."""
    size = len(rows) // world_size
    return rows[rank * size:(rank + 1) * size]


class Learner:
    """Holds the trainable policy (and, when beta > 0, a frozen reference)."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500):
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.model_path = cfg, model_path
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and cfg.learner.cpu_cores:  # beside a rollout generating ahead
            os.sched_setaffinity(0, cfg.learner.cpu_cores)
            torch.set_num_threads(len(cfg.learner.cpu_cores))
        elif self.device.type == "cpu":
            # Rollout and learner phases alternate, so the learner may use every core; Ray would
            # otherwise pin it to OMP_NUM_THREADS=num_cpus.
            torch.set_num_threads(os.cpu_count())
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.compute_dtype, why = resolve_learner_dtype(cfg.learner.dtype.value)
        self.precision_note = f"{self.compute_dtype} ({why})"
        # autocast_bf16 keeps fp32 weights (DeepSpeed's master copy and AdamW state stay fp32)
        # and runs the matmuls in bf16; `bfloat16` stores the weights in bf16 (DeepSpeed bf16).
        self.autocast = torch.bfloat16 if self.compute_dtype == "autocast_bf16" else None
        self.load_dtype = torch.bfloat16 if self.compute_dtype == "bfloat16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.load_dtype)
        enable_segment_attention(model)
        if cfg.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.lora = cfg.learner.lora.rank > 0
        if self.lora:
            model = apply_lora(model, cfg.learner.lora, cfg.learner.gradient_checkpointing)
        self.reference = None  # with LoRA the reference is the base model, adapters off
        if cfg.grpo.beta > 0 and not self.lora:
            self.reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.load_dtype)
            enable_segment_attention(self.reference)
            self.reference.to(self.device).eval().requires_grad_(False)

        g = cfg.grpo
        self.rank, self.world_size = rank, world_size
        self.minibatch_size = g.group_size * g.prompts_per_step // g.mini_batches
        # Each rank trains on its 1/world_size of every mini-batch.
        micro_per_step = -(-self.minibatch_size // world_size // cfg.learner.micro_batch_size)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trained_note = (f"LoRA rank {cfg.learner.lora.rank}: {sum(p.numel() for p in trainable):,} of "
                             f"{sum(p.numel() for p in model.parameters()):,} parameters train") if self.lora else ""
        # fused: one vectorised kernel instead of separate passes over the fp32 state. On CPU it
        # took AdamW over 135M parameters from ~1.6 s to 0.06 s (BENCHMARKS.md, bench_learner).
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learner.lr,
                                      weight_decay=cfg.learner.weight_decay, fused=True)
        warmup = max(cfg.learner.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, micro_per_step, self.compute_dtype == "bfloat16"))
        self.micro_per_step = micro_per_step
        self.zero3 = self.engine.zero_optimization_stage() == 3
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        remove_stale_weight_dirs(shm)
        self.shm_dir = shm / f"rlkd-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.version = 0
        self.nccl = None

    # ---- scoring -------------------------------------------------------------------------

    def _plan(self, batch: TrainBatch, rows: list[int]) -> list[list[list[int]]]:
        return plan_micro_batches(batch.prompt_ids, batch.completion_ids, rows,
                                  self.cfg.learner.max_tokens_per_micro_batch, self.cfg.grpo.shared_prompt)

    def _score(self, model, mb: MicroBatch) -> torch.Tensor:
        """Token logprobs of mb's targets under the sampling temperature: [N]."""
        t = self.cfg.rollout.temperature
        return score_micro_batch(model, mb, t if t > 0 else 1.0, self.autocast)

    @torch.no_grad()
    def _frozen_logprobs(self, model, batch: TrainBatch, rows: list[int]) -> dict[int, torch.Tensor]:
        """Per-row completion logprobs under a frozen model, for `rows` only: {row: [T_row]}."""
        out = {}
        for units in self._plan(batch, rows):
            mb = build_micro_batch(batch.prompt_ids, batch.completion_ids, units)
            lp_BT = mb.to_BT(self._score(model, mb).float()).cpu()
            for b, r in enumerate(mb.rows):
                out[r] = lp_BT[b, :len(batch.completion_ids[r])]
        return out

    def _reference_logprobs(self, batch: TrainBatch, rows: list[int]) -> dict[int, torch.Tensor]:
        if self.reference is not None:
            return self._frozen_logprobs(self.reference, batch, rows)
        with self.engine.module.disable_adapter():  # LoRA: the base model is the reference
            return self._frozen_logprobs(self.engine.module, batch, rows)

    def _row_tensor(self, rows_values: list, like_BT: torch.Tensor) -> torch.Tensor:
        """Per-row value lists (completion-aligned) as a [B, T] tensor shaped like like_BT."""
        out_BT = torch.zeros(like_BT.shape)
        for b, values in enumerate(rows_values):
            out_BT[b, :len(values)] = torch.as_tensor(values, dtype=torch.float32)
        return out_BT.to(like_BT.device)

    def _zero_backward(self) -> None:
        """Add an exact zero to every gradient, so that a micro-step with no scored row still
        takes part in every rank's gradient reduction and the optimizer step (AdamW moves
        parameters on a zero gradient too, through its moments and weight decay).

        Alone, that needs no forward pass. With other ranks (ZeRO reduces gradient buckets in the
        order they become ready) or under ZeRO-3 (parameters are empty placeholders outside a
        forward), a one-token forward gives the same order as every real micro-step."""
        module = self.engine.module
        if self.world_size == 1 and not self.zero3:
            loss = torch.stack([p.sum() for p in module.parameters() if p.requires_grad]).sum()
        else:
            loss = module(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                          use_cache=False).logits.sum()
        self.engine.backward(loss * 0.0)

    def _all_reduce(self, values: list[float], op=None) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
        return t.tolist()

    # ---- the update ----------------------------------------------------------------------

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """ppo_epochs passes over the batch in mini_batches optimizer steps.

        Each rank trains on its contiguous share of every mini-batch (whole groups on-policy,
        when the ranks divide prompts_per_step). Rows whose advantage is exactly 0 are not scored
        when beta = 0: their surrogate is 0 * ratio, so their gradient is exactly 0, while the
        loss still counts them in its denominator and the optimizer still steps. Scored rows are
        packed into micro-batches of learner.max_tokens_per_micro_batch tokens, each group's
        prompt encoded once (grpo.shared_prompt).
        """
        g, start = self.cfg.grpo, time.perf_counter()
        self.engine.train()
        on_policy = g.ppo_epochs == 1 and g.mini_batches == 1
        scored = {i for i in range(len(batch))
                  if batch.completion_ids[i] and (g.beta > 0 or batch.advantages[i] != 0.0)}
        rng = torch.Generator().manual_seed(self.cfg.run.seed + self.version)
        orders = [list(range(len(batch))) if on_policy else torch.randperm(len(batch), generator=rng).tolist()
                  for _ in range(g.ppo_epochs)]
        minis = [order[m0:m0 + self.minibatch_size] for order in orders
                 for m0 in range(0, len(batch), self.minibatch_size)]
        mine = sorted({i for mini in minis for i in shard_rows(mini, self.rank, self.world_size)} & scored)
        # Off-policy epochs need the pre-update policy's logprobs, frozen before any step; both
        # frozen passes score only the rows this rank trains on.
        old = None if on_policy else self._frozen_logprobs(self.engine.module, batch, mine)
        ref = self._reference_logprobs(batch, mine) if g.beta > 0 else None
        sums: dict[str, float] = {"loss": 0.0}
        weight_total = 0.0
        skipped_before = self.engine.skipped_steps
        gas = self.engine.gradient_accumulation_steps()
        micro_steps = 0
        for mini in minis:
            denom = self._denominator(batch.select(mini))
            plans = self._plan(batch, [i for i in shard_rows(mini, self.rank, self.world_size) if i in scored])
            # Every rank runs as many micro-steps as the busiest one (gradient reduction is
            # collective), and one at least, so an all-zero-signal mini-batch still steps.
            n, = self._all_reduce([float(len(plans))], torch.distributed.ReduceOp.MAX)
            n = max(int(n), 1)
            for k in range(n):
                self.engine.set_gradient_accumulation_boundary(k == n - 1)
                if k < len(plans):
                    loss, metrics, share = self._micro_loss(batch, plans[k], old, ref, denom)
                    # DeepSpeed divides by gradient_accumulation_steps and averages over
                    # ranks; undo both, and weight each micro-batch by its share of the
                    # mini-batch's denominator so the step sees the exact aggregate.
                    self.engine.backward(loss * share * gas * self.world_size)
                    for key, v in metrics.items():
                        sums[key] = sums.get(key, 0.0) + v * share
                    sums["loss"] += loss.item() * share
                    weight_total += share
                else:
                    self._zero_backward()
                self.engine.step()
                micro_steps += 1
        sums, weight_total = self._sum_over_ranks(sums, weight_total)
        # The loss adds up to each mini-batch's aggregate (skipped rows add exactly 0); the other
        # metrics are means over the scored tokens.
        out = {f"train/{k}": v / max(weight_total, 1e-9) for k, v in sums.items() if k != "loss"}
        out["train/loss"] = sums["loss"] / (g.ppo_epochs * g.mini_batches)
        out["train/skipped_rows_frac"] = 1.0 - len(scored) / max(len(batch), 1)
        out["train/micro_batches"] = float(micro_steps)
        out["train/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        # DeepSpeed skips (and zeroes) an optimizer step whose gradient norm is NaN/inf.
        out["train/skipped_steps"] = float(self.engine.skipped_steps - skipped_before)
        out["time/learner_compute"] = time.perf_counter() - start
        self.version += 1
        return out

    def _micro_loss(self, batch: TrainBatch, units: list[list[int]], old, ref, denom: float):
        g = self.cfg.grpo
        mb = build_micro_batch(batch.prompt_ids, batch.completion_ids, units)
        logprobs_BT = mb.to_BT(self._score(self.engine.module, mb))
        mask_BT = mb.mask_BT().to(logprobs_BT.device)
        if batch.loss_masks:  # multi-turn: tool tokens are context, not actions
            mask_BT = mask_BT * self._row_tensor([batch.loss_masks[r] for r in mb.rows], logprobs_BT)
        loss, metrics = POLICY_LOSSES[g.loss.value](
            logprobs_BT,
            logprobs_BT.detach() if old is None else self._row_tensor([old[r] for r in mb.rows], logprobs_BT),
            torch.tensor([batch.advantages[r] for r in mb.rows], dtype=torch.float32, device=logprobs_BT.device),
            mask_BT,
            clip_low=g.clip_low, clip_high=g.clip_high, beta=g.beta,
            ref_logprobs_BT=None if ref is None else self._row_tensor([ref[r] for r in mb.rows], logprobs_BT),
            rollout_logprobs_BT=self._row_tensor([batch.rollout_logprobs[r] for r in mb.rows], logprobs_BT),
            tis_cap=g.tis_cap or None,
            loss_agg=g.loss_agg.value,
            max_len=self.cfg.rollout.max_new_tokens,
        )
        return loss, metrics, self._denominator(batch.select(mb.rows)) / denom

    def _nll_inputs(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Untempered token logprobs for SFT, padded or packed rows: [B, L-1]."""
        ids_BL = t["input_ids_BL"].to(self.device)
        if "position_ids_BL" in t:
            # Without a KV cache transformers reads sequence boundaries off the position ids.
            out = self.engine.module(input_ids=ids_BL, position_ids=t["position_ids_BL"].to(self.device),
                                     use_cache=False)
        else:
            out = self.engine.module(input_ids=ids_BL, attention_mask=t["attn_BL"].to(self.device), use_cache=False)
        return selective_log_softmax(out.logits[:, :-1], ids_BL[:, 1:])

    def _sft_micro_batches(self, batch: TrainBatch, pack_len: int) -> list[dict[str, torch.Tensor]]:
        mbs = self.cfg.learner.micro_batch_size
        if pack_len:
            t = collate_packed(batch, pack_len)
            return [{k: v[i:i + mbs] for k, v in t.items()} for i in range(0, len(t["input_ids_BL"]), mbs)]
        return [collate(batch.select(list(range(i, min(i + mbs, len(batch))))))
                for i in range(0, len(batch), mbs)]

    def sft_step(self, batch: TrainBatch, pack_len: int = 0) -> dict[str, float]:
        """One optimizer step of token-mean NLL over every completion token of `batch`
        (prompt tokens masked); `pack_len` > 0 packs sequences into rows of that length."""
        start = time.perf_counter()
        self.engine.train()
        micro = self._sft_micro_batches(batch, pack_len)
        total = sum(float(t["mask_BT"].sum()) for t in micro)
        gas = self.engine.gradient_accumulation_steps()
        nll = 0.0
        for i, t in enumerate(micro):
            # The number of micro-batches varies with packing, so the step boundary is explicit.
            self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            mask_BT = t["mask_BT"].to(self.device)
            loss, _ = sft_loss(self._nll_inputs(t), mask_BT)
            share = float(mask_BT.sum()) / max(total, 1.0)
            # DeepSpeed divides by gradient_accumulation_steps; weight by token share instead.
            self.engine.backward(loss * share * gas)
            self.engine.step()
            nll += loss.item() * share
        self.version += 1
        return {"train/loss": nll, "train/tokens": total, "train/rows": float(sum(len(t["mask_BT"]) for t in micro)),
                "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "train/lr": self.scheduler.get_last_lr()[0],
                "time/learner_compute": time.perf_counter() - start}

    @torch.no_grad()
    def eval_loss(self, batch: TrainBatch) -> float:
        """Token-mean NLL of the completions in `batch` under the current weights."""
        self.engine.eval()
        nll = tokens = 0.0
        for t in self._sft_micro_batches(batch, 0):
            mask_BT = t["mask_BT"].to(self.device)
            nll += float((-self._nll_inputs(t) * mask_BT).sum())
            tokens += float(mask_BT.sum())
        return nll / max(tokens, 1.0)

    def _sum_over_ranks(self, sums: dict[str, float], weight: float) -> tuple[dict[str, float], float]:
        """Share-weighted metric sums of all ranks, so every rank reports the global step."""
        if self.world_size == 1:
            return sums, weight
        # A rank that scored no row (all zero-signal) has no loss metrics: agree on the keys.
        every = [None] * self.world_size
        torch.distributed.all_gather_object(every, sorted(sums))
        keys = sorted({k for ks in every for k in ks})
        packed = torch.tensor([weight, *(sums.get(k, 0.0) for k in keys)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(packed)
        return dict(zip(keys, packed[1:].tolist(), strict=True)), packed[0].item()

    def _denominator(self, batch: TrainBatch) -> float:
        """What the loss aggregation divides by: sampled tokens (tool tokens are not) for
        token_mean, sequences otherwise."""
        sampled = [sum(m) for m in batch.loss_masks] if batch.loss_masks else [len(c) for c in batch.completion_ids]
        if self.cfg.grpo.loss_agg.value == "token_mean":
            return float(sum(sampled))
        return float(sum(1 for n in sampled if n))

    # ---- weights out ---------------------------------------------------------------------

    def _named_weights(self) -> dict[str, torch.Tensor]:
        """The plain model's parameters (LoRA merged, ZeRO-3 gathered: a collective then). A
        tied lm_head is exported once, as embed_tokens, and vLLM re-ties it."""
        dtype = DTYPES[rollout_dtype(self.cfg)]
        return {n: t.to("cpu", dtype) for names, tensors in exported(self.engine.module, self.zero3)
                for n, t in zip(names, tensors, strict=True)}

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapters under PEFT's parameter names, for its save_pretrained (collective under
        ZeRO-3)."""
        lora = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in lora]) if self.zero3 else nullcontext():
            return {n: p.detach().to("cpu").clone() for n, p in lora}

    def export_weights(self, transport: str) -> WeightUpdate | None:
        """`shm`: a safetensors file on this node's shared memory; `bytes`: the same as bytes,
        returned once into Ray's object store for actors on other nodes. Rank 0 exports; the
        other ranks return None, after joining ZeRO-3's parameter gather."""
        if self.rank != 0:
            if self.zero3:
                self._named_weights()
            return None
        weights = self._named_weights()
        if transport == "bytes":
            return WeightUpdate(version=self.version, blob=save(weights))
        self.shm_dir.mkdir(parents=True, exist_ok=True)
        final = self.shm_dir / f"v{self.version}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file(weights, str(tmp))
        os.replace(tmp, final)
        for old in self.shm_dir.glob("v*.safetensors"):
            if old != final:
                old.unlink()
        return WeightUpdate(version=self.version, path=str(final))

    def init_nccl_sync(self, rollout_actors: list, master_port: int, world_size: int) -> None:
        """GPU transport: rank 0 joins vLLM's NCCL weight-transfer group as the sender; the other
        data-parallel ranks only take part in the ZeRO-3 gathers of each send."""
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        info = NCCLTrainerInitInfo(master_address=ray.util.get_node_ip_address(),
                                   master_port=master_port, world_size=world_size, rank=self.rank)
        self.nccl = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=RayVLLMWeightSyncClient(rollout_actors),
            source=ExportSource(self.engine.module, self.zero3))

    def send_weights_nccl(self) -> float:
        """Every rank calls this together: rank 0 broadcasts, the others join its gathers."""
        start = time.perf_counter()
        self.nccl.send_weights()
        return time.perf_counter() - start

    def save_checkpoint(self, path: str, trainer_state: dict | None = None) -> str | None:
        """HF checkpoint (weights + tokenizer) written to a temp dir and renamed into place, so
        a kill mid-write never leaves a checkpoint that looks complete. With `trainer_state`
        (the driver's step, data cursor and RNG) it also holds DeepSpeed's optimizer and
        scheduler state and this learner's RNG: everything `load_checkpoint` needs to resume.
        Every rank calls it (DeepSpeed's state save is collective); rank 0 writes the rest."""
        final = Path(path)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.world_size > 1:
            torch.distributed.barrier()
        if trainer_state is not None:
            self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
            if self.rank == 0:
                learner = {"version": self.version, "torch_rng": torch.get_rng_state(),
                           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
                torch.save({**trainer_state, "learner": learner}, tmp / TRAINER_STATE)
        weights = adapter = None
        if self.zero3 or self.rank == 0:  # ZeRO-3's gathers are collective: every rank joins
            weights = self._named_weights() if self.zero3 or self.lora else None
            adapter = self._adapter_state() if self.lora else None
        if self.rank != 0:
            return None
        if self.lora:  # a plain HF checkpoint of the merged weights, and the adapter alone
            self.engine.module.get_base_model().save_pretrained(tmp, state_dict=weights)
            self.engine.module.save_pretrained(tmp / ADAPTER_DIR, state_dict=adapter)
        else:
            self.engine.module.save_pretrained(tmp, state_dict=weights)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(tmp)
        gen_cfg = Path(self.model_path) / "generation_config.json"
        if gen_cfg.exists():
            shutil.copy(gen_cfg, tmp / "generation_config.json")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return str(final)

    def load_checkpoint(self, path: str) -> dict:
        """Restore weights, optimizer, scheduler and RNG from `save_checkpoint(path, state)`;
        returns the driver's part of the state."""
        self.engine.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        state = torch.load(Path(path) / TRAINER_STATE, weights_only=False)
        learner = state.pop("learner")
        self.version = learner["version"]
        torch.set_rng_state(learner["torch_rng"])
        if learner["cuda_rng"]:
            torch.cuda.set_rng_state_all(learner["cuda_rng"])
        return state

    def steps_done(self) -> int:
        """Training steps applied since the start of the run (resumes included)."""
        return self.version

    def precision(self) -> str:
        """The compute precision and why it was chosen (and what LoRA trains), for the driver
        to print."""
        return "; ".join(filter(None, [self.precision_note, self.trained_note]))

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        shutil.rmtree(self.shm_dir, ignore_errors=True)


def remove_stale_weight_dirs(shm: Path) -> None:
    """Delete weight-sync dirs left by learners that died without `close` (SIGKILL, OOM)."""
    for path in shm.glob("rlkd-weights-*-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


LearnerActor = ray.remote(Learner)
