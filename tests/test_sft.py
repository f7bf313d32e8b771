"""SFT: data building, prompt masking and packing, on the real DeepSpeed learner (tiny Llama)."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.actors.learner import Learner
from rlkd.compose import load_config
from rlkd.errors import ConfigError
from rlkd.losses import selective_log_softmax, sft_loss
from rlkd.packing import collate, collate_packed
from rlkd.tasks.sft import batches, read_dataset, sft_examples, tokenize
from rlkd.types import TrainBatch
from tests.conftest import GSM8K_DIR
from tests.test_learner import tiny_model  # noqa: F401  (module fixture)


def _batch(n=7, seed=0) -> TrainBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 64) for _ in range(rng.randrange(2, 9))] for _ in range(n)]
    comps = [[rng.randrange(1, 64) for _ in range(rng.randrange(1, 12))] for _ in range(n)]
    return TrainBatch(prompts, comps, [[0.0] * len(c) for c in comps], [0.0] * n)


def _brute_nll(model, batch: TrainBatch) -> torch.Tensor:
    """Token-mean NLL of completion tokens, one unpadded sequence at a time."""
    total, tokens = 0.0, 0
    for p, c in zip(batch.prompt_ids, batch.completion_ids, strict=True):
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), -1)[torch.arange(len(p) + len(c) - 1), ids[0, 1:]]
        total = total - logp[len(p) - 1:].sum()  # completion targets only
        tokens += len(c)
    return total / tokens


def _learner(path, *overrides) -> Learner:
    cfg = load_config("sft_gsm8k", ["learner.lr=1e-3", "learner.warmup_steps=0", *overrides])
    return Learner(cfg, path, master_port=29741)


def test_collate_packed_layout():
    b = TrainBatch([[1, 2], [3, 4, 5], [6]], [[7], [8, 9], [10, 11]], [[0.0]] * 3, [0.0] * 3)
    t = collate_packed(b, row_len=8)
    # First-fit decreasing: the 5-token sequence opens row 0 and the first 3-token one fills it
    # to 8; the other 3-token one opens row 1.
    assert t["input_ids_BL"].tolist() == [[3, 4, 5, 8, 9, 1, 2, 7], [6, 10, 11, 0, 0, 0, 0, 0]]
    assert t["position_ids_BL"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4]]
    # Targets: 8, 9 (positions 2, 3) and 7 (position 6); 10, 11 (positions 0, 1). The last token
    # of a sequence never predicts the next sequence's first.
    assert t["mask_BT"].tolist() == [[0, 0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="does not fit a packed row of 4"):
        collate_packed(b, row_len=4)


def test_packed_rows_score_exactly_like_separate_sequences(tiny_model):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    batch = _batch()
    padded, packed = collate(batch), collate_packed(batch, row_len=40)
    assert len(packed["input_ids_BL"]) < len(batch)  # really packed
    with torch.no_grad():
        lp_pad = selective_log_softmax(model(input_ids=padded["input_ids_BL"], attention_mask=padded["attn_BL"]).logits[:, :-1],
                                       padded["input_ids_BL"][:, 1:])
        lp_pack = selective_log_softmax(model(input_ids=packed["input_ids_BL"], position_ids=packed["position_ids_BL"],
                                              use_cache=False).logits[:, :-1],
                                        packed["input_ids_BL"][:, 1:])
    # Pair every scored token with its sequence: a padded row is its sequence; in the packed
    # rows each sequence is found where position_ids restart and its token ids follow (once).
    seqs = [p + c for p, c in zip(batch.prompt_ids, batch.completion_ids, strict=True)]
    a = {i: lp_pad[i][padded["mask_BT"][i].bool()].tolist() for i in range(len(seqs))}
    rows, starts = packed["input_ids_BL"].tolist(), packed["position_ids_BL"] == 0
    b = {}
    for i, seq in enumerate(seqs):
        (row, s0), = [(r, j) for r, ids in enumerate(rows) for j in range(len(ids) - len(seq) + 1)
                      if starts[r, j] and ids[j:j + len(seq)] == seq]
        span = slice(s0, s0 + len(seq) - 1)
        b[i] = lp_pack[row, span][packed["mask_BT"][row, span].bool()].tolist()
    for i, c in enumerate(batch.completion_ids):
        assert len(a[i]) == len(b[i]) == len(c), i
        torch.testing.assert_close(torch.tensor(a[i]), torch.tensor(b[i]), atol=1e-5, rtol=1e-5, msg=f"sequence {i}")


def test_sft_step_is_prompt_masked_nll_and_packing_or_micro_batching_change_nothing(tiny_model):  # noqa: F811
    batch = _batch()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = _brute_nll(reference, batch)
    # The same step by hand: plain AdamW on the brute-force loss.
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    expected.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    opt.step()
    results = {}
    for name, mbs, pack in [("full", 8, 0), ("micro", 3, 0), ("packed", 1, 24)]:
        learner = _learner(tiny_model, f"learner.micro_batch_size={mbs}")
        before = learner.eval_loss(batch)
        m = learner.sft_step(batch, pack)
        assert m["train/loss"] == pytest.approx(expected.item(), rel=1e-5), name
        assert before == pytest.approx(expected.item(), rel=1e-5), name
        assert learner.eval_loss(batch) < before
        results[name] = dict(learner.engine.module.named_parameters())
    for name, p in reference.named_parameters():
        for variant, params in results.items():
            torch.testing.assert_close(params[name], p, atol=2e-6, rtol=1e-5, msg=f"{variant}: {name}")


def test_prompt_targets_get_zero_gradient():
    # Through collate's mask and sft_loss: d loss / d logprob is exactly 0 at every prompt
    # target and padding position, and -1/N at each of the N completion targets.
    batch = _batch()
    t = collate(batch)
    logprobs_BT = torch.randn(t["mask_BT"].shape, requires_grad=True)
    loss, _ = sft_loss(logprobs_BT, t["mask_BT"])
    loss.backward()
    n = sum(len(c) for c in batch.completion_ids)
    for i, (p, c) in enumerate(zip(batch.prompt_ids, batch.completion_ids, strict=True)):
        expected = [0.0] * (len(p) - 1) + [-1.0 / n] * len(c)
        expected += [0.0] * (logprobs_BT.shape[1] - len(expected))
        torch.testing.assert_close(logprobs_BT.grad[i], torch.tensor(expected), atol=0, rtol=0, msg=f"row {i}")


def test_sft_examples_targets_and_tokenize():
    cfg = load_config("sft_gsm8k", [f"data.path={GSM8K_DIR}", "sft.num_examples=3"])
    cot = sft_examples(cfg)
    assert len(cot) == 3 and cot[0].target.endswith("#### 72") and "<<" not in cot[0].target
    ans = sft_examples(load_config("sft_gsm8k", [f"data.path={GSM8K_DIR}", "sft.num_examples=3",
                                                "sft.target=answer_only"]))
    assert ans[0].target == "#### 72"
    from rlkd.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    batch, dropped = tokenize(cot, tok, cfg)
    assert dropped == 0 and len(batch) == 3
    assert batch.completion_ids[0][-1] == tok.eos_token_id
    assert tok.decode(batch.prompt_ids[0]).endswith("<|im_start|>assistant\n")
    short = load_config("sft_gsm8k", [f"data.path={GSM8K_DIR}", "sft.max_seq_len=120"])
    batch, dropped = tokenize(cot, tok, short)
    assert dropped >= 1 and len(batch) + dropped == 3


def test_batches_drop_ragged_tail_and_reshuffle_each_epoch():
    plan = batches(10, 4, 2, seed=0)
    assert [len(b) for b in plan] == [4, 4, 4, 4]
    assert plan[0] != plan[2] and plan == batches(10, 4, 2, seed=0)


def test_read_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_dataset(str(tmp_path / "missing.jsonl"))
    p = tmp_path / "kept.jsonl"
    p.write_text(json.dumps({"id": "a", "question": "q", "gold": "1", "text": "t"}) + "\n"
                 + json.dumps({"id": "b", "question": "q", "gold": "1"}) + "\n")
    with pytest.raises(ConfigError, match=r"kept.jsonl:2: missing field\(s\) text"):
        read_dataset(str(tmp_path))
