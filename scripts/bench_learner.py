"""Learner throughput: rlkd's DeepSpeed `Learner.train_step` vs a plain PyTorch loop, same batch.

    python scripts/bench_learner.py [--rows 16 --completion-tokens 128 --steps 3] [--quick]

One fixed GRPO batch: `--rows` real GSM8K prompts (rlkd's chat template) each followed by
`--completion-tokens` random token ids, with random advantages and rollout logprobs. Both sides
start from the same weights (the embedded SmolLM2-135M-Instruct) and do, per step, the same
work: micro-batches of `learner.micro_batch_size` rows through `rlkd.learner.collate`, token
logprobs via `rlkd.losses.selective_log_softmax`, `rlkd.losses.grpo_loss` with rlkd's defaults
(token mean, clip 0.2/0.28, TIS cap 2), gradient accumulation over the batch, gradient clipping
at 1.0 and one AdamW step (lr 1e-6, no weight decay).
  rlkd:  `rlkd.learner.Learner` in this process (DeepSpeed engine, ZeRO stage from
         learner.deepspeed_config, gloo on CPU / NCCL on GPU), `train_step(batch)`;
  plain: the model, `torch.optim.AdamW` and `clip_grad_norm_`, nothing else.
Steps alternate (rlkd, plain, rlkd, ...) so a change in machine load hits both sides alike; the
first --warmup steps of each are not timed. Tokens/s counts every token of every row (prompt and
completion: what the forward pass processes); the ratio rlkd/plain is the DeepSpeed overhead.
Trailing key=value arguments are rlkd config overrides (e.g. learner.deepspeed_config=...).
"""

from __future__ import annotations

import random
import time

import torch
from bench_common import free_port, gsm8k_prompts, on_gpu, parser, print_table, target, write_result
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.compose import load_config
from rlkd.learner import DTYPES, Learner, TrainBatch, collate
from rlkd.losses import grpo_loss, selective_log_softmax
from rlkd.models import resolve_model


def fixed_batch(tokenizer, data_dir, rows: int, completion_tokens: int) -> TrainBatch:
    prompts, _ = gsm8k_prompts(tokenizer, data_dir, rows)
    rng = random.Random(0)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    vocab = len(tokenizer)
    completions = [[rng.randrange(vocab) for _ in range(completion_tokens)] for _ in range(rows)]
    logprobs = [[-rng.random() * 3 for _ in range(completion_tokens)] for _ in range(rows)]
    return TrainBatch(prompt_ids, completions, logprobs, [rng.gauss(0, 1) for _ in range(rows)])


class PlainLoop:
    """The same GRPO update written as a bare PyTorch training loop."""

    def __init__(self, cfg, model_path: str, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.learner.dtype]).to(device)
        self.model.config.use_cache = False
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.learner.lr,
                                     weight_decay=cfg.learner.weight_decay, fused=device.type == "cuda")

    def train_step(self, batch: TrainBatch) -> None:
        g, mbs = self.cfg.grpo, self.cfg.learner.micro_batch_size
        total_tokens = float(sum(len(c) for c in batch.completion_ids))
        for start in range(0, len(batch), mbs):
            idx = list(range(start, min(start + mbs, len(batch))))
            t = collate(batch.select(idx))
            ids_BL = t["input_ids_BL"].to(self.device)
            logits_BLV = self.model(input_ids=ids_BL, attention_mask=t["attn_BL"].to(self.device)).logits
            logprobs_BT = selective_log_softmax(logits_BLV[:, :-1], ids_BL[:, 1:])
            loss, _ = grpo_loss(
                logprobs_BT, logprobs_BT.detach(), t["advantages_B"].to(self.device),
                t["mask_BT"].to(self.device), clip_low=g.clip_low, clip_high=g.clip_high,
                beta=0.0, rollout_logprobs_BT=t["rollout_logprobs_BT"].to(self.device),
                tis_cap=g.tis_cap or None, loss_agg=g.loss_agg.value, max_len=self.cfg.rollout.max_new_tokens)
            share = sum(len(batch.completion_ids[i]) for i in idx) / total_tokens
            (loss * share).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.learner.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    p = parser("bench_learner", __doc__)
    p.add_argument("--rows", type=int, default=16, help="sequences per batch (a GRPO rollout batch)")
    p.add_argument("--completion-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("overrides", nargs="*", help="rlkd config overrides, key=value")
    args = p.parse_args()
    if args.quick:
        args.rows, args.completion_tokens, args.steps, args.warmup = 4, 16, 1, 1
    gpu = on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    extra = ["learner.dtype=bfloat16", "rollout.dtype=bfloat16"] if gpu else []
    # grpo sizes make the learner's mini-batch exactly the benchmark batch.
    cfg = load_config("grpo_gsm8k", [*extra, "grpo.group_size=1", f"grpo.prompts_per_step={args.rows}",
                                     f"rollout.max_new_tokens={args.completion_tokens}", *args.overrides])
    model_path = str(resolve_model(cfg.model.name))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = fixed_batch(tokenizer, args.data, args.rows, args.completion_tokens)
    tokens = sum(len(a) + len(b) for a, b in zip(batch.prompt_ids, batch.completion_ids, strict=True))

    learner = Learner(cfg, model_path, master_port=free_port())
    plain = PlainLoop(cfg, model_path, device)
    sides = {"rlkd Learner.train_step (DeepSpeed)": learner.train_step, "plain PyTorch loop": plain.train_step}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for step in range(args.warmup + args.steps):
        for name, fn in sides.items():
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(batch)
            if gpu:
                torch.cuda.synchronize()
            if step >= args.warmup:
                seconds[name].append(time.perf_counter() - start)

    rows = []
    for name, secs in seconds.items():
        mean = sum(secs) / len(secs)
        rows.append([name, tokens / mean, mean, min(secs)])
    ratio = rows[0][1] / rows[1][1]
    headers = ["side", "tokens/s", "s/step", "best s/step"]
    title = (f"learner: {args.rows} rows, {tokens} tokens/batch ({args.completion_tokens} completion tokens/row), "
             f"micro-batch {cfg.learner.micro_batch_size}, {cfg.learner.deepspeed_config}, {'GPU' if gpu else 'CPU'}")
    print_table(title, headers, rows)
    print_table("ratio", ["ratio", "value"], [["rlkd/plain tokens/s", ratio]])
    write_result(args.out, "bench_learner", {
        "title": title,
        "settings": {"rows": args.rows, "completion_tokens": args.completion_tokens, "tokens_per_batch": tokens,
                     "steps": args.steps, "warmup": args.warmup, "overrides": args.overrides,
                     "deepspeed_config": cfg.learner.deepspeed_config, "quick": args.quick,
                     "device": "gpu" if gpu else "cpu"},
        "seconds": seconds,
        "table": {"headers": headers, "rows": rows},
        "ratios": {"rlkd/plain": ratio},
        # The issue sets no target here: the figure is the DeepSpeed overhead, reported as is.
        "targets": [target("learner tokens/s rlkd/plain", ratio, "none (DeepSpeed overhead)", None)],
    })
    learner.close()


if __name__ == "__main__":
    main()
