"""Training objectives as pure functions of tensors.

Every objective returns ``(loss, metrics)``: ``loss`` is a scalar tensor with a grad path and
``metrics`` a dict of detached python floats. Tensor names carry their shape as a suffix
(``logprobs_BT``, ``rewards_B``, ``logits_BTV``); masks are 1 on tokens that count, 0 elsewhere.
Losses divide by ``mask.sum().clamp(min=1)`` so an all-masked batch gives a finite zero loss.
"""

import torch

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32 for reductions; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    mask = mask_BT.bool()
    x = torch.where(mask, x_BT.detach().double(), 0.0)
    return (x.sum() / mask.sum().clamp(min=1)).item()


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits)[id] computed and differentiated a chunk of rows at a time.

    Autograd through ``logits.float().log_softmax()`` would keep a full fp32 [N, V] copy alive
    until backward. Here only the [N] logsumexp is saved; backward recomputes softmax per chunk.
    """

    @staticmethod
    def forward(ctx, logits_NV, ids_N, chunk_size, temperature):
        acc = torch.promote_types(logits_NV.dtype, torch.float32)
        inv_t = 1.0 / temperature
        logprobs_N = torch.empty(ids_N.shape, dtype=acc, device=logits_NV.device)
        lse_N = torch.empty_like(logprobs_N)
        for s in range(0, ids_N.numel(), chunk_size):
            x = logits_NV[s : s + chunk_size].to(acc) * inv_t
            lse_N[s : s + chunk_size] = torch.logsumexp(x, dim=-1)
            chosen = x.gather(-1, ids_N[s : s + chunk_size, None]).squeeze(-1)
            logprobs_N[s : s + chunk_size] = chosen - lse_N[s : s + chunk_size]
        ctx.save_for_backward(logits_NV, ids_N, lse_N)
        ctx.chunk_size, ctx.inv_t = chunk_size, inv_t
        return logprobs_N

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, ids_N, lse_N = ctx.saved_tensors
        grad_logits_NV = torch.empty_like(logits_NV)
        for s in range(0, ids_N.numel(), ctx.chunk_size):
            e = s + ctx.chunk_size
            g = grad_N[s:e, None].to(lse_N.dtype)
            # With x = logits / T: d logp(id) / d logits_v = (1[v == id] - softmax(x)_v) / T
            grad = (logits_NV[s:e].to(lse_N.dtype) * ctx.inv_t - lse_N[s:e, None]).exp_().mul_(-g)
            grad.scatter_add_(-1, ids_N[s:e, None], g)
            grad_logits_NV[s:e] = grad.mul_(ctx.inv_t)
        return grad_logits_NV, None, None, None


def selective_log_softmax(
    logits_BTV: torch.Tensor, ids_BT: torch.Tensor, *, chunk_size: int = 256, temperature: float = 1.0
) -> torch.Tensor:
    """log p(ids) with p = softmax(logits / temperature), without a full [B, T, V] log-softmax.

    The temperature division happens after the fp32 upcast: dividing bf16 logits first would
    round them a second time (about 0.03 nats mean error at T = 0.7 on a 49k vocabulary).

    Works on ``chunk_size`` token rows at a time in fp32 (fp64 for fp64 input), in forward and in
    backward, so bf16 logits never get a full fp32 copy. Returns fp32 (fp64) logprobs, because
    PPO ratios exp(logp - old_logp) built from bf16 logprobs are noisy at the 1% level.
    """
    V = logits_BTV.shape[-1]
    logprobs_N = _SelectiveLogSoftmax.apply(
        logits_BTV.reshape(-1, V), ids_BT.reshape(-1).long(), chunk_size, temperature
    )
    return logprobs_N.view(ids_BT.shape)


def group_advantages(
    rewards_B: torch.Tensor, group_size: int, *, scale: str = "group", baseline: str = "mean",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group-relative advantages for ``B/group_size`` prompts with ``group_size`` completions each.

    Rewards are laid out as consecutive groups. With b_i the baseline of completion i,
      baseline="mean":           b_i = mu_g, the mean of its group (GRPO)
      baseline="leave_one_out":  b_i = mean of the other G - 1 rewards of its group (RLOO,
                                 Ahmadian et al. 2024), so r_i - b_i = G / (G - 1) (r_i - mu_g)
    the centred reward c_i = r_i - b_i is scaled by
      scale="group": A_i = c_i / (std_g + eps)      GRPO (Shao et al. 2024, DeepSeekMath)
      scale="none":  A_i = c_i                      Dr.GRPO (Liu et al. 2025); RLOO's own form
      scale="batch": A_i = c_i / (std_B(c) + eps)   REINFORCE++-baseline (Hu 2025)
    All stds are population stds (unbiased=False): defined for group_size=1 and they make the
    "group" advantages of a non-degenerate group have exactly unit variance (with the mean
    baseline). "batch" divides by the std of the centred rewards, the quantity being scaled.
    """
    B = rewards_B.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch size {B} is not divisible by group_size {group_size}")
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"unknown baseline {baseline!r}; use 'mean' or 'leave_one_out'")
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError("a leave-one-out baseline needs group_size >= 2")
    rewards_GK = _acc(rewards_B).view(-1, group_size)
    centred_GK = rewards_GK - rewards_GK.mean(dim=1, keepdim=True)
    if baseline == "leave_one_out":
        centred_GK = centred_GK * (group_size / (group_size - 1))
    if scale == "group":
        adv_GK = centred_GK / (rewards_GK.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif scale == "none":
        adv_GK = centred_GK
    elif scale == "batch":
        adv_GK = centred_GK / (centred_GK.std(unbiased=False) + eps)
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; use 'group', 'none' or 'batch'")
    metrics = {
        "frac_zero_std_groups": (rewards_GK.amax(1) == rewards_GK.amin(1)).double().mean().item(),
        "reward_mean": rewards_GK.mean().item(),
        "reward_std": rewards_GK.std(unbiased=False).item(),
    }
    return adv_GK.view(B), metrics


def aggregate(
    values_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, max_len: int | None = None
) -> torch.Tensor:
    """Reduce per-token values to a scalar over the tokens where ``mask_BT`` is set.

      token_mean:               sum_{b,t} m x / sum_{b,t} m                       (DAPO)
      seq_mean_token_mean:      mean_b [ sum_t m x / sum_t m ]                    (GRPO)
      seq_mean_token_sum_norm:  mean_b [ sum_t m x / max_len ]                    (Dr.GRPO)
    Sequences without valid tokens are left out of the mean over b.
    """
    mask = mask_BT.bool()
    # where, not multiply: a non-finite value at a padded position must not leak into the sum.
    values_BT = torch.where(mask, values_BT, 0.0)
    if mode == "token_mean":
        return values_BT.sum() / mask.sum().clamp(min=1)
    tokens_B = mask.sum(-1)
    if mode == "seq_mean_token_mean":
        per_seq_B = values_BT.sum(-1) / tokens_B.clamp(min=1)
    elif mode == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("seq_mean_token_sum_norm needs max_len")
        per_seq_B = values_BT.sum(-1) / max_len
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; use one of {LOSS_AGG_MODES}")
    return per_seq_B.sum() / (tokens_B > 0).sum().clamp(min=1)


def grpo_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.0,
    ref_logprobs_BT: torch.Tensor | None = None,
    rollout_logprobs_BT: torch.Tensor | None = None,
    tis_cap: float | None = 2.0,
    loss_agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss of GRPO with clip-higher, truncated IS and a k3 KL penalty.

    With rho_t = exp(logp_t - old_t) and A the advantage of the sequence, per token:
      l_t = -w_t * min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A) + beta * k3_t
    aggregated over valid tokens with ``aggregate(l, mask, loss_agg, max_len)``.
      - PPO clipped surrogate (Schulman et al. 2017) as used by GRPO (Shao et al. 2024);
        asymmetric clip range, "clip-higher" (DAPO, Yu et al. 2025).
      - w_t = min(exp(old_t - rollout_t), tis_cap), detached: truncated importance sampling for
        the sampler-vs-learner mismatch (Yao et al. 2025, "Your Efficient RL Framework Secretly
        Brings You Off-Policy RL Training"). w_t = 1 without rollout logprobs or when tis_cap is
        None/0 (the mismatch is still reported).
      - k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (Schulman 2020, "Approximating KL
        Divergence"); ``ref_logprobs_BT`` is required when beta > 0. ``kl`` is reported whenever
        reference logprobs are given, so it can be monitored at beta = 0.
    """
    if beta > 0 and ref_logprobs_BT is None:
        raise ValueError("beta > 0 needs ref_logprobs_BT")
    mask = mask_BT.bool()
    # Log-ratios are zeroed on padding before exp so garbage there cannot overflow into NaN grads.
    ratio_BT = torch.exp(torch.where(mask, logprobs_BT - old_logprobs_BT, 0.0))
    adv_B1 = advantages_B.to(ratio_BT.dtype)[:, None]
    surr_BT = ratio_BT * adv_B1
    clipped_surr_BT = ratio_BT.clamp(1 - clip_low, 1 + clip_high) * adv_B1
    per_token_BT = -torch.minimum(surr_BT, clipped_surr_BT)

    metrics = {
        "clip_frac": _masked_mean((clipped_surr_BT < surr_BT).float(), mask),
        "ratio_mean": _masked_mean(ratio_BT, mask),
        "entropy_proxy": _masked_mean(-logprobs_BT, mask),
    }
    w_BT = _tis_weights(old_logprobs_BT, rollout_logprobs_BT, mask, tis_cap, metrics)
    per_token_BT = _with_kl(per_token_BT * w_BT, logprobs_BT, ref_logprobs_BT, mask, beta, metrics)
    return aggregate(per_token_BT, mask, loss_agg, max_len), metrics


def _tis_weights(old_BT, rollout_BT, mask, tis_cap, metrics: dict) -> torch.Tensor:
    """min(exp(old - rollout), tis_cap) per token, detached (1 without rollout logprobs or cap);
    reports the mismatch either way."""
    if rollout_BT is None:
        return torch.ones((), dtype=torch.promote_types(old_BT.dtype, torch.float32), device=old_BT.device)
    with torch.no_grad():
        log_w_BT = torch.where(mask, old_BT - rollout_BT, 0.0)
        metrics["logp_mismatch"] = _masked_mean(log_w_BT.abs(), mask)
        if not tis_cap:
            return torch.ones_like(log_w_BT)
        w_BT = log_w_BT.exp()
        metrics["tis_clip_frac"] = _masked_mean((w_BT > tis_cap).float(), mask)
        w_BT = w_BT.clamp(max=tis_cap)
        metrics["tis_weight_mean"] = _masked_mean(w_BT, mask)
    return w_BT


def _with_kl(per_token_BT, logprobs_BT, ref_BT, mask, beta, metrics: dict) -> torch.Tensor:
    """per_token + beta * k3 (Schulman 2020); k3 reported whenever reference logprobs are given."""
    if ref_BT is None:
        return per_token_BT
    log_r_BT = torch.where(mask, ref_BT - logprobs_BT, 0.0)
    k3_BT = torch.exp(log_r_BT) - log_r_BT - 1
    metrics["kl"] = _masked_mean(k3_BT, mask)
    return per_token_BT + beta * k3_BT if beta > 0 else per_token_BT


def gspo_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    beta: float = 0.0,
    ref_logprobs_BT: torch.Tensor | None = None,
    rollout_logprobs_BT: torch.Tensor | None = None,
    tis_cap: float | None = 2.0,
    loss_agg: str = "seq_mean_token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: the PPO clip on a sequence-level ratio (Zheng et al. 2025, "Group Sequence Policy
    Optimization"). With s_b = exp(mean_t (logp_bt - old_bt)), the geometric mean of the token
    ratios of sequence b, every token of b carries
      l_bt = -w_b * min(s_b A_b, clip(s_b, 1 - clip_low, 1 + clip_high) A_b) + beta * k3_bt
    aggregated with ``aggregate(l, mask, loss_agg)``; the paper's objective is the mean over
    sequences (loss_agg="seq_mean_token_mean"), and its clip range is ~1e-4, not PPO's 0.2,
    because s_b averages away the token noise. w_b = min(exp(mean_t (old_bt - rollout_bt)),
    tis_cap), detached: the truncated importance weight for the sampler mismatch at the same
    (sequence, length-normalised) level as the ratio it corrects.
    """
    if beta > 0 and ref_logprobs_BT is None:
        raise ValueError("beta > 0 needs ref_logprobs_BT")
    mask = mask_BT.bool()
    tokens_B1 = mask.sum(-1, keepdim=True).clamp(min=1)
    log_s_B1 = torch.where(mask, logprobs_BT - old_logprobs_BT, 0.0).sum(-1, keepdim=True) / tokens_B1
    s_B1 = torch.exp(log_s_B1)
    adv_B1 = advantages_B.to(s_B1.dtype)[:, None]
    surr_B1, clipped_B1 = s_B1 * adv_B1, s_B1.clamp(1 - clip_low, 1 + clip_high) * adv_B1
    per_seq_B1 = -torch.minimum(surr_B1, clipped_B1)
    has_B = mask.any(-1)
    metrics = {
        "clip_frac": (clipped_B1 < surr_B1)[has_B].double().mean().item() if has_B.any() else 0.0,
        "ratio_mean": s_B1[has_B].double().mean().item() if has_B.any() else 0.0,
        "entropy_proxy": _masked_mean(-logprobs_BT, mask),
    }
    if rollout_logprobs_BT is not None:
        with torch.no_grad():
            log_w_BT = torch.where(mask, old_logprobs_BT - rollout_logprobs_BT, 0.0)
            metrics["logp_mismatch"] = _masked_mean(log_w_BT.abs(), mask)
            w_B1 = (log_w_BT.sum(-1, keepdim=True) / tokens_B1).exp()
            metrics["tis_clip_frac"] = (w_B1 > tis_cap)[has_B].double().mean().item() if tis_cap and has_B.any() else 0.0
        if tis_cap:
            per_seq_B1 = per_seq_B1 * w_B1.clamp(max=tis_cap)
    per_token_BT = _with_kl(per_seq_B1.expand_as(logprobs_BT), logprobs_BT, ref_logprobs_BT, mask, beta, metrics)
    return aggregate(per_token_BT, mask, loss_agg, max_len), metrics


def cispo_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    beta: float = 0.0,
    ref_logprobs_BT: torch.Tensor | None = None,
    rollout_logprobs_BT: torch.Tensor | None = None,
    tis_cap: float | None = 2.0,
    loss_agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO: clip the importance weight, not the update (MiniMax-M1, 2025, Sec. 3.1). Per token
      l_t = -w_t * sg[clip(rho_t, 1 - clip_low, 1 + clip_high)] * A * logp_t + beta * k3_t
    aggregated with ``aggregate(l, mask, loss_agg)`` (token_mean in the paper). Every token keeps
    a gradient, A * clipped weight * grad logp, where PPO's min would zero the gradient of a token
    whose ratio left the clip range; the paper sets no lower bound (clip_low = 1) and tunes only
    clip_high. w_t is GRPO's truncated importance weight for the sampler mismatch.
    """
    if beta > 0 and ref_logprobs_BT is None:
        raise ValueError("beta > 0 needs ref_logprobs_BT")
    mask = mask_BT.bool()
    ratio_BT = torch.exp(torch.where(mask, logprobs_BT - old_logprobs_BT, 0.0)).detach()
    weight_BT = ratio_BT.clamp(1 - clip_low, 1 + clip_high)
    adv_B1 = advantages_B.to(ratio_BT.dtype)[:, None]
    per_token_BT = -weight_BT * adv_B1 * torch.where(mask, logprobs_BT, 0.0)
    metrics = {
        "clip_frac": _masked_mean((weight_BT != ratio_BT).float(), mask),
        "ratio_mean": _masked_mean(ratio_BT, mask),
        "entropy_proxy": _masked_mean(-logprobs_BT, mask),
    }
    w_BT = _tis_weights(old_logprobs_BT, rollout_logprobs_BT, mask, tis_cap, metrics)
    per_token_BT = _with_kl(per_token_BT * w_BT, logprobs_BT, ref_logprobs_BT, mask, beta, metrics)
    return aggregate(per_token_BT, mask, loss_agg, max_len), metrics


POLICY_LOSSES = {"grpo": grpo_loss, "gspo": gspo_loss, "cispo": cispo_loss}  # grpo.loss
BASELINES = {"grpo": "mean", "rloo": "leave_one_out"}  # grpo.adv_estimator -> group_advantages


def sft_loss(
    logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood over completion tokens (prompt masked out).

      L = -sum_{b,t} m_bt log p(y_bt) / sum_{b,t} m_bt
    Maximum-likelihood SFT / sequence-level KD on teacher samples (Kim & Rush 2016).
    """
    loss = aggregate(-logprobs_BT, mask_BT, "token_mean")
    return loss, {"nll": loss.item(), "num_tokens": float(mask_BT.bool().sum().item())}


def overlong_penalty(
    lengths_N: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO's soft overlong punishment, a reward added per completion (Yu et al. 2025, Eq. 13).

      R_len(L) = 0                                       if L <= max_len - buffer
               = -penalty * (L - (max_len - buffer)) / buffer   if max_len - buffer < L < max_len
               = -penalty                                if L >= max_len (cut at the cap)
    It tells a long answer apart from a cut-off one gradually, instead of scoring every
    truncated sample as wrong (reward noise). With buffer = 0 only capped completions pay.
    """
    L = lengths_N.to(torch.float64)
    if buffer > 0:
        out_N = -penalty * ((L - (max_len - buffer)) / buffer).clamp(0.0, 1.0)
    else:
        out_N = torch.where(L >= max_len, -penalty, 0.0).to(torch.float64)
    affected = (out_N < 0).double()
    return out_N, {"overlong_frac": affected.mean().item() if len(L) else 0.0,
                   "overlong_penalty_mean": out_N.mean().item() if len(L) else 0.0}
