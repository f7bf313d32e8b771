"""Distillation objectives as pure functions of tensors (conventions of `rlkd.losses`).

Word-level KD and GKD compare full next-token distributions of student and teacher on the same
prefixes; MiniLLM treats reverse KL as a reward and optimises it with a policy gradient on the
student's own samples. All return ``(value, metrics)`` and give a finite zero on all-masked
input; the teacher side never gets a gradient.

MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models") has four
components; here they are:
  - single-step decomposition (`minillm_loss(student_logits_NV=...)`): ON by default. The
    reward of the current token is taken in exact expectation over the full vocabulary, which
    removes most of the variance; the policy gradient then carries only future rewards
    (`minillm_token_rewards(from_next=True)`).
  - length normalisation of the reward-to-go (`length_norm=True`): ON by default, as in the
    paper: unnormalised returns favour short completions. The returns are then standardised over
    the batch (`whiten`), as in the authors' code.
  - teacher-mixed sampling (`teacher_mixed_weights`, `mixed_next_token_logprobs`): OFF by
    default (alpha = 0). Sampling from alpha p_T + (1 - alpha) q_S needs the teacher inside the
    decoding loop, which vLLM's sampler cannot do, so it runs on the learner's slower
    transformers sampler; the paper uses it against reward hacking of a weak early student,
    which an SFT'd or pruned-then-distilled student shows less of on short GSM8K completions.
  - language-modelling loss on SFT data (`rlkd.losses.sft_loss`, weight `distill.lm_coef`): OFF
    by default. The paper adds it on pretraining text to keep general ability; rlkd's students
    are trained for GSM8K only, where the teacher signal already covers the task.
"""

import math

import torch
import torch.nn.functional as F

from rlkd.losses import _acc, _masked_mean


def _valid_log_softmaxes(student_logits_BTV, teacher_logits_BTV, mask_BT, temperature):
    """fp32 log-softmaxes of the valid tokens only ([N, V]); prompt and padding cost nothing."""
    mask = mask_BT.bool()
    log_q_NV = torch.log_softmax(_acc(student_logits_BTV[mask]) / temperature, dim=-1)
    log_p_NV = torch.log_softmax(_acc(teacher_logits_BTV[mask].detach()) / temperature, dim=-1)
    return log_q_NV, log_p_NV, mask.sum().clamp(min=1)


def _kl_N(log_a_NV: torch.Tensor, log_b_NV: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v), one value per row."""
    return (log_a_NV.exp() * (log_a_NV - log_b_NV)).sum(-1)


def reverse_kl_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Exact full-vocabulary reverse KL, token-mean over the mask (MiniLLM, Gu et al. 2024).

      L = T^2 * mean_t sum_v q_S(v) (log q_S(v) - log p_T(v)),  q_S, p_T softmaxes of logits / T
    This is MiniLLM's single-step term: the expectation over the next token is exact, so it
    needs no sampling. T^2 keeps gradient scale temperature-independent, as in forward_kl_loss.
    The teacher gets no gradient.
    """
    log_q, log_p, n = _valid_log_softmaxes(
        student_logits_BTV, teacher_logits_BTV, mask_BT, temperature
    )
    loss = temperature**2 * _kl_N(log_q, log_p).sum() / n
    return loss, {"reverse_kl": loss.item()}


def forward_kl_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward KL (word-level KD), token-mean over the mask (Hinton et al. 2015).

      L = T^2 * mean_t sum_v p_T(v) (log p_T(v) - log q_S(v)),  p_T, q_S softmaxes of logits / T
    Soft-target gradients scale as 1/T^2, hence the T^2. The teacher gets no gradient.
    """
    log_q, log_p, n = _valid_log_softmaxes(
        student_logits_BTV, teacher_logits_BTV, mask_BT, temperature
    )
    loss = temperature**2 * _kl_N(log_p, log_q).sum() / n
    return loss, {"forward_kl": loss.item()}


def generalized_jsd_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), token-mean over the mask.

    With m = beta p_T + (1 - beta) q_S (softmaxes of logits / T), for 0 < beta < 1:
      JSD_beta = [beta KL(p_T || m) + (1 - beta) KL(q_S || m)] / (beta (1 - beta))
    and the limits taken exactly: beta = 0 -> KL(p_T || q_S) (forward), beta = 1 -> KL(q_S || p_T)
    (reverse). Unlike GKD/TRL we divide by beta (1 - beta) (Huszar 2015's scaling): that makes
    JSD_beta continuous in beta with those limits, instead of vanishing at both ends. At beta = 0.5
    it is 4x the usual JSD. Multiplied by T^2 like forward_kl_loss; the teacher gets no gradient.
    GKD's other knob, the fraction `lmbda` of on-policy (student-sampled) sequences, picks the
    data, not the loss: see `rlkd.tasks.distill`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_q, log_p, n = _valid_log_softmaxes(
        student_logits_BTV, teacher_logits_BTV, mask_BT, temperature
    )
    if beta == 0.0:
        jsd_N = _kl_N(log_p, log_q)
    elif beta == 1.0:
        jsd_N = _kl_N(log_q, log_p)
    else:
        # log m - log q and log m - log p straight from the log-ratio: as beta -> 0 (1), m is
        # within beta of q (p), and log q - log m would cancel to noise/beta in fp32.
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        log_mq = log_1mb + F.softplus(log_p - log_q + log_b - log_1mb)
        log_mp = log_b + F.softplus(log_q - log_p + log_1mb - log_b)
        # [beta KL(p||m) + (1-beta) KL(q||m)] / (beta (1-beta)), with KL(a||m) = -sum a log(m/a)
        jsd_N = -(
            (log_p.exp() * log_mp).sum(-1) / (1 - beta) + (log_q.exp() * log_mq).sum(-1) / beta
        )
    loss = temperature**2 * jsd_N.sum() / n
    return loss, {"jsd": loss.item()}


@torch.no_grad()
def minillm_token_rewards(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    gamma: float = 1.0,
    length_norm: bool = True,
    from_next: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MiniLLM per-token returns of the sampled completion (Gu et al. 2024, Sec. 2.2-2.3).

      r_t = log p_T(y_t) - log q_S(y_t)
      R_t = sum_{s >= t0} gamma^(s - t0) m_s r_s,  divided by sum_{s >= t0} m_s if length_norm
    with t0 = t, or t0 = t + 1 when `from_next` (the paper's R_{t+1}: with the single-step term
    the current token's reward is already taken in exact expectation). Returns R_BT (0 on masked
    tokens, and 0 where nothing follows with from_next). Length normalisation stops the return
    favouring short completions, whose sums of negative log-ratios are smaller in magnitude.
    """
    mask = mask_BT.bool()
    r_BT = torch.where(mask, _acc(teacher_logprobs_BT) - _acc(student_logprobs_BT), 0.0)
    returns_BT = torch.zeros_like(r_BT)
    running_B = torch.zeros_like(r_BT[:, 0])
    for t in reversed(range(r_BT.shape[1])):
        if from_next:
            returns_BT[:, t] = running_B
        running_B = r_BT[:, t] + gamma * running_B
        if not from_next:
            returns_BT[:, t] = running_B
    if length_norm:
        remaining_BT = mask.flip(-1).cumsum(-1).flip(-1)
        if from_next:
            remaining_BT = remaining_BT - mask.long()
        returns_BT = returns_BT / remaining_BT.clamp(min=1)
    returns_BT = torch.where(mask, returns_BT, 0.0)
    metrics = {
        "token_reward_mean": _masked_mean(r_BT, mask),
        "return_mean": _masked_mean(returns_BT, mask),
    }
    return returns_BT, metrics


def mixed_next_token_logprobs(
    student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor, alpha: float
) -> torch.Tensor:
    """log p~ of MiniLLM's teacher-mixed sampling distribution (Gu et al. 2024, Sec. 2.3).

      p~(v) = alpha p_T(v) + (1 - alpha) q_S(v)
    Rows are next-token positions. Sampling from p~ instead of q_S keeps a weak student from
    drifting into degenerate text that the teacher scores high by accident (reward hacking).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    log_q = torch.log_softmax(_acc(student_logits_NV.detach()), -1)
    log_p = torch.log_softmax(_acc(teacher_logits_NV.detach()), -1)
    if alpha == 0.0:
        return log_q
    if alpha == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))


@torch.no_grad()
def teacher_mixed_weights(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    alpha: float,
    cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token importance weights for tokens sampled from the teacher mixture (Gu et al. 2024).

      w_t = q_S(y_t) / (alpha p_T(y_t) + (1 - alpha) q_S(y_t))
    the paper's per-token approximation of the sequence ratio q_S(y) / p~(y) (the product has
    too much variance). q_S is the student that sampled (detached); w_t = 1 at alpha = 0.
    `cap` truncates the weights (Ionides 2008); None leaves them as they are. 0 on masked tokens.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mask = mask_BT.bool()
    log_q = _acc(student_logprobs_BT)
    if alpha == 0.0:
        w_BT = torch.ones_like(log_q)
    else:
        log_p = _acc(teacher_logprobs_BT)
        if alpha == 1.0:
            log_mix = log_p
        else:
            log_mix = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
        w_BT = torch.exp(torch.where(mask, log_q - log_mix, 0.0))
    if cap is not None:
        w_BT = w_BT.clamp(max=cap)
    w_BT = torch.where(mask, w_BT, 0.0)
    return w_BT, {"mix_weight_mean": _masked_mean(w_BT, mask)}


def minillm_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    weights_BT: torch.Tensor | None = None,
    rollout_logprobs_BT: torch.Tensor | None = None,
    tis_cap: float | None = None,
    student_logits_NV: torch.Tensor | None = None,
    teacher_logits_NV: torch.Tensor | None = None,
    single_step_coef: float = 1.0,
    task_advantages_B: torch.Tensor | None = None,
    task_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MiniLLM's clipped policy gradient for reverse KL, token-mean over the mask (Gu et al. 2024).

    Per token, with rho_t = exp(logp_t - old_t) and A_t = R_t + task_coef * A_task:
      l_t = -w_t v_t min(rho_t A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) A_t)
            + single_step_coef * w_t * KL(q_S(.|y_<t) || p_T(.|y_<t))
      - R_t: MiniLLM returns (`minillm_token_rewards`), detached.
      - PPO clipping (Schulman et al. 2017), which the paper uses to stabilise the update.
      - w_t: teacher-mixed importance weights (`teacher_mixed_weights`); 1 if None.
      - v_t = min(exp(old_t - rollout_t), tis_cap), detached: the truncated importance weight
        for the sampler-vs-learner mismatch, as in `rlkd.losses.grpo_loss` (Yao et al. 2025),
        on the sampled-token (policy-gradient) term only, whose estimate hangs on which token
        was sampled; the single-step term is exact over the vocabulary. v_t = 1 without
        rollout logprobs or with tis_cap None/0 (the mismatch is still reported). Applied to
        the single-step term too, bf16 sampler noise (0.15 nats/token on a pruned student)
        made a 6-step MiniLLM run diverge where fp32, or this form, converges.
      - the KL term is the single-step part, exact over the full vocabulary; it is on when
        both logits are given (the teacher's get no gradient). They are [N, V], the rows of
        the valid tokens in row-major order (``logits_BTV[mask_BT]``), so a packed learner
        never builds a padded [B, T, V] tensor.
      - A_task: sequence advantages of a task reward (e.g. GRPO group advantages of GSM8K
        correctness), so GRPO and distillation are one objective; off at task_coef = 0.
    """
    mask = mask_BT.bool()
    ratio_BT = torch.exp(torch.where(mask, logprobs_BT - old_logprobs_BT, 0.0))
    adv_BT = _acc(returns_BT).detach()
    if task_advantages_B is not None and task_coef:
        adv_BT = adv_BT + task_coef * _acc(task_advantages_B)[:, None]
    adv_BT = adv_BT.to(ratio_BT.dtype)
    surr_BT = ratio_BT * adv_BT
    clipped_BT = ratio_BT.clamp(1 - clip_low, 1 + clip_high) * adv_BT
    w_BT = torch.ones_like(ratio_BT) if weights_BT is None else weights_BT.detach().to(ratio_BT.dtype)
    metrics, pg_w_BT = {}, w_BT
    if rollout_logprobs_BT is not None:
        with torch.no_grad():
            log_tis_BT = torch.where(mask, _acc(old_logprobs_BT) - _acc(rollout_logprobs_BT), 0.0)
            metrics["logp_mismatch"] = _masked_mean(log_tis_BT.abs(), mask)
            if tis_cap:
                tis_BT = log_tis_BT.exp()
                metrics["tis_clip_frac"] = _masked_mean((tis_BT > tis_cap).float(), mask)
                pg_w_BT = w_BT * tis_BT.clamp(max=tis_cap).to(w_BT.dtype)
    per_token_BT = -pg_w_BT * torch.minimum(surr_BT, clipped_BT)
    n = mask.sum().clamp(min=1)
    pg = torch.where(mask, per_token_BT, 0.0).sum() / n
    metrics.update({
        "pg_loss": pg.item(),
        "clip_frac": _masked_mean((clipped_BT < surr_BT).float(), mask),
        "ratio_mean": _masked_mean(ratio_BT, mask),
        "advantage_mean": _masked_mean(adv_BT, mask),
    })
    loss = pg
    if student_logits_NV is not None and teacher_logits_NV is not None:
        log_q = torch.log_softmax(_acc(student_logits_NV), dim=-1)
        log_p = torch.log_softmax(_acc(teacher_logits_NV.detach()), dim=-1)
        kl_N = _kl_N(log_q, log_p)
        single = (w_BT[mask] * kl_N).sum() / n
        metrics["single_step_kl"] = (kl_N.detach().sum() / n).item()
        loss = loss + single_step_coef * single
    return loss, metrics


def mix_teachers(log_probs_K: torch.Tensor, weights_KB: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the weighted mixture of K teachers: log sum_k w_kb p_k.

    `log_probs_K` is [K, B, T] (logprobs of sampled tokens, MiniLLM's reward) or [K, B, T, V]
    (normalised log-softmaxes, the full-vocabulary target); weights are per teacher and
    example and sum to 1 over K. The mixture is the multi-teacher target: its log-probability
    is the reward, its distribution the KD target (Wu et al. 2021, "One Teacher is Enough?").
    """
    w = _acc(weights_KB).view(*weights_KB.shape, *([1] * (log_probs_K.dim() - 2)))
    return torch.logsumexp(_acc(log_probs_K) + torch.log(w.clamp(min=1e-30)), dim=0)


@torch.no_grad()
def teacher_confidence_weights(
    teacher_logprobs_KBT: torch.Tensor, mask_BT: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-example teacher weights from each teacher's confidence in the sequence.

      w_kb = softmax_k( mean_t m_bt log p_k(y_bt) / temperature )
    A teacher that finds the student's sample likely gets more say on that example (the
    confidence-weighted multi-teacher KD of Zhang et al. 2022, with the mean token logprob as
    confidence). Rows with no valid token get uniform weights.
    """
    mask = mask_BT.bool()
    tokens_B = mask.sum(-1).clamp(min=1)
    mean_KB = torch.where(mask, _acc(teacher_logprobs_KBT), 0.0).sum(-1) / tokens_B
    w_KB = torch.softmax(mean_KB / temperature, dim=0)
    return w_KB, {f"teacher_weight_{k}": w_KB[k].mean().item() for k in range(w_KB.shape[0])}


@torch.no_grad()
def whiten(values_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the valid tokens (population std); 0 on masked tokens.

    MiniLLM's reference implementation standardises its returns this way before the policy
    gradient: all-negative reverse-KL returns otherwise push down every sampled token alike,
    which is pure variance (the expectation of a constant baseline's gradient is zero).
    """
    mask = mask_BT.bool()
    x = _acc(values_BT)
    n = mask.sum().clamp(min=1)
    mean = torch.where(mask, x, 0.0).sum() / n
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum() / n
    return torch.where(mask, (x - mean) / (var.sqrt() + eps), 0.0)
