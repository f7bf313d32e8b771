"""The distillation learner: the GRPO learner plus frozen in-process teachers and `distill_step`.

The teachers load here only when an objective needs their full next-token distributions
(single-step KL, GKD, forward KL, teacher-mixed sampling): those [B, T, V] logits are used where
they are computed and never cross Ray (see `rlkd.teacher`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.config import Config, DistillObjective, TeacherWeighting
from rlkd.distill_losses import (
    forward_kl_loss,
    generalized_jsd_loss,
    minillm_loss,
    minillm_token_rewards,
    mix_teachers,
    mixed_next_token_logprobs,
    teacher_confidence_weights,
    teacher_mixed_weights,
    whiten,
)
from rlkd.learner import Learner, TrainBatch, collate
from rlkd.losses import selective_log_softmax, sft_loss
from rlkd.rollout import Generation


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

    def __len__(self) -> int:
        return len(self.completion_ids)


def needs_learner_teachers(cfg: Config) -> bool:
    """Whether an objective needs the teachers' full distributions inside the learner."""
    d = cfg.distill
    return d.objective != DistillObjective.minillm or d.single_step or d.mix_alpha > 0


def _pad_rows(rows: list[list[float]], like_BT: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Ragged per-completion values placed at their target positions of a [B, T] tensor."""
    out = torch.zeros(like_BT.shape, dtype=torch.float32)
    for b, (row, start) in enumerate(zip(rows, offsets, strict=True)):
        out[b, start:start + len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(like_BT.device)


class DistillLearner(Learner):
    def __init__(self, cfg: Config, model_path: str, teacher_paths: list[str], vocab_size: int,
                 **kwargs):
        super().__init__(cfg, model_path, **kwargs)
        self.vocab_size = vocab_size
        self.teachers = []
        if needs_learner_teachers(cfg):
            for path in teacher_paths:
                teacher = AutoModelForCausalLM.from_pretrained(path, dtype=self.load_dtype)
                self.teachers.append(teacher.to(self.device).eval().requires_grad_(False))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    def _logits(self, model, ids_BL: torch.Tensor, attn_BL: torch.Tensor) -> torch.Tensor:
        """Next-token logits aligned with collate's targets, cut to the shared vocabulary."""
        return model(input_ids=ids_BL, attention_mask=attn_BL, use_cache=False).logits[:, :-1, :self.vocab_size]

    def _teacher_weights(self, teacher_lp_KBT: torch.Tensor, mask_BT: torch.Tensor):
        d = self.cfg.distill
        if d.teacher_weighting == TeacherWeighting.confidence:
            return teacher_confidence_weights(teacher_lp_KBT, mask_BT, d.confidence_temperature)
        w_K = torch.tensor(d.teacher_weights, dtype=torch.float32)
        w_KB = (w_K / w_K.sum())[:, None].expand(-1, mask_BT.shape[0]).to(mask_BT.device)
        return w_KB, {}

    # ---- the update ----------------------------------------------------------------------

    def distill_step(self, batch: DistillBatch) -> dict[str, float]:
        """One optimizer step on the batch's token-mean objective (micro-batched, exact)."""
        d, start = self.cfg.distill, time.perf_counter()
        self.engine.train()
        mbs = self.cfg.learner.micro_batch_size
        denom = max(sum(len(c) for c in batch.completion_ids), 1)
        sft_denom = max(sum(len(c) for c in batch.sft_completion_ids), 1)
        sums: dict[str, float] = {}
        minillm_rows = None
        if d.objective == DistillObjective.minillm:
            *minillm_rows, sums = self._minillm_returns(batch)
        for u0 in range(0, len(batch), mbs):
            idx = list(range(u0, min(u0 + mbs, len(batch))))
            loss, metrics = self._distill_loss(batch, idx, minillm_rows)
            share = sum(len(batch.completion_ids[i]) for i in idx) / denom
            total = loss * share
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * share
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * share
            if d.lm_coef and batch.sft_completion_ids:
                sft = TrainBatch([batch.sft_prompt_ids[i] for i in idx],
                                 [batch.sft_completion_ids[i] for i in idx],
                                 [[0.0] * len(batch.sft_completion_ids[i]) for i in idx], [0.0] * len(idx))
                t = collate(sft)
                ids_BL = t["input_ids_BL"].to(self.device)
                logprobs_BT = selective_log_softmax(
                    self._logits(self.engine.module, ids_BL, t["attn_BL"].to(self.device)), ids_BL[:, 1:])
                lm, lm_metrics = sft_loss(logprobs_BT, t["mask_BT"].to(self.device))
                sft_share = sum(len(c) for c in sft.completion_ids) / sft_denom
                total = total + d.lm_coef * lm * sft_share
                sums["lm_nll"] = sums.get("lm_nll", 0.0) + lm_metrics["nll"] * sft_share
            # DeepSpeed divides by gradient_accumulation_steps; undo it (see Learner.train_step).
            self.engine.backward(total * self.micro_per_step)
            self.engine.step()
        out = {f"train/{k}": v for k, v in sums.items()}
        out["train/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        out["time/learner_compute"] = time.perf_counter() - start
        self.version += 1
        return out

    def _rows(self, prompt_ids, completion_ids):
        """collate()'d rows on the device: ids_BL, attn_BL, mask_BT and each row's first target."""
        t = collate(TrainBatch(prompt_ids, completion_ids, [[0.0] * len(c) for c in completion_ids],
                               [0.0] * len(completion_ids)))
        offsets = [len(p) - 1 for p in prompt_ids]
        return (t["input_ids_BL"].to(self.device), t["attn_BL"].to(self.device),
                t["mask_BT"].to(self.device), offsets)

    def _select(self, batch: DistillBatch, idx: list[int]):
        return self._rows([batch.prompt_ids[i] for i in idx], [batch.completion_ids[i] for i in idx])

    @torch.no_grad()
    def _teacher_target(self, ids_BL, attn_BL, mask_BT):
        """The in-process teachers' (mixed) next-token log-distribution [B, T, V]."""
        log_p_KBTV = torch.stack([torch.log_softmax(self._logits(m, ids_BL, attn_BL).float(), -1)
                                  for m in self.teachers])
        if len(self.teachers) == 1:
            return log_p_KBTV[0], {}
        tokens_KBT = log_p_KBTV.gather(-1, ids_BL[None, :, 1:, None].expand(
            len(self.teachers), -1, -1, 1)).squeeze(-1)
        w_KB, metrics = self._teacher_weights(tokens_KBT, mask_BT)
        return mix_teachers(log_p_KBTV, w_KB), metrics

    @torch.no_grad()
    def _minillm_returns(self, batch: DistillBatch):
        """Returns R of every row from the pre-update student, whitened over the whole batch
        (so micro-batching cannot change them), and the teachers' sampled-token logprobs."""
        d, mbs = self.cfg.distill, self.cfg.learner.micro_batch_size
        returns, teacher_lps, sums = [], [], {}
        tokens = max(sum(len(c) for c in batch.completion_ids), 1)
        for u0 in range(0, len(batch), mbs):
            idx = list(range(u0, min(u0 + mbs, len(batch))))
            ids_BL, attn_BL, mask_BT, offsets = self._select(batch, idx)
            lp_BT = selective_log_softmax(self._logits(self.engine.module, ids_BL, attn_BL), ids_BL[:, 1:])
            if batch.teacher_logprobs:
                tlp_KBT = torch.stack([_pad_rows([scores[i] for i in idx], lp_BT, offsets)
                                       for scores in batch.teacher_logprobs])
            else:
                tlp_KBT = torch.stack([selective_log_softmax(self._logits(m, ids_BL, attn_BL), ids_BL[:, 1:])
                                       for m in self.teachers])
            w_KB, metrics = self._teacher_weights(tlp_KBT, mask_BT)
            tlp_BT = mix_teachers(tlp_KBT, w_KB)
            r_BT, r_metrics = minillm_token_rewards(lp_BT, tlp_BT, mask_BT, gamma=d.gamma,
                                                    length_norm=d.length_norm, from_next=d.single_step)
            for b, (i, off) in enumerate(zip(idx, offsets, strict=True)):
                n = len(batch.completion_ids[i])
                returns.append(r_BT[b, off:off + n].cpu())
                teacher_lps.append(tlp_BT[b, off:off + n].cpu())
            share = sum(len(batch.completion_ids[i]) for i in idx) / tokens
            for k, v in {**metrics, **r_metrics}.items():
                sums[k] = sums.get(k, 0.0) + v * share
        if d.whiten:
            width = max((len(r) for r in returns), default=0)
            padded_NT = torch.zeros(len(returns), width, dtype=torch.float64)
            mask_NT = torch.zeros(len(returns), width, dtype=torch.bool)
            for i, r in enumerate(returns):
                padded_NT[i, :len(r)], mask_NT[i, :len(r)] = r, True
            white_NT = whiten(padded_NT, mask_NT)
            returns = [white_NT[i, :len(r)] for i, r in enumerate(returns)]
        return returns, teacher_lps, sums

    def _distill_loss(self, batch: DistillBatch, idx: list[int], minillm_rows=None):
        d, g = self.cfg.distill, self.cfg.grpo
        ids_BL, attn_BL, mask_BT, offsets = self._select(batch, idx)
        logits_BTV = self._logits(self.engine.module, ids_BL, attn_BL)
        teacher_logits_BTV, metrics = None, {}
        if self.teachers and (d.objective != DistillObjective.minillm or d.single_step):
            teacher_logits_BTV, metrics = self._teacher_target(ids_BL, attn_BL, mask_BT)
        if d.objective == DistillObjective.gkd:
            loss, m = generalized_jsd_loss(logits_BTV, teacher_logits_BTV, mask_BT, d.jsd_beta, d.temperature)
            return loss, {**metrics, **m}
        if d.objective == DistillObjective.forward_kl:
            loss, m = forward_kl_loss(logits_BTV, teacher_logits_BTV, mask_BT, d.temperature)
            return loss, {**metrics, **m}
        logprobs_BT = selective_log_softmax(logits_BTV, ids_BL[:, 1:])
        returns, teacher_lps = minillm_rows
        returns_BT = _pad_rows([returns[i].tolist() for i in idx], logprobs_BT, offsets)
        weights_BT, mix_metrics = None, {}
        if d.mix_alpha > 0:
            teacher_lp_BT = _pad_rows([teacher_lps[i].tolist() for i in idx], logprobs_BT, offsets)
            weights_BT, mix_metrics = teacher_mixed_weights(logprobs_BT.detach(), teacher_lp_BT,
                                                            mask_BT, d.mix_alpha)
        loss, m = minillm_loss(
            logprobs_BT, logprobs_BT.detach(), returns_BT, mask_BT,
            clip_low=g.clip_low, clip_high=g.clip_high, weights_BT=weights_BT,
            student_logits_BTV=logits_BTV if teacher_logits_BTV is not None else None,
            teacher_logits_BTV=teacher_logits_BTV,
            single_step_coef=d.single_step_coef,
            task_advantages_B=torch.tensor([batch.task_advantages[i] for i in idx], device=self.device),
            task_coef=d.task_coef)
        return loss, {**mix_metrics, **m}  # teacher weights were logged by _minillm_returns

    # ---- teacher scoring and mixed sampling ------------------------------------------------

    @torch.no_grad()
    def teacher_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
                         ) -> list[list[list[float]]]:
        """log p_k of every completion token for each in-process teacher: [K][N] ragged."""
        out: list[list[list[float]]] = [[] for _ in self.teachers]
        mbs = self.cfg.learner.micro_batch_size
        for u0 in range(0, len(prompt_ids), mbs):
            p, c = prompt_ids[u0:u0 + mbs], completion_ids[u0:u0 + mbs]
            t = collate(TrainBatch(p, c, [[0.0] * len(x) for x in c], [0.0] * len(c)))
            ids_BL, attn_BL = t["input_ids_BL"].to(self.device), t["attn_BL"].to(self.device)
            for k, teacher in enumerate(self.teachers):
                lp_BT = selective_log_softmax(self._logits(teacher, ids_BL, attn_BL), ids_BL[:, 1:]).cpu()
                out[k] += [lp_BT[b, len(pb) - 1:len(pb) - 1 + len(cb)].tolist()
                           for b, (pb, cb) in enumerate(zip(p, c, strict=True))]
        return out

    @torch.no_grad()
    def sample_mixed(self, prompt_ids: list[list[int]], n: int, max_tokens: int, seed: int) -> Generation:
        """MiniLLM teacher-mixed sampling: each token from alpha p_T + (1 - alpha) q_S.

        Runs with transformers on the learner because vLLM's sampler cannot consult a second
        model per token. The n samples of a prompt share its length, so each prompt is one
        unpadded batch with a KV cache per model. Logprobs returned are the student's.
        """
        alpha, eos = self.cfg.distill.mix_alpha, self.tokenizer.eos_token_id
        gen_rng = torch.Generator(device=self.device).manual_seed(seed)
        w_K = torch.tensor(self.cfg.distill.teacher_weights, dtype=torch.float32, device=self.device)
        w_KB = (w_K / w_K.sum())[:, None].expand(-1, n)
        student = self.engine.module
        student.eval()
        start = time.perf_counter()
        gen = Generation([], [], [], [], [], 0.0)
        for prompt in prompt_ids:
            ids_BL = torch.tensor([prompt] * n, device=self.device)
            caches = [None] * (1 + len(self.teachers))
            models = [student, *self.teachers]
            done_B = torch.zeros(n, dtype=torch.bool, device=self.device)
            tokens, logps = [], []
            step_ids = ids_BL
            for _ in range(max_tokens):
                logits = []
                for k, model in enumerate(models):
                    out = model(input_ids=step_ids, past_key_values=caches[k], use_cache=True)
                    caches[k] = out.past_key_values
                    logits.append(out.logits[:, -1, :self.vocab_size].float())
                # Confidence weights need the finished sequence, so sampling mixes with the fixed ones.
                teacher_logits = mix_teachers(torch.stack([torch.log_softmax(x, -1) for x in logits[1:]]),
                                              w_KB)
                log_mix_BV = mixed_next_token_logprobs(logits[0], teacher_logits, alpha)
                next_B = torch.multinomial(log_mix_BV.exp(), 1, generator=gen_rng).squeeze(-1)
                next_B = torch.where(done_B, torch.full_like(next_B, eos), next_B)
                logps.append(torch.log_softmax(logits[0], -1).gather(-1, next_B[:, None]).squeeze(-1))
                tokens.append(next_B)
                done_B |= next_B == eos
                if done_B.all():
                    break
                step_ids = next_B[:, None]
            tok_BT, lp_BT = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
            gen.prompt_ids.append(prompt)
            for row, lps in zip(tok_BT, lp_BT, strict=True):
                length = row.index(eos) + 1 if eos in row else len(row)
                gen.completion_ids.append(row[:length])
                gen.logprobs.append(lps[:length])
                gen.texts.append(self.tokenizer.decode(row[:length], skip_special_tokens=True))
                gen.truncated.append(eos not in row)
        student.train()
        gen.seconds = time.perf_counter() - start
        return gen


DistillLearnerActor = ray.remote(DistillLearner)
