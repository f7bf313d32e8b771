"""rollout.max_staleness: the schedule of rollouts generated ahead, resumed from a checkpoint's
pending rollouts, the staleness metrics and the off-policy objective the learner applies.

The schedule is checked against the rule written out independently (step m is sampled by weights
v(max(m - 1 - k, 0))), by driving RolloutsAhead as the GRPO driver does: take, start ahead,
train (the version goes up), settle, sync."""

import math
import threading

import pytest
import torch

from rlkd.losses import grpo_loss
from rlkd.offpolicy import RolloutsAhead, staleness_metrics


class Policy:
    """The rollout actors' weights version and the order steps were generated in."""

    def __init__(self):
        self.version, self.produced, self.threads = 0, [], set()

    def produce(self, step):
        self.produced.append(step)
        self.threads.add(threading.current_thread().name)
        return {"step": step, "version": self.version}


def drive(k, last, first=1, pending=None, policy=None, stop_after=None):
    """The GRPO driver's use of RolloutsAhead; returns (trained rollouts, pending at the end)."""
    policy = policy or Policy()
    ahead = RolloutsAhead(policy.produce, k, last, pending)
    trained = []
    try:
        for step in range(first, last + 1):
            ro = ahead.take(step)
            ahead.start_ahead(step)
            trained.append((step, ro["version"], policy.version))  # trained by weights v(step - 1)
            ahead.settle()
            policy.version = step  # the sync after the update
            if step == stop_after:
                return trained, ahead.pending(), policy
    finally:
        ahead.close()
    return trained, ahead.pending(), policy


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_every_step_is_sampled_by_the_weights_k_versions_back(k):
    trained, pending, policy = drive(k, last=9)
    assert [s for s, _, _ in trained] == list(range(1, 10))
    assert policy.produced == list(range(1, 10)), "each step generated once, in order"
    for step, sampled_by, trained_by in trained:
        assert trained_by == step - 1
        assert sampled_by == max(step - 1 - k, 0), (step, sampled_by)
        assert trained_by - sampled_by == min(k, step - 1) <= k
    assert pending == {}, "nothing generated past the last step"
    # k = 0 generates on the driver's own thread; k > 0 generates ahead on the background one.
    assert (policy.threads == {threading.main_thread().name}) == (k == 0)


@pytest.mark.parametrize("k", [1, 2])
def test_resume_from_pending_rollouts_trains_what_the_straight_run_trains(k):
    straight, _, _ = drive(k, last=8)
    first_part, pending, policy = drive(k, last=8, stop_after=4)
    assert sorted(pending) == list(range(5, 5 + k)), "a checkpoint holds the k steps generated ahead"
    resumed_policy = Policy()
    resumed_policy.version = policy.version  # the checkpoint's weights, synced on resume
    rest, _, _ = drive(k, last=8, first=5, pending=pending, policy=resumed_policy)
    assert first_part + rest == straight
    assert resumed_policy.produced == list(range(5 + k, 9)), "steps in the checkpoint are not generated again"


def test_an_error_in_background_generation_is_raised_at_settle():
    def produce(step):
        if step == 3:
            raise RuntimeError("engine died at step 3")
        return step

    ahead = RolloutsAhead(produce, 2, 10)
    assert ahead.take(1) == 1
    ahead.start_ahead(1)  # steps 2 and 3
    with pytest.raises(RuntimeError, match="engine died at step 3"):
        ahead.settle()
    ahead.close()
    with pytest.raises(ValueError, match="rollout.max_staleness=-1"):
        RolloutsAhead(produce, -1, 10)


def test_staleness_metrics():
    m = staleness_metrics([3, 3, 2, 2, 2, 4], learner_version=4, k=2, tokens_N=[10, 10, 5, 5, 5, 20])
    assert m["offpolicy/staleness_mean"] == (1 + 1 + 2 + 2 + 2 + 0) / 6
    assert m["offpolicy/staleness_max"] == 2.0
    assert (m["offpolicy/age_0_frac"], m["offpolicy/age_1_frac"], m["offpolicy/age_2_frac"]) == (1 / 6, 2 / 6, 3 / 6)
    assert m["offpolicy/token_frac"] == 35 / 55
    with pytest.raises(RuntimeError, match="3 weight versions behind .* rollout.max_staleness=2"):
        staleness_metrics([1], learner_version=4, k=2, tokens_N=[1])
    with pytest.raises(RuntimeError, match="-1 weight versions"):  # newer than the learner: a bug too
        staleness_metrics([5], learner_version=4, k=2, tokens_N=[1])


def test_the_learner_applies_the_decoupled_off_policy_objective():
    """AReaL's decoupled PPO (Fu et al. 2025) with a truncated weight, from its definition: over
    tokens sampled by a behaviour policy k versions old, with the proximal policy the learner's
    weights before the update,
        J = mean_t  min(pi_prox / pi_behav, cap) * min(r A, clip(r, 1 - e_lo, 1 + e_hi) A),
        r = pi_theta / pi_prox,
    and the loss -J. Probabilities here, not logs, so this is not grpo_loss's own arithmetic."""
    p_behav = [[0.50, 0.10, 0.30], [0.05, 0.60, 0.20]]  # the stale sampler's token probabilities
    p_prox = [[0.40, 0.35, 0.30], [0.30, 0.50, 0.25]]
    p_theta = [[0.45, 0.30, 0.42], [0.33, 0.40, 0.25]]
    adv, cap, lo, hi = [1.5, -0.5], 2.0, 0.2, 0.28
    valid = [[1, 1, 1], [1, 1, 0]]
    J, n = 0.0, sum(map(sum, valid))
    for b in range(2):
        for t in range(3):
            if valid[b][t]:
                w = min(p_prox[b][t] / p_behav[b][t], cap)
                r = p_theta[b][t] / p_prox[b][t]
                J += w * min(r * adv[b], min(max(r, 1 - lo), 1 + hi) * adv[b]) / n

    def log(p):
        return torch.tensor(p, dtype=torch.float64).log()

    loss, _ = grpo_loss(log(p_theta), log(p_prox), torch.tensor(adv, dtype=torch.float64),
                        torch.tensor(valid, dtype=torch.bool), clip_low=lo, clip_high=hi,
                        rollout_logprobs_BT=log(p_behav), tis_cap=cap)
    assert math.isclose(loss.item(), -J, rel_tol=1e-12)
