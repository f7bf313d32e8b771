"""The GRPO learner step against a from-scratch reference written in this file.

The reference scores every [prompt, completion] row on its own with a plain transformers forward
(no packing, no shared prompts, no skipping), writes the clipped surrogate, the truncated
importance weight, the k3 penalty and the three aggregations out by hand, and takes one plain
`torch.optim.AdamW` step per mini-batch. The learner (real DeepSpeed, gloo, CPU) must match its
loss, its gradient norm and its parameters after the step, with every learner path on and off.
"""

import math
import random

import pytest
import torch
from test_learner import tiny_model  # noqa: F401  (a fixture)
from transformers import LlamaForCausalLM

from rlkd.actors.learner import Learner
from rlkd.compose import load_config
from rlkd.types import TrainBatch

GROUP, PROMPTS = 4, 2
LR, WD, MAX_LEN = 1e-3, 0.05, 16


def make_batch(rewards: list[float], scale: str, seed: int = 0) -> TrainBatch:
    """Two groups of four completions; each group shares one prompt; one completion is empty."""
    rng = random.Random(seed)
    prompts, comps = [], []
    for _ in range(PROMPTS):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randrange(3, 9))]
        for _ in range(GROUP):
            prompts.append(list(prompt))
            comps.append([rng.randrange(1, 64) for _ in range(rng.randrange(1, 12))])
    comps[2] = []
    advantages = []
    centred = []
    for g in range(PROMPTS):
        r = rewards[g * GROUP:(g + 1) * GROUP]
        mu = sum(r) / GROUP
        centred.append([x - mu for x in r])
    flat = [c for grp in centred for c in grp]
    batch_std = math.sqrt(sum(c * c for c in flat) / len(flat) - (sum(flat) / len(flat)) ** 2)
    for grp in centred:
        std = math.sqrt(sum(c * c for c in grp) / GROUP)
        for c in grp:
            advantages.append({"group": c / (std + 1e-6), "none": c, "batch": c / (batch_std + 1e-6)}[scale])
    return TrainBatch(prompts, comps, [[-rng.random() * 4 for _ in c] for c in comps], advantages)


def with_tool_spans(batch: TrainBatch, seed: int = 1) -> TrainBatch:
    """Multi-turn rows: a span of 'tool tokens' inside most completions (mask 0, rollout logprob
    0.0 as the episode loop writes it, which would be a huge importance weight if read)."""
    rng = random.Random(seed)
    masks = []
    for c, lps in zip(batch.completion_ids, batch.rollout_logprobs, strict=True):
        mask = [1] * len(c)
        if len(c) >= 3 and rng.random() < 0.8:
            a = rng.randrange(1, len(c) - 1)
            b = rng.randrange(a + 1, len(c))
            mask[a:b] = [0] * (b - a)
            lps[a:b] = [0.0] * (b - a)
        masks.append(mask)
    batch.loss_masks = masks
    return batch


def reference_step(path: str, batch: TrainBatch, *, agg: str, beta: float, temperature: float,
                   epochs: int, minis: int, seed: int, clip=(0.2, 0.28), tis_cap=2.0, loss_kind="grpo",
                   lora=None, repeats=1):
    """(mean loss over the last step's optimizer steps, grad norm of the last one, parameters
    after). `lora=(adapters, scaling)`, adapters {linear layer name: (A [r, in], B [out, r])}:
    only A and B train, the policy's weights are W + scaling B A, the reference is the plain
    model. `repeats` on-policy steps on the same batch share one optimizer."""
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).requires_grad_(False)
    if lora is None:
        trainable, policy = list(model.parameters()), model

        def weights():
            return dict(model.named_parameters())
    else:
        model.requires_grad_(False)
        leaves = {n: (a.clone().requires_grad_(), b.clone().requires_grad_()) for n, (a, b) in lora[0].items()}
        trainable = [t for ab in leaves.values() for t in ab]

        def weights():
            w = dict(model.named_parameters())
            for n, (a, b) in leaves.items():
                w[f"{n}.weight"] = w[f"{n}.weight"] + lora[1] * b @ a
            return w

        def policy(input_ids):
            return torch.func.functional_call(model, weights(), (), {"input_ids": input_ids})
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WD)

    def sampled(i, values):
        """Only the tokens the policy sampled: tool tokens are not actions."""
        if not batch.loss_masks:
            return values
        return values[torch.tensor(batch.loss_masks[i], dtype=torch.bool)]

    def row_logprobs(m, i):
        p, c = batch.prompt_ids[i], batch.completion_ids[i]
        logits = m(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].double() / temperature
        return sampled(i, torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0])

    n = len(batch)
    on_policy = epochs == 1 and minis == 1
    assert on_policy or repeats == 1
    with torch.no_grad():
        frozen = {i: row_logprobs(policy, i) for i in range(n) if batch.completion_ids[i]}
        ref = {i: row_logprobs(reference, i) for i in range(n) if batch.completion_ids[i]}
    gen = torch.Generator().manual_seed(seed)
    orders = [list(range(n)) if on_policy else torch.randperm(n, generator=gen).tolist()
              for _ in range(epochs * repeats)]
    size = n // minis
    losses, grad_norm = [], None
    for order in orders:
        for m0 in range(0, n, size):
            rows = [i for i in order[m0:m0 + size] if batch.completion_ids[i]]
            per_row = []
            for i in rows:
                lp = row_logprobs(policy, i)
                old = lp.detach() if on_policy else frozen[i]
                ratio = torch.exp(lp - old)
                a = batch.advantages[i]
                log_w = old - sampled(i, torch.tensor(batch.rollout_logprobs[i], dtype=torch.float64))
                d = ref[i] - lp
                k3 = beta * (torch.exp(d) - d - 1)
                if loss_kind == "grpo":  # PPO clip per token
                    surr = torch.minimum(ratio * a, ratio.clamp(1 - clip[0], 1 + clip[1]) * a)
                    per_row.append(-log_w.exp().clamp(max=tis_cap) * surr + k3)
                elif loss_kind == "gspo":  # one geometric-mean ratio per sequence, on every token
                    s = torch.exp((lp - old).mean())
                    surr = torch.minimum(s * a, s.clamp(1 - clip[0], 1 + clip[1]) * a)
                    per_row.append(-log_w.mean().exp().clamp(max=tis_cap) * surr * torch.ones_like(lp) + k3)
                else:  # cispo: a clipped, constant weight times log p
                    weight = ratio.detach().clamp(1 - clip[0], 1 + clip[1])
                    per_row.append(-log_w.exp().clamp(max=tis_cap) * weight * a * lp + k3)
            if agg == "token_mean":
                loss = torch.cat(per_row).sum() / sum(len(x) for x in per_row)
            elif agg == "seq_mean_token_mean":
                loss = sum(x.mean() for x in per_row) / len(per_row)
            else:
                loss = sum(x.sum() / MAX_LEN for x in per_row) / len(per_row)
            opt.zero_grad()
            loss.backward()
            grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainable)).item()
            opt.step()
            losses.append(loss.item())
    last = losses[-epochs * minis:]
    return sum(last) / len(last), grad_norm, {k: v.detach() for k, v in weights().items()}


def learner_overrides(agg, beta, temperature, epochs, minis, budget, shared, loss="grpo", clip=(0.2, 0.28)):
    return [f"grpo.loss={loss}", f"grpo.clip_low={clip[0]}", f"grpo.clip_high={clip[1]}",f"grpo.group_size={GROUP}", f"grpo.prompts_per_step={PROMPTS}", f"grpo.loss_agg={agg}",
            f"grpo.beta={beta}", f"rollout.temperature={temperature}", f"grpo.ppo_epochs={epochs}",
            f"grpo.mini_batches={minis}", f"learner.max_tokens_per_micro_batch={budget}",
            f"grpo.shared_prompt={str(shared).lower()}", f"learner.lr={LR}", f"learner.weight_decay={WD}",
            "learner.max_grad_norm=1e9", "learner.dtype=float32", f"rollout.max_new_tokens={MAX_LEN}"]


def assert_matches(metrics, params, expected):
    loss, grad_norm, ref_params = expected
    assert metrics["train/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert metrics["train/grad_norm"] == pytest.approx(grad_norm, rel=1e-4, abs=1e-7)
    for name, value in ref_params.items():
        # Adam divides by |g|: an element with a near-zero gradient amplifies fp32 noise, so the
        # parameters get 1% of the learning rate; the grad norm above catches scale errors.
        torch.testing.assert_close(params[name], value, atol=LR * 1e-2, rtol=1e-5, msg=name)


VARIED = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0]  # group 1 has no reward variance: zero signal
CASES = {
    # name: (rewards, scale, agg, beta, temperature, epochs, minis, budget, shared)
    "token_mean-one-micro-batch-shared": (VARIED, "group", "token_mean", 0.0, 1.0, 1, 1, 2048, True),
    "seq_mean-packed-unshared-T0.7": (VARIED, "none", "seq_mean_token_mean", 0.0, 0.7, 1, 1, 24, False),
    "sum_norm-beta-reference-shared": (VARIED, "batch", "seq_mean_token_sum_norm", 0.1, 1.0, 1, 1, 30, True),
    "token_mean-epochs-minibatches-T0.7": (VARIED, "group", "token_mean", 0.0, 0.7, 2, 2, 16, True),
    "all-zero-signal": ([0.5] * 8, "group", "token_mean", 0.0, 1.0, 1, 1, 2048, True),
    # The other objectives off the on-policy point (two epochs, two mini-batches), where their
    # ratios and clips matter, packed and shared.
    "gspo-seq_mean-epochs-packed": (VARIED, "group", "seq_mean_token_mean", 0.0, 0.7, 2, 2, 24, True,
                                    "gspo", (0.003, 0.004)),
    "cispo-token_mean-epochs-beta": (VARIED, "none", "token_mean", 0.1, 1.0, 2, 2, 16, True,
                                     "cispo", (1.0, 0.01)),
    # Multi-turn rows (with_tool_spans): tool tokens out of the loss, ratios, KL and denominator.
    "tools-token_mean-beta-packed": (VARIED, "group", "token_mean", 0.1, 0.7, 1, 1, 24, True),
    "tools-gspo-seq_mean-epochs": (VARIED, "group", "seq_mean_token_mean", 0.0, 1.0, 2, 2, 2048, True,
                                   "gspo", (0.003, 0.004)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_learner_step_equals_from_scratch_reference(tiny_model, case):  # noqa: F811
    rewards, scale, agg, beta, temperature, epochs, minis, budget, shared, *objective = CASES[case]
    loss_kind, clip = objective or ("grpo", (0.2, 0.28))
    batch = make_batch(rewards, scale)
    if case.startswith("tools-"):
        batch = with_tool_spans(batch)
    cfg = load_config(None, learner_overrides(agg, beta, temperature, epochs, minis, budget, shared,
                                                      loss_kind, clip))
    learner = Learner(cfg, tiny_model, master_port=29741)
    before = {k: v.detach().clone() for k, v in learner.engine.module.named_parameters()}
    metrics = learner.train_step(batch)
    params = {k: v.detach() for k, v in learner.engine.module.named_parameters()}
    learner.close()
    assert_matches(metrics, params, reference_step(tiny_model, batch, agg=agg, beta=beta, temperature=temperature,
                                                   epochs=epochs, minis=minis, seed=cfg.run.seed, clip=clip,
                                                   loss_kind=loss_kind))
    unscored = sum(1 for a, c in zip(batch.advantages, batch.completion_ids, strict=True)
                   if not c or (beta == 0 and a == 0))
    assert metrics["train/skipped_rows_frac"] == pytest.approx(unscored / len(batch))
    if budget < 2048:
        assert metrics["train/micro_batches"] > epochs * minis  # the packing path really split
    # The step moved the weights (AdamW weight decay moves them on a zero gradient too).
    assert any(not torch.equal(before[k], params[k]) for k in before)
