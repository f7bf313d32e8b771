"""The distillation learner: the GRPO learner plus frozen in-process teachers and `distill_step`.

The teachers load here only when an objective needs their full next-token distributions
(single-step KL, GKD, forward KL, teacher-mixed sampling): those [N, V] logits are used where
they are computed and never cross Ray (see `rlkd.actors.teacher`). Rows are packed into token-budget
micro-batches with shared prompts (`rlkd.packing`), like the GRPO learner's.
"""

from __future__ import annotations

import time

import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.actors.learner import Learner
from rlkd.config import Config
from rlkd.config_distill import DistillObjective, TeacherWeighting
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
from rlkd.losses import selective_log_softmax, sft_loss
from rlkd.packing import (
    MicroBatch,
    build_micro_batch,
    enable_segment_attention,
    micro_batch_logits,
    plan_micro_batches,
)
from rlkd.types import DistillBatch, Generation


def needs_learner_teachers(cfg: Config) -> bool:
    """Whether an objective needs the teachers' full distributions inside the learner."""
    d = cfg.distill
    return d.objective != DistillObjective.minillm or d.single_step or d.mix_alpha > 0


class DistillLearner(Learner):
    def __init__(self, cfg: Config, model_path: str, teacher_paths: list[str], vocab_size: int,
                 **kwargs):
        super().__init__(cfg, model_path, **kwargs)
        self.vocab_size = vocab_size
        self.teachers = []
        if needs_learner_teachers(cfg):
            for path in teacher_paths:
                teacher = AutoModelForCausalLM.from_pretrained(path, dtype=self.load_dtype)
                enable_segment_attention(teacher)
                self.teachers.append(teacher.to(self.device).eval().requires_grad_(False))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    def _logits(self, model, mb: MicroBatch) -> torch.Tensor:
        """Next-token logits at mb's scored positions, cut to the shared vocabulary: [N, V]."""
        return micro_batch_logits(model, mb, self.autocast)[:, :self.vocab_size]

    def _plan(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[MicroBatch]:
        """Every non-empty row, packed into token-budget micro-batches with shared prompts."""
        plans = plan_micro_batches(prompt_ids, completion_ids, list(range(len(completion_ids))),
                                   self.cfg.learner.max_tokens_per_micro_batch, self.cfg.grpo.shared_prompt)
        return [build_micro_batch(prompt_ids, completion_ids, units) for units in plans]

    def _teacher_weights(self, teacher_lp_KBT: torch.Tensor, mask_BT: torch.Tensor):
        d = self.cfg.distill
        if d.teacher_weighting == TeacherWeighting.confidence:
            return teacher_confidence_weights(teacher_lp_KBT, mask_BT, d.confidence_temperature)
        w_K = torch.tensor(d.teacher_weights, dtype=torch.float32)
        w_KB = (w_K / w_K.sum())[:, None].expand(-1, mask_BT.shape[0]).to(mask_BT.device)
        return w_KB, {}

    @torch.no_grad()
    def _teacher_pass(self, mb: MicroBatch):
        """The in-process teachers on one micro-batch: the (mixed) log-distribution at every
        scored position [N, V], its sampled-token logprobs [N] and the weighting's metrics."""
        log_p_KNV = torch.stack([torch.log_softmax(self._logits(m, mb).float(), -1) for m in self.teachers])
        targets_N = mb.target_ids_N.to(log_p_KNV.device)
        if len(self.teachers) == 1:
            log_p_NV, metrics = log_p_KNV[0], {}
        else:
            tokens_KN = log_p_KNV.gather(-1, targets_N[None, :, None].expand(len(self.teachers), -1, 1))[..., 0]
            mask_BT = mb.mask_BT().to(log_p_KNV.device)
            w_KB, metrics = self._teacher_weights(torch.stack([mb.to_BT(x) for x in tokens_KN]), mask_BT)
            log_p_NV = mix_teachers(log_p_KNV, w_KB[:, mb.row_N.to(w_KB.device)])
        return log_p_NV, log_p_NV.gather(-1, targets_N[:, None])[:, 0], metrics

    # ---- the update ----------------------------------------------------------------------

    def distill_step(self, batch: DistillBatch) -> dict[str, float]:
        """One optimizer step on the batch's token-mean objective over packed micro-batches.

        MiniLLM's returns need the teachers' logprobs of the whole batch before any update (the
        reward-to-go runs to the end of each completion, and the returns are whitened over the
        batch). They come from vLLM teacher actors, or from one no-grad pass of the in-process
        teachers, which also keeps their full distributions for the single-step term while
        those fit in distill.teacher_cache_gb. The student's side of the reward is the sampler's
        own logprobs, so the student runs once per micro-batch, with grad, and the sampler-vs-
        learner mismatch is corrected by GRPO's truncated importance weights (grpo.tis_cap).
        """
        d, start = self.cfg.distill, time.perf_counter()
        self.engine.train()
        mbs = self._plan(batch.prompt_ids, batch.completion_ids)
        denom = max(sum(len(c) for c in batch.completion_ids), 1)
        sums: dict[str, float] = {}
        minillm_rows, cached = None, [None] * len(mbs)
        if d.objective == DistillObjective.minillm:
            *minillm_rows, cached, sums = self._minillm_returns(batch, mbs)
        sums["loss"] = 0.0
        lm_mbs = self._plan(batch.sft_prompt_ids, batch.sft_completion_ids) if d.lm_coef else []
        lm_denom = max(sum(len(c) for c in batch.sft_completion_ids), 1)
        steps = [(mb, k) for k, mb in enumerate(mbs)] + [(mb, None) for mb in lm_mbs]
        gas = self.engine.gradient_accumulation_steps()
        for j, (mb, k) in enumerate(steps):
            self.engine.set_gradient_accumulation_boundary(j == len(steps) - 1)
            if k is None:  # MiniLLM's language-modelling term on reference solutions
                lp_1N = selective_log_softmax(self._logits(self.engine.module, mb),
                                              mb.target_ids_N.to(self.device))[None]
                lm, lm_metrics = sft_loss(lp_1N, torch.ones_like(lp_1N, dtype=torch.bool))
                share = len(mb.target_ids_N) / lm_denom
                total = d.lm_coef * lm * share
                sums["lm_nll"] = sums.get("lm_nll", 0.0) + lm_metrics["nll"] * share
            else:
                loss, metrics = self._distill_loss(batch, mb, minillm_rows, cached[k])
                share = len(mb.target_ids_N) / denom
                total = loss * share
                for key, v in metrics.items():
                    sums[key] = sums.get(key, 0.0) + v * share
                sums["loss"] += loss.item() * share
            # DeepSpeed divides by gradient_accumulation_steps; undo it (see Learner.train_step).
            self.engine.backward(total * gas)
            self.engine.step()
        if not steps:  # every completion empty: the optimizer still takes its (zero) step
            self.engine.set_gradient_accumulation_boundary(True)
            self._zero_backward()
            self.engine.step()
        out = {f"train/{k}": v for k, v in sums.items()}
        out["train/micro_batches"] = float(max(len(steps), 1))
        out["train/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        out["time/learner_compute"] = time.perf_counter() - start
        self.version += 1
        return out

    @torch.no_grad()
    def _minillm_returns(self, batch: DistillBatch, mbs: list[MicroBatch]):
        """Every row's returns R, whitened over the whole batch, from the teachers' and the
        sampler's logprobs; every row's (mixed) teacher logprobs; per micro-batch, the teachers'
        full log-distributions where the single-step term needs them and they fit the cache
        (None: recomputed in the loss pass)."""
        d = self.cfg.distill
        if len(batch.student_logprobs) != len(batch):
            raise ValueError(f"MiniLLM needs the sampler's logprobs of all {len(batch)} completions, "
                             f"got {len(batch.student_logprobs)}")
        budget = d.teacher_cache_gb * 2**30 if d.single_step else 0.0
        returns, teacher_lps = [torch.zeros(0)] * len(batch), [torch.zeros(0)] * len(batch)
        cached, sums = [None] * len(mbs), {}
        tokens = max(sum(len(c) for c in batch.completion_ids), 1)
        for k, mb in enumerate(mbs):
            mask_BT = mb.mask_BT().to(self.device)
            if batch.teacher_logprobs:
                tlp_KBT = torch.stack([self._row_tensor([scores[r] for r in mb.rows], mask_BT)
                                       for scores in batch.teacher_logprobs])
                w_KB, metrics = self._teacher_weights(tlp_KBT, mask_BT)
                tlp_BT = mix_teachers(tlp_KBT, w_KB)
            else:
                log_p_NV, tlp_N, metrics = self._teacher_pass(mb)
                tlp_BT = mb.to_BT(tlp_N)
                size = log_p_NV.numel() * log_p_NV.element_size()
                if size <= budget:
                    cached[k], budget = log_p_NV.cpu(), budget - size
            lp_BT = self._row_tensor([batch.student_logprobs[r] for r in mb.rows], mask_BT)
            r_BT, r_metrics = minillm_token_rewards(lp_BT, tlp_BT, mask_BT, gamma=d.gamma,
                                                    length_norm=d.length_norm, from_next=d.single_step)
            for b, r in enumerate(mb.rows):
                n = len(batch.completion_ids[r])
                returns[r], teacher_lps[r] = r_BT[b, :n].cpu(), tlp_BT[b, :n].cpu()
            share = len(mb.target_ids_N) / tokens
            for key, v in {**metrics, **r_metrics}.items():
                sums[key] = sums.get(key, 0.0) + v * share
        if d.whiten:
            width = max((len(r) for r in returns), default=0)
            padded_NT = torch.zeros(len(returns), width, dtype=torch.float64)
            mask_NT = torch.zeros(len(returns), width, dtype=torch.bool)
            for i, r in enumerate(returns):
                padded_NT[i, :len(r)], mask_NT[i, :len(r)] = r, True
            white_NT = whiten(padded_NT, mask_NT)
            returns = [white_NT[i, :len(r)] for i, r in enumerate(returns)]
        return returns, teacher_lps, cached, sums

    def _distill_loss(self, batch: DistillBatch, mb: MicroBatch, minillm_rows, cached_NV):
        d, g = self.cfg.distill, self.cfg.grpo
        logits_NV = self._logits(self.engine.module, mb)
        targets_N = mb.target_ids_N.to(self.device)
        teacher_NV = None
        if self.teachers and (d.objective != DistillObjective.minillm or d.single_step):
            teacher_NV = cached_NV.to(self.device) if cached_NV is not None else self._teacher_pass(mb)[0]
        if d.objective != DistillObjective.minillm:
            # Full-vocabulary token means: the micro-batch's scored positions form one row.
            ones_1N = torch.ones(1, len(targets_N), dtype=torch.bool, device=self.device)
            if d.objective == DistillObjective.gkd:
                return generalized_jsd_loss(logits_NV[None], teacher_NV[None], ones_1N, d.jsd_beta, d.temperature)
            return forward_kl_loss(logits_NV[None], teacher_NV[None], ones_1N, d.temperature)
        returns, teacher_lps = minillm_rows
        mask_BT = mb.mask_BT().to(self.device)
        logprobs_BT = mb.to_BT(selective_log_softmax(logits_NV, targets_N))
        weights_BT, mix_metrics = None, {}
        if d.mix_alpha > 0:
            teacher_lp_BT = self._row_tensor([teacher_lps[r] for r in mb.rows], mask_BT)
            weights_BT, mix_metrics = teacher_mixed_weights(logprobs_BT.detach(), teacher_lp_BT,
                                                            mask_BT, d.mix_alpha)
        loss, m = minillm_loss(
            logprobs_BT, logprobs_BT.detach(), self._row_tensor([returns[r] for r in mb.rows], mask_BT),
            mask_BT, clip_low=g.clip_low, clip_high=g.clip_high, weights_BT=weights_BT,
            rollout_logprobs_BT=self._row_tensor([batch.student_logprobs[r] for r in mb.rows], mask_BT),
            tis_cap=g.tis_cap or None,
            student_logits_NV=logits_NV if teacher_NV is not None else None,
            teacher_logits_NV=teacher_NV,
            single_step_coef=d.single_step_coef,
            task_advantages_B=torch.tensor([batch.task_advantages[r] for r in mb.rows], device=self.device),
            task_coef=d.task_coef)
        return loss, {**mix_metrics, **m}  # teacher weights were logged by _minillm_returns

    # ---- teacher scoring and mixed sampling ------------------------------------------------

    @torch.no_grad()
    def teacher_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
                         ) -> list[list[list[float]]]:
        """log p_k of every completion token for each in-process teacher: [K][N] ragged."""
        out: list[list[list[float]]] = [[[] for _ in completion_ids] for _ in self.teachers]
        for mb in self._plan(prompt_ids, completion_ids):
            targets_N = mb.target_ids_N.to(self.device)
            for k, teacher in enumerate(self.teachers):
                lp_BT = mb.to_BT(selective_log_softmax(self._logits(teacher, mb), targets_N)).cpu()
                for b, r in enumerate(mb.rows):
                    out[k][r] = lp_BT[b, :len(completion_ids[r])].tolist()
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
