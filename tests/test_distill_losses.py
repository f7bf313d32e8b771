"""Every objective in rlkd.distill_losses against a brute-force Python loop over tiny tensors."""

import math

import pytest
import torch
from test_losses import MASK_BT, close, random_logits, ref_log_softmax

from rlkd.distill_losses import (
    forward_kl_loss,
    generalized_jsd_loss,
    minillm_loss,
    minillm_token_rewards,
    mix_teachers,
    mixed_next_token_logprobs,
    reverse_kl_loss,
    teacher_confidence_weights,
    teacher_mixed_weights,
    whiten,
)

# ---------------------------------------------------------------------------- references


def ref_kl(log_a, log_b):
    return sum(math.exp(a) * (a - b) for a, b in zip(log_a, log_b, strict=True))


def ref_token_divergence(student_row, teacher_row, kind, beta=0.5, temperature=1.0):
    log_q = ref_log_softmax([x / temperature for x in student_row])
    log_p = ref_log_softmax([x / temperature for x in teacher_row])
    if kind == "reverse":
        d = ref_kl(log_q, log_p)
    elif kind == "forward":
        d = ref_kl(log_p, log_q)
    else:
        q = [math.exp(x) for x in log_q]
        p = [math.exp(x) for x in log_p]
        log_m = [math.log(beta * pv + (1 - beta) * qv) for pv, qv in zip(p, q, strict=True)]
        d = (beta * ref_kl(log_p, log_m) + (1 - beta) * ref_kl(log_q, log_m)) / (beta * (1 - beta))
    return temperature**2 * d


def ref_divergence_loss(student, teacher, mask, kind, **kw):
    B, T, _ = student.shape
    vals = [
        ref_token_divergence(student[b, t].tolist(), teacher[b, t].tolist(), kind, **kw)
        for b in range(B)
        for t in range(T)
        if mask[b, t]
    ]
    return sum(vals) / max(len(vals), 1)


# ---------------------------------------------------------------------------- divergences


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(
    "kind,fn", [("reverse", reverse_kl_loss), ("forward", forward_kl_loss), ("jsd", None)]
)
def test_divergences_match_loop(kind, fn, temperature):
    student = random_logits(9, B=4, T=5).requires_grad_()
    teacher = random_logits(10, B=4, T=5).requires_grad_()
    if fn is None:
        loss, metrics = generalized_jsd_loss(student, teacher, MASK_BT, 0.3, temperature)
        ref = ref_divergence_loss(
            student, teacher, MASK_BT, kind, beta=0.3, temperature=temperature
        )
    else:
        loss, metrics = fn(student, teacher, MASK_BT, temperature)
        ref = ref_divergence_loss(student, teacher, MASK_BT, kind, temperature=temperature)
    assert close(loss, ref, 1e-6) and close(next(iter(metrics.values())), ref, 1e-6)
    loss.backward()
    assert teacher.grad is None  # teacher side is frozen
    assert student.grad.abs().sum() > 0 and (student.grad[~MASK_BT] == 0).all()


def test_reverse_kl_gradient_by_finite_differences():
    student = random_logits(11, B=2, T=2, V=5).requires_grad_()
    teacher = random_logits(12, B=2, T=2, V=5)
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    loss, _ = reverse_kl_loss(student, teacher, mask)
    loss.backward()
    eps = 1e-6
    for idx in [(0, 0, 1), (1, 1, 4), (0, 1, 2)]:
        bumped = student.detach().clone()
        bumped[idx] += eps
        fd = (ref_divergence_loss(bumped, teacher, mask, "reverse") - loss.item()) / eps
        assert close(student.grad[idx], fd, 1e-4)


def test_jsd_limits_are_forward_and_reverse_kl():
    student = random_logits(13, B=3, T=4)
    teacher = random_logits(14, B=3, T=4)
    mask = MASK_BT[:3, :4]
    fwd, _ = forward_kl_loss(student, teacher, mask, 1.5)
    rev, _ = reverse_kl_loss(student, teacher, mask, 1.5)
    assert not close(fwd, rev, 1e-3)
    jsd0, _ = generalized_jsd_loss(student, teacher, mask, beta=0.0, temperature=1.5)
    jsd1, _ = generalized_jsd_loss(student, teacher, mask, beta=1.0, temperature=1.5)
    assert close(jsd0, fwd, 1e-12) and close(jsd1, rev, 1e-12)
    # Continuous at the ends: the scaled mixture form approaches the exact limits.
    near0, _ = generalized_jsd_loss(student, teacher, mask, beta=1e-6, temperature=1.5)
    near1, _ = generalized_jsd_loss(student, teacher, mask, beta=1 - 1e-6, temperature=1.5)
    assert close(near0, fwd, 1e-4) and close(near1, rev, 1e-4)
    with pytest.raises(ValueError):
        generalized_jsd_loss(student, teacher, mask, beta=1.5)


@pytest.mark.parametrize("beta", [1e-5, 1 - 1e-5])
def test_jsd_near_limits_is_accurate_in_fp32(beta):
    # log m - log q formed naively cancels to ~1e-7 / beta in fp32; the log-ratio form must not.
    student = random_logits(22, B=2, T=4, V=7) * 2
    teacher = random_logits(23, B=2, T=4, V=7) * 2
    mask = torch.ones(2, 4, dtype=torch.bool)
    exact, _ = generalized_jsd_loss(student, teacher, mask, beta)
    s32 = student.float().requires_grad_()
    fp32, _ = generalized_jsd_loss(s32, teacher.float(), mask, beta)
    assert close(fp32, exact, 1e-5)
    s64 = student.clone().requires_grad_()
    generalized_jsd_loss(s64, teacher, mask, beta)[0].backward()
    fp32.backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=0, atol=1e-5)


def test_jsd_half_is_four_times_symmetric_jsd():
    student = random_logits(15, B=1, T=3)
    teacher = random_logits(16, B=1, T=3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, _ = generalized_jsd_loss(student, teacher, mask, beta=0.5)
    total = 0.0
    for t in range(3):
        p = [math.exp(x) for x in ref_log_softmax(teacher[0, t].tolist())]
        q = [math.exp(x) for x in ref_log_softmax(student[0, t].tolist())]
        m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
        total += 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m, strict=True))
        total += 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m, strict=True))
    assert close(loss, 4 * total / 3, 1e-10)


# ---------------------------------------------------------------------------- minillm rewards


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("length_norm", [True, False])
def test_minillm_token_rewards_match_loop(gamma, length_norm):
    g = torch.Generator().manual_seed(21)
    student = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    teacher = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    returns, metrics = minillm_token_rewards(
        student.requires_grad_(), teacher, MASK_BT, gamma=gamma, length_norm=length_norm
    )
    assert not returns.requires_grad
    rs = []
    for b in range(4):
        for t in range(5):
            if not MASK_BT[b, t]:
                assert returns[b, t] == 0
                continue
            total, count = 0.0, 0
            for s in range(t, 5):
                if MASK_BT[b, s]:
                    total += gamma ** (s - t) * (teacher[b, s].item() - student[b, s].item())
                    count += 1
            expected = total / count if length_norm else total
            assert close(returns[b, t], expected, 1e-6)
            rs.append(teacher[b, t].item() - student[b, t].item())
    assert close(metrics["token_reward_mean"], sum(rs) / len(rs), 1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("length_norm", [True, False])
def test_minillm_returns_from_next_token_match_loop(gamma, length_norm):
    g = torch.Generator().manual_seed(24)
    student = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    teacher = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    returns, _ = minillm_token_rewards(
        student, teacher, MASK_BT, gamma=gamma, length_norm=length_norm, from_next=True
    )
    for b in range(4):
        for t in range(5):
            total, count = 0.0, 0
            for s in range(t + 1, 5):
                if MASK_BT[b, s]:
                    total += gamma ** (s - t - 1) * (teacher[b, s].item() - student[b, s].item())
                    count += 1
            expected = (total / max(count, 1) if length_norm else total) if MASK_BT[b, t] else 0.0
            assert close(returns[b, t], expected, 1e-9), (b, t)


# ---------------------------------------------------------------------------- teacher mixing


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_mixed_next_token_logprobs_is_the_mixture(alpha):
    student = random_logits(30, B=1, T=3)[0]
    teacher = random_logits(31, B=1, T=3)[0]
    log_mix = mixed_next_token_logprobs(student, teacher, alpha)
    for n in range(3):
        q = [math.exp(x) for x in ref_log_softmax(student[n].tolist())]
        p = [math.exp(x) for x in ref_log_softmax(teacher[n].tolist())]
        for v in range(7):
            assert close(log_mix[n, v], math.log(alpha * p[v] + (1 - alpha) * q[v]), 1e-12)
    with pytest.raises(ValueError):
        mixed_next_token_logprobs(student, teacher, 1.5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_teacher_mixed_weights_match_loop(alpha):
    g = torch.Generator().manual_seed(25)
    student = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    teacher = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    w, metrics = teacher_mixed_weights(student, teacher, MASK_BT, alpha)
    ws = []
    for b in range(4):
        for t in range(5):
            q, p = math.exp(student[b, t].item()), math.exp(teacher[b, t].item())
            expected = q / (alpha * p + (1 - alpha) * q) if MASK_BT[b, t] else 0.0
            assert close(w[b, t], expected, 1e-12)
            if MASK_BT[b, t]:
                ws.append(expected)
    assert close(metrics["mix_weight_mean"], sum(ws) / len(ws), 1e-12)
    capped, _ = teacher_mixed_weights(student, teacher, MASK_BT, alpha, cap=1.0)
    assert (capped <= 1.0).all() and torch.equal(capped, w.clamp(max=1.0))


def test_teacher_mixed_weights_turn_mixture_samples_into_student_expectations():
    # Over the full vocabulary at one position: E_{v~p~}[w(v) f(v)] = E_{v~q}[f(v)] exactly,
    # i.e. the weights undo the teacher mixing in expectation.
    student, teacher = random_logits(32, B=1, T=1, V=11)[0], random_logits(33, B=1, T=1, V=11)[0]
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    alpha = 0.4
    w, _ = teacher_mixed_weights(log_q, log_p, torch.ones(1, 11, dtype=torch.bool), alpha)
    mix = mixed_next_token_logprobs(student, teacher, alpha).exp()
    f = torch.arange(11, dtype=torch.float64) ** 2
    assert close((mix * w * f).sum(), (log_q.exp() * f).sum(), 1e-12)
    assert not close((mix * f).sum(), (log_q.exp() * f).sum(), 1e-3)


# ---------------------------------------------------------------------------- minillm loss


def ref_minillm_loss(logp, old, returns, mask, clip_low, clip_high, w, kl, task_adv, task_coef, coef, v=None):
    """Scalar-by-scalar torch ops on the same leaves, so autograd gives reference gradients;
    v: the truncated importance weights of the policy-gradient term (1 if None)."""
    total, n = 0.0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logp[b, t] - old[b, t])
            a = returns[b, t] + task_coef * task_adv[b]
            vt = 1.0 if v is None else v[b, t]
            term = -w[b, t] * vt * torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
            if kl is not None:
                term = term + coef * w[b, t] * kl(b, t)
            total, n = total + term, n + 1
    return total / max(n, 1)


@pytest.mark.parametrize("single_step,tis", [(False, False), (True, False), (True, True)])
def test_minillm_loss_matches_loop_values_and_grads(single_step, tis):
    g = torch.Generator().manual_seed(26)
    logits = random_logits(27, B=4, T=5).requires_grad_()
    teacher = random_logits(28, B=4, T=5).requires_grad_()
    actions = torch.randint(0, 7, (4, 5), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    old = logp.detach() + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.3
    returns = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w = torch.rand(4, 5, generator=g, dtype=torch.float64) + 0.5
    task_adv = torch.randn(4, generator=g, dtype=torch.float64)
    kw = dict(clip_low=0.2, clip_high=0.28, weights_BT=w, task_advantages_B=task_adv,
              task_coef=0.5, single_step_coef=0.7)
    if single_step:
        kw.update(student_logits_NV=logits[MASK_BT], teacher_logits_NV=teacher[MASK_BT])
    v_ref = None
    if tis:
        # The sampler's logprobs, some far enough from old that the cap of 1.5 bites.
        rollout = old.detach() + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.6
        kw.update(rollout_logprobs_BT=rollout, tis_cap=1.5)
        v_ref = torch.exp(old.detach() - rollout).clamp(max=1.5)
    loss, metrics = minillm_loss(logp, old, returns, MASK_BT, **kw)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)

    def kl(b, t):
        log_q, log_p = torch.log_softmax(logits[b, t], -1), torch.log_softmax(teacher[b, t].detach(), -1)
        return (log_q.exp() * (log_q - log_p)).sum()

    ref = ref_minillm_loss(logp, old, returns, MASK_BT, 0.2, 0.28, w, kl if single_step else None,
                           task_adv, 0.5, 0.7, v=v_ref)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert close(loss, ref, 1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    assert (grad[~MASK_BT] == 0).all() and grad.abs().sum() > 0
    assert metrics["clip_frac"] > 0  # old was perturbed, so some ratios leave the clip range
    if single_step:
        expected_kl = sum(kl(b, t).item() for b in range(4) for t in range(5) if MASK_BT[b, t]) / MASK_BT.sum().item()
        assert close(metrics["single_step_kl"], expected_kl, 1e-12)
        assert teacher.grad is None
    if tis:
        assert 0 < metrics["tis_clip_frac"] < 1
        mismatch = (old.detach() - rollout).abs()[MASK_BT].mean().item()
        assert close(metrics["logp_mismatch"], mismatch, 1e-12)


def test_minillm_loss_on_policy_gradient_is_weighted_reinforce():
    # At ratio 1 the clip is inactive: d loss / d logp_t = -w_t A_t / N (Williams 1992).
    g = torch.Generator().manual_seed(29)
    logp = (-torch.rand(4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    returns = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w = torch.rand(4, 5, generator=g, dtype=torch.float64)
    loss, _ = minillm_loss(logp, logp.detach(), returns, MASK_BT, weights_BT=w)
    loss.backward()
    expected = torch.where(MASK_BT, -w * returns / MASK_BT.sum(), 0.0)
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


def _tabular_policy_sequences(vocab: int, max_len: int, eos: int = 0):
    """Every sequence of a tabular autoregressive policy: it ends at `eos` or at max_len tokens.
    Returns the sequences and, per sequence, the table row (its prefix's state) of each step."""
    prefixes, seqs = {(): 0}, []

    def grow(prefix):
        for v in range(vocab):
            y = prefix + (v,)
            if v == eos or len(y) == max_len:
                seqs.append(y)
            else:
                prefixes.setdefault(y, len(prefixes))
                grow(y)

    grow(())
    return seqs, [[prefixes[y[:t]] for t in range(len(y))] for y in seqs], len(prefixes)


@pytest.mark.parametrize("single_step", [False, True])
def test_minillm_estimator_is_unbiased_for_sequence_reverse_kl(single_step):
    # Exact enumeration of every sequence of a small tabular policy: the probability-weighted
    # sum of the per-sample MiniLLM gradient must equal the gradient of the sequence-level
    # reverse KL(q || p) = sum_y q(y) log(q(y) / p(y)), computed here from its definition.
    # (Token-mean normalisation is undone by the sequence's token count; length_norm is off.)
    seqs, rows, n_states = _tabular_policy_sequences(vocab=3, max_len=3)
    g = torch.Generator().manual_seed(41)
    theta = torch.randn(n_states, 3, generator=g, dtype=torch.float64, requires_grad=True)
    phi = 2 * torch.randn(n_states, 3, generator=g, dtype=torch.float64)  # the teacher's table

    def seq_logprob(table, y, r):
        return sum(torch.log_softmax(table[s], -1)[v] for s, v in zip(r, y, strict=True))

    log_q = torch.stack([seq_logprob(theta, y, r) for y, r in zip(seqs, rows, strict=True)])
    log_p = torch.stack([seq_logprob(phi, y, r) for y, r in zip(seqs, rows, strict=True)])
    assert close(log_q.exp().sum().item(), 1.0, 1e-12)
    kl = (log_q.exp() * (log_q - log_p)).sum()
    (expected,) = torch.autograd.grad(kl, theta)

    estimate = torch.zeros((), dtype=torch.float64)
    for y, r in zip(seqs, rows, strict=True):
        ids = torch.tensor([y])
        student_TV, teacher_TV = theta[r], phi[r]
        logp = torch.log_softmax(student_TV, -1).gather(1, ids.T).T
        teacher_lp = torch.log_softmax(teacher_TV, -1).gather(1, ids.T).T
        mask = torch.ones_like(ids, dtype=torch.bool)
        returns, _ = minillm_token_rewards(logp.detach(), teacher_lp, mask, gamma=1.0, length_norm=False,
                                           from_next=single_step)
        logits = dict(student_logits_NV=student_TV, teacher_logits_NV=teacher_TV) if single_step else {}
        loss, _ = minillm_loss(logp, logp.detach(), returns, mask, **logits)
        estimate = estimate + seq_logprob(theta, y, r).exp().detach() * len(y) * loss
    (got,) = torch.autograd.grad(estimate, theta)
    assert expected.abs().max() > 0.05  # a gradient worth matching
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------- multi-teacher


def test_mix_teachers_matches_loop_and_stays_normalised():
    g = torch.Generator().manual_seed(34)
    logits_K = torch.randn(3, 2, 4, 7, generator=g, dtype=torch.float64)
    log_p_K = torch.log_softmax(logits_K, -1)
    weights_KB = torch.softmax(torch.randn(3, 2, generator=g, dtype=torch.float64), 0)
    mixed = mix_teachers(log_p_K, weights_KB)
    assert mixed.shape == (2, 4, 7)
    for b in range(2):
        for t in range(4):
            for v in range(7):
                expected = sum(weights_KB[k, b].item() * log_p_K[k, b, t, v].exp().item() for k in range(3))
                assert close(mixed[b, t, v], math.log(expected), 1e-12)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(2, 4, dtype=torch.float64))
    # Sampled-token logprobs ([K, B, T]) mix the same way; one teacher with weight 1 is itself.
    tokens = mix_teachers(log_p_K[..., 3], weights_KB)
    torch.testing.assert_close(tokens, mixed[..., 3])
    one = mix_teachers(log_p_K[:1, ..., 3], torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(one, log_p_K[0, ..., 3])


def test_teacher_confidence_weights_match_loop():
    g = torch.Generator().manual_seed(35)
    logp_KBT = -torch.rand(2, 4, 5, generator=g, dtype=torch.float64) * 3
    w, metrics = teacher_confidence_weights(logp_KBT, MASK_BT, temperature=0.5)
    for b in range(4):
        valid = [t for t in range(5) if MASK_BT[b, t]]
        means = [sum(logp_KBT[k, b, t].item() for t in valid) / max(len(valid), 1) for k in range(2)]
        z = [math.exp(m / 0.5) for m in means]
        for k in range(2):
            assert close(w[k, b], z[k] / sum(z), 1e-12)
    assert close(w[:, 1].tolist()[0], 0.5)  # row 1 is all-masked: uniform
    assert close(metrics["teacher_weight_0"], w[0].mean(), 1e-12)


def test_whiten_matches_loop():
    g = torch.Generator().manual_seed(36)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3 - 2
    out = whiten(x, MASK_BT)
    vals = [x[b, t].item() for b in range(4) for t in range(5) if MASK_BT[b, t]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    for b in range(4):
        for t in range(5):
            expected = (x[b, t].item() - mean) / (std + 1e-8) if MASK_BT[b, t] else 0.0
            assert close(out[b, t], expected, 1e-12)


# ---------------------------------------------------------------------------- all masked


def test_all_masked_gives_finite_zero_with_grad_path():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    logits = random_logits(18, B=2, T=3).requires_grad_()
    teacher = random_logits(17, B=2, T=3)
    logp = torch.log_softmax(logits, -1)[..., 0]
    losses = [reverse_kl_loss(logits, teacher, mask), forward_kl_loss(logits, teacher, mask)]
    losses += [generalized_jsd_loss(logits, teacher, mask, beta) for beta in (0.0, 0.5, 1.0)]
    losses.append(minillm_loss(logp, logp.detach() - 0.3, torch.ones(2, 3), mask,
                               weights_BT=torch.ones(2, 3), student_logits_NV=logits[mask],
                               teacher_logits_NV=teacher[mask], task_advantages_B=torch.ones(2),
                               rollout_logprobs_BT=logp.detach(), tis_cap=2.0,
                               task_coef=1.0))
    for loss, metrics in losses:
        assert loss.dim() == 0 and loss.item() == 0.0 and loss.requires_grad
        assert all(math.isfinite(v) for v in metrics.values())
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        assert (grad == 0).all()


def test_all_masked_rewards_and_weights_are_zero():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    logp = -torch.rand(2, 3, dtype=torch.float64)
    for from_next in (False, True):
        rewards, metrics = minillm_token_rewards(logp, logp - 1, mask, from_next=from_next)
        assert (rewards == 0).all() and all(math.isfinite(v) for v in metrics.values())
    w, metrics = teacher_mixed_weights(logp, logp - 1, mask, 0.2)
    assert (w == 0).all() and all(math.isfinite(v) for v in metrics.values())
    assert (whiten(logp, mask) == 0).all()
    weights, _ = teacher_confidence_weights(torch.stack([logp, logp - 1]), mask)
    torch.testing.assert_close(weights, torch.full((2, 2), 0.5, dtype=torch.float64))
