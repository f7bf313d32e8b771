"""Every objective in rlkd.losses against a brute-force Python loop over tiny tensors."""

import math

import pytest
import torch

from rlkd.losses import (
    aggregate,
    cispo_loss,
    group_advantages,
    grpo_loss,
    gspo_loss,
    selective_log_softmax,
    sft_loss,
)

AGG_MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
# Row 1 empty (excluded from sequence means), row 2 has a hole in the middle.
MASK_BT = torch.tensor(
    [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool
)


def close(a, b, tol=1e-9):
    a, b = (x.item() if torch.is_tensor(x) else float(x) for x in (a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---------------------------------------------------------------------------- references


def ref_aggregate(values, mask, mode, max_len=None):
    """values, mask: nested lists."""
    if mode == "token_mean":
        total = sum(
            v
            for row, mrow in zip(values, mask, strict=True)
            for v, m in zip(row, mrow, strict=True)
            if m
        )
        count = sum(m for mrow in mask for m in mrow)
        return total / max(count, 1)
    per_seq = []
    for row, mrow in zip(values, mask, strict=True):
        valid = [v for v, m in zip(row, mrow, strict=True) if m]
        if not valid:
            continue
        denom = len(valid) if mode == "seq_mean_token_mean" else max_len
        per_seq.append(sum(valid) / denom)
    return sum(per_seq) / max(len(per_seq), 1)


def ref_log_softmax(row):
    mx = max(row)
    lse = mx + math.log(sum(math.exp(x - mx) for x in row))
    return [x - lse for x in row]



def random_logits(seed, B=3, T=4, V=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=dtype) * 2


# ---------------------------------------------------------------------- selective_log_softmax


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 256])
def test_selective_log_softmax_matches_naive_fp64(chunk_size):
    logits = random_logits(0, B=3, T=5, V=7)
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    out = selective_log_softmax(logits, ids, chunk_size=chunk_size)
    expected = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    assert out.dtype == torch.float64 and out.shape == (3, 5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for b in range(3):
        for t in range(5):
            ref = ref_log_softmax(logits[b, t].tolist())[ids[b, t]]
            assert close(out[b, t], ref, 1e-12)


def test_selective_log_softmax_gradcheck():
    logits = random_logits(2, B=2, T=3, V=5).requires_grad_()
    ids = torch.tensor([[0, 4, 2], [1, 1, 3]])
    assert torch.autograd.gradcheck(
        lambda x: selective_log_softmax(x, ids, chunk_size=2), (logits,), eps=1e-6, atol=1e-8
    )


def test_selective_log_softmax_bf16_uses_fp32_math():
    logits32 = random_logits(3, B=4, T=5, V=7, dtype=torch.float32) * 4
    logits16 = logits32.to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(4))
    out = selective_log_softmax(logits16, ids, chunk_size=3)
    assert out.dtype == torch.float32
    # Reference: the same bf16 values, upcast, through the naive fp32 log-softmax.
    ref_in = logits16.detach().float().requires_grad_()
    expected = torch.log_softmax(ref_in, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # A naive bf16 log-softmax is visibly worse, so the comparison above is not vacuous.
    naive16 = torch.log_softmax(logits16.detach(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert (naive16.float() - expected).abs().max() > 1e-3

    weights = torch.linspace(-1, 1, 20).view(4, 5)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert logits16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits16.grad.float(), ref_in.grad, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------- advantages


def ref_group_advantages(rewards, G, scale, eps=1e-6):
    groups = [rewards[i : i + G] for i in range(0, len(rewards), G)]
    centred = []
    for grp in groups:
        mu = sum(grp) / G
        std = math.sqrt(sum((r - mu) ** 2 for r in grp) / G)
        for r in grp:
            centred.append((r - mu, std))
    if scale == "group":
        return [c / (s + eps) for c, s in centred]
    if scale == "none":
        return [c for c, _ in centred]
    flat = [c for c, _ in centred]
    mu = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((c - mu) ** 2 for c in flat) / len(flat))
    return [c / (batch_std + eps) for c in flat]


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_group_advantages_matches_loop(scale):
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 2.0, -1.0, 0.0, 0.0]
    adv, metrics = group_advantages(torch.tensor(rewards), 4, scale=scale)
    ref = ref_group_advantages(rewards, 4, scale)
    assert adv.shape == (12,)
    for a, r in zip(adv.tolist(), ref, strict=True):
        assert close(a, r, 1e-5)
    assert close(metrics["frac_zero_std_groups"], 0.0)
    assert close(metrics["reward_mean"], sum(rewards) / 12, 1e-6)
    mu = sum(rewards) / 12
    assert close(metrics["reward_std"], math.sqrt(sum((r - mu) ** 2 for r in rewards) / 12), 1e-6)


def test_group_advantages_zero_variance_groups():
    adv, metrics = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2)
    assert close(metrics["frac_zero_std_groups"], 2 / 3)
    assert adv[:2].tolist() == [0.0, 0.0] and adv[4:].tolist() == [0.0, 0.0]
    assert close(adv[2], -1.0, 1e-5) and close(adv[3], 1.0, 1e-5)


def test_group_advantages_validates():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 2, scale="bogus")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), 1, baseline="leave_one_out")


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_leave_one_out_baseline_matches_loop(scale):
    # RLOO (Ahmadian et al. 2024): each completion is compared with the mean of the others.
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 2.0, -1.0, 0.0, 0.0]
    G, eps = 4, 1e-6
    centred, stds = [], []
    for g0 in range(0, len(rewards), G):
        grp = rewards[g0:g0 + G]
        mu = sum(grp) / G
        std = math.sqrt(sum((r - mu) ** 2 for r in grp) / G)
        for i, r in enumerate(grp):
            others = [x for j, x in enumerate(grp) if j != i]
            centred.append(r - sum(others) / (G - 1))
            stds.append(std)
    if scale == "group":
        ref = [c / (s + eps) for c, s in zip(centred, stds, strict=True)]
    elif scale == "none":
        ref = centred
    else:
        mu = sum(centred) / len(centred)
        ref = [c / (math.sqrt(sum((x - mu) ** 2 for x in centred) / len(centred)) + eps) for c in centred]
    adv, _ = group_advantages(torch.tensor(rewards), G, scale=scale, baseline="leave_one_out")
    for a, r in zip(adv.tolist(), ref, strict=True):
        assert close(a, r, 1e-5)


# ---------------------------------------------------------------------------- aggregate


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_loop(mode):
    values = torch.randn(4, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    values[1, 0] = float("nan")  # masked garbage must not leak
    out = aggregate(values, MASK_BT, mode, max_len=7)
    assert close(out, ref_aggregate(values.tolist(), MASK_BT.tolist(), mode, 7), 1e-12)


def test_aggregate_modes_differ_and_validate():
    values = torch.arange(20, dtype=torch.float64).view(4, 5)
    outs = {m: aggregate(values, MASK_BT, m, max_len=5).item() for m in AGG_MODES}
    assert len(set(outs.values())) == 3
    with pytest.raises(ValueError):
        aggregate(values, MASK_BT, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError):
        aggregate(values, MASK_BT, "bogus")


# ---------------------------------------------------------------------------- grpo_loss


def ref_grpo_token(logp, old, adv, clip_low, clip_high):
    """Per-token loss and its derivative w.r.t. logp."""
    ratio = math.exp(logp - old)
    clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
    if ratio * adv <= clipped * adv:
        return -ratio * adv, -ratio * adv, False
    return -clipped * adv, 0.0, True


def test_grpo_clip_branches_values_and_grads():
    # Ratios straddle both bounds of an asymmetric range [0.8, 1.28]; advantages of both signs.
    ratios = torch.tensor([0.5, 0.9, 1.1, 1.5, 2.0], dtype=torch.float64)
    old = torch.log(torch.tensor([0.3, 0.2, 0.4, 0.1, 0.25], dtype=torch.float64)).repeat(2, 1)
    logp = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([1.5, -0.7], dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, metrics = grpo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()

    total, n_clipped = 0.0, 0
    for b in range(2):
        for t in range(5):
            val, grad, was_clipped = ref_grpo_token(
                logp[b, t].item(), old[b, t].item(), adv[b].item(), 0.2, 0.28
            )
            total += val
            n_clipped += was_clipped
            assert close(logp.grad[b, t], grad / 10, 1e-12)
    assert close(loss, total / 10, 1e-12)
    # A > 0 clips ratios 1.5, 2.0 above 1.28; A < 0 clips 0.5 below 0.8.
    assert n_clipped == 3 and close(metrics["clip_frac"], 0.3, 1e-12)
    assert close(metrics["ratio_mean"], ratios.mean().item(), 1e-12)
    assert close(metrics["entropy_proxy"], -logp.mean().item(), 1e-12)
    assert "kl" not in metrics and "tis_weight_mean" not in metrics


@pytest.mark.parametrize("mode", AGG_MODES)
def test_grpo_on_policy_gradient_is_reinforce_with_group_baseline(mode):
    g = torch.Generator().manual_seed(6)
    logp = (-torch.rand(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv, _ = group_advantages(rewards, 2)
    adv = adv.double()
    loss, metrics = grpo_loss(logp, logp.detach(), adv, MASK_BT, loss_agg=mode, max_len=6)
    (grad,) = torch.autograd.grad(loss, logp)

    # REINFORCE: -sum A_b log p_bt, with the same aggregation weights; d/dlogp_bt = -A_b w_bt.
    reinforce = aggregate(-adv[:, None] * logp, MASK_BT, mode, max_len=6)
    (ref_grad,) = torch.autograd.grad(reinforce, logp)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    # And by hand, so the check does not rest on aggregate alone.
    counts = MASK_BT.sum(-1).tolist()
    n_seq = sum(c > 0 for c in counts)
    for b in range(4):
        for t in range(5):
            if not MASK_BT[b, t]:
                w = 0.0
            elif mode == "token_mean":
                w = 1 / sum(counts)
            elif mode == "seq_mean_token_mean":
                w = 1 / (counts[b] * n_seq)
            else:
                w = 1 / (6 * n_seq)
            assert close(grad[b, t], -adv[b].item() * w, 1e-12)
    assert metrics["clip_frac"] == 0.0 and close(metrics["ratio_mean"], 1.0)


def test_grpo_k3_kl_penalty():
    g = torch.Generator().manual_seed(7)
    logp = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ref = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2
    adv = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    mask = MASK_BT[[0, 2, 3], :4]
    beta = 0.3
    loss, metrics = grpo_loss(logp, logp.detach(), adv, mask, beta=beta, ref_logprobs_BT=ref)
    loss.backward()
    n = mask.sum().item()
    total, kl_sum = 0.0, 0.0
    for b in range(3):
        for t in range(4):
            if not mask[b, t]:
                assert logp.grad[b, t] == 0
                continue
            d = ref[b, t].item() - logp[b, t].item()
            k3 = math.exp(d) - d - 1
            kl_sum += k3
            total += -adv[b].item() + beta * k3
            # d/dlogp of -rho A + beta k3 at rho = 1: -A + beta (1 - exp(d))
            assert close(logp.grad[b, t], (-adv[b].item() + beta * (1 - math.exp(d))) / n, 1e-12)
    assert close(loss, total / n, 1e-12)
    assert close(metrics["kl"], kl_sum / n, 1e-12)

    # beta = 0 with a reference: loss ignores it, kl is still monitored.
    loss0, metrics0 = grpo_loss(logp, logp.detach(), adv, mask, ref_logprobs_BT=ref)
    assert close(loss0, -sum(adv[b].item() * mask[b].sum().item() for b in range(3)) / n, 1e-12)
    assert close(metrics0["kl"], kl_sum / n, 1e-12)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp.detach(), adv, mask, beta=0.1)


def test_grpo_truncated_importance_sampling():
    old = torch.log(
        torch.tensor([[0.2, 0.5, 0.1, 0.3], [0.6, 0.05, 0.4, 0.7]], dtype=torch.float64)
    )
    # Sampler/learner probability ratios exp(old - rollout): both under and over the cap 2.
    is_ratio = torch.tensor([[1.0, 0.5, 3.0, 1.5], [2.5, 1.2, 0.8, 4.0]], dtype=torch.float64)
    rollout = (old - is_ratio.log()).requires_grad_()  # the weight must be detached from it
    logp = (old + torch.tensor([0.1, -0.4, 0.3, 0.0]).double()).requires_grad_()
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    loss, metrics = grpo_loss(logp, old, adv, mask, rollout_logprobs_BT=rollout, tis_cap=2.0)
    loss.backward()

    total, weights, mismatch, n = 0.0, [], [], mask.sum().item()
    for b in range(2):
        for t in range(4):
            if not mask[b, t]:
                continue
            w = min(is_ratio[b, t].item(), 2.0)
            weights.append(w)
            mismatch.append(abs(math.log(is_ratio[b, t].item())))
            val, grad, _ = ref_grpo_token(
                logp[b, t].item(), old[b, t].item(), adv[b].item(), 0.2, 0.2
            )
            total += w * val
            assert close(logp.grad[b, t], w * grad / n, 1e-12)
    assert close(loss, total / n, 1e-12) and rollout.grad is None
    assert close(metrics["tis_weight_mean"], sum(weights) / n, 1e-12)
    # Over the cap among valid tokens: 3.0, 2.5 (the masked 4.0 does not count).
    assert close(metrics["tis_clip_frac"], 2 / 7, 1e-12)
    assert close(metrics["logp_mismatch"], sum(mismatch) / n, 1e-12)

    # tis_cap None or 0 switches the correction off but keeps the mismatch metric.
    plain, _ = grpo_loss(logp, old, adv, mask)
    for cap in (None, 0):
        off, off_metrics = grpo_loss(logp, old, adv, mask, rollout_logprobs_BT=rollout, tis_cap=cap)
        assert close(off, plain, 1e-12) and not close(off, loss, 1e-6)
        assert "tis_weight_mean" not in off_metrics and "logp_mismatch" in off_metrics


def test_grpo_ignores_garbage_on_padding():
    logp = torch.tensor([[-1.0, 80.0], [-0.5, -0.2]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.2, -90.0], [-0.4, -0.3]], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    loss, metrics = grpo_loss(
        logp, old, torch.tensor([1.0, -1.0]).double(), mask,
        beta=0.1, ref_logprobs_BT=old, rollout_logprobs_BT=old + 100,
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    assert all(math.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------------------- sft


def test_sft_loss_matches_loop():
    logp = (-torch.rand(4, 5, generator=torch.Generator().manual_seed(8)).double()).requires_grad_()
    loss, metrics = sft_loss(logp, MASK_BT)
    loss.backward()
    valid = [logp[b, t].item() for b in range(4) for t in range(5) if MASK_BT[b, t]]
    assert close(loss, -sum(valid) / len(valid), 1e-12)
    assert metrics["num_tokens"] == len(valid) and close(metrics["nll"], loss)
    torch.testing.assert_close(logp.grad, -MASK_BT.double() / len(valid))


# ---------------------------------------------------------------------------- all masked


def _all_masked_losses(logp, old, mask):
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for loss_fn in (grpo_loss, gspo_loss, cispo_loss):
        for mode in AGG_MODES:
            yield loss_fn(
                logp, old, adv, mask, beta=0.1, ref_logprobs_BT=old, rollout_logprobs_BT=old,
                loss_agg=mode, max_len=3,
            )  # fmt: skip
    yield sft_loss(logp, mask)


def test_all_masked_gives_finite_zero_with_grad_path():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    old = -torch.rand(2, 3, dtype=torch.float64)
    n = 0
    for loss, metrics in _all_masked_losses((old + 0.1).requires_grad_(), old, mask):
        n += 1
        assert loss.dim() == 0 and loss.item() == 0.0 and loss.requires_grad
        assert all(math.isfinite(v) for v in metrics.values())
        loss.backward()
    assert n == 10


@pytest.mark.parametrize("loss_fn", [grpo_loss, gspo_loss, cispo_loss])
def test_all_masked_grads_are_zero(loss_fn):
    mask = torch.zeros(2, 3, dtype=torch.bool)
    logp = (-torch.rand(2, 3, dtype=torch.float64)).requires_grad_()
    loss, _ = loss_fn(logp, logp.detach() - 0.5, torch.ones(2).double(), mask)
    loss.backward()
    assert (logp.grad == 0).all()


def test_selective_log_softmax_with_temperature_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 40, (3, 5))
    got = selective_log_softmax(logits, ids, chunk_size=4, temperature=0.7)
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_want,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g_got, g_want)
    # bf16 logits: the division happens after the fp32 upcast, so only the input rounding remains.
    x16 = logits.detach().to(torch.bfloat16)
    got16 = selective_log_softmax(x16, ids, temperature=0.7)
    ref16 = torch.log_softmax(x16.double() / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16.double(), ref16, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- GSPO and CISPO


def _policy_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 2
    # ratios on both sides of every clip range used below
    logp = (old + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    rollout = old + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.5
    ref = old + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.5, -0.7, -1.0, 0.8], dtype=torch.float64)
    return logp, old, rollout, ref, adv


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clip", [(3e-4, 4e-4), (0.05, 0.1)])
def test_gspo_matches_loop_values_and_grads(mode, clip):
    logp, old, rollout, ref, adv = _policy_inputs(61)
    beta, cap = 0.1, 1.3
    loss, metrics = gspo_loss(logp, old, adv, MASK_BT, clip_low=clip[0], clip_high=clip[1], beta=beta,
                              ref_logprobs_BT=ref, rollout_logprobs_BT=rollout, tis_cap=cap,
                              loss_agg=mode, max_len=6)
    loss.backward()
    # Reference: per sequence, s = geometric mean of token ratios; its gradient by autograd on a
    # separately written scalar formula, row by row.
    x = logp.detach().clone().requires_grad_()
    values, clipped = [], []
    for b in range(4):
        idx = [t for t in range(5) if MASK_BT[b, t]]
        if not idx:
            values.append([torch.zeros((), dtype=torch.float64)] * 5)
            continue
        s = torch.exp(sum(x[b, t] - old[b, t] for t in idx) / len(idx))
        w = min(math.exp(sum((old[b, t] - rollout[b, t]).item() for t in idx) / len(idx)), cap)
        a = adv[b].item()
        lo, hi = 1 - clip[0], 1 + clip[1]
        surr, clip_surr = s * a, torch.clamp(s, lo, hi) * a
        seq = -w * torch.minimum(surr, clip_surr)
        clipped.append(bool(clip_surr < surr))
        row = []
        for t in range(5):
            d = ref[b, t] - x[b, t]
            row.append(seq + beta * (torch.exp(d) - d - 1))
        values.append(row)
    ref_loss = ref_aggregate(values, MASK_BT.tolist(), mode, max_len=6)
    ref_loss.backward()
    assert close(loss, ref_loss, 1e-12)
    torch.testing.assert_close(logp.grad, x.grad, rtol=0, atol=1e-12)
    assert close(metrics["clip_frac"], sum(clipped) / len(clipped), 1e-12)


def test_gspo_on_policy_gradient_is_the_sequence_mean_of_token_gradients():
    # At ratio 1 (and w = 1), d loss / d logp_bt = -A_b / |y_b| / (number of sequences).
    logp, _, _, _, adv = _policy_inputs(62)
    loss, _ = gspo_loss(logp, logp.detach(), adv, MASK_BT)
    loss.backward()
    n_seq = MASK_BT.any(-1).sum()
    expected = torch.where(MASK_BT, -adv[:, None] / MASK_BT.sum(-1, keepdim=True).clamp(min=1) / n_seq, 0.0)
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_cispo_matches_loop_values_and_grads(mode):
    logp, old, rollout, ref, adv = _policy_inputs(63)
    lo, hi, beta, cap = 0.1, 0.15, 0.05, 1.4
    loss, metrics = cispo_loss(logp, old, adv, MASK_BT, clip_low=lo, clip_high=hi, beta=beta,
                               ref_logprobs_BT=ref, rollout_logprobs_BT=rollout, tis_cap=cap,
                               loss_agg=mode, max_len=6)
    loss.backward()
    values, grads, clipped = [], [], []
    for b in range(4):
        vrow, grow = [], []
        for t in range(5):
            lp, o = logp[b, t].item(), old[b, t].item()
            rho = math.exp(lp - o)
            weight = min(max(rho, 1 - lo), 1 + hi)
            w = min(math.exp(o - rollout[b, t].item()), cap)
            d = ref[b, t].item() - lp
            a = adv[b].item()
            vrow.append(-w * weight * a * lp + beta * (math.exp(d) - d - 1))
            # d/dlp: the clipped weight is a constant (stop-gradient); k3' = 1 - exp(d)
            grow.append(-w * weight * a + beta * (1 - math.exp(d)))
            if MASK_BT[b, t]:
                clipped.append(weight != rho)
        values.append(vrow)
        grads.append(grow)
    assert close(loss, ref_aggregate(values, MASK_BT.tolist(), mode, max_len=6), 1e-12)
    # The aggregation is linear: each token's gradient is its own scaled by its weight in the mean.
    unit = [[1.0 if m else 0.0 for m in row] for row in MASK_BT.tolist()]
    for b in range(4):
        for t in range(5):
            if not MASK_BT[b, t]:
                assert logp.grad[b, t] == 0
                continue
            one = [[1.0 if (i, j) == (b, t) else 0.0 for j in range(5)] for i in range(4)]
            share = ref_aggregate(one, MASK_BT.tolist(), mode, max_len=6)
            assert close(logp.grad[b, t], grads[b][t] * share, 1e-12)
    assert unit and close(metrics["clip_frac"], sum(clipped) / len(clipped), 1e-12)


def test_cispo_keeps_the_gradient_of_tokens_ppo_clips():
    # A token far above the clip range: PPO's min zeroes its gradient, CISPO keeps A * weight.
    logp = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=torch.float64)  # ratio e
    mask = torch.ones(1, 1, dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=torch.float64)
    grpo, _ = grpo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    (g_grpo,) = torch.autograd.grad(grpo, logp)
    cispo, _ = cispo_loss(logp, old, adv, mask, clip_low=1.0, clip_high=0.28)
    (g_cispo,) = torch.autograd.grad(cispo, logp)
    assert g_grpo.item() == 0.0 and close(g_cispo, -1.28, 1e-12)
