"""MiniLLM learner throughput: rlkd's `DistillLearner.distill_step` vs the two-pass plain loop.

    python scripts/bench_distill_learner.py [--max-new-tokens 128] [--steps 2] [--quick] [key=value ...]

The batch is bench_learner's (2 GSM8K questions x 8 completions sampled by vLLM from the
embedded model, cached in bench_results/), distilled from the embedded SmolLM2-135M teacher into
a student pruned to every other layer, as `recipe=minillm_gsm8k` does, with the default
objective: MiniLLM's policy gradient on whitened, length-normalised returns plus the exact
single-step reverse KL. Both sides read the returns off the same sampler logprobs and the same
teacher, and take one AdamW step:
  rlkd:  one no-grad teacher pass whose full distributions are kept for the loss pass, then one
         student forward with grad per packed micro-batch (`learner.max_tokens_per_micro_batch`,
         shared prompts, lm_head only where scored), in the precision `learner.dtype` picks;
  plain: the learner as it was: micro-batches of 8 right-padded rows, a student and a teacher
         forward for the returns, then a student forward with grad and a second teacher forward
         for the loss, full [B, L, V] logits, fp32.
Steps alternate (rlkd, plain, ...) so a change in machine load hits both sides alike. Tokens/s
counts every prompt and completion token of the batch. The fp32 rows print the largest
|parameter difference| after the steps: the speed-up must keep the update.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch
from bench_common import free_port, on_gpu, parser, target
from bench_learner import report, sample_batch, timed
from transformers import AutoModelForCausalLM

from rlkd.actors.distill_learner import DistillLearner
from rlkd.actors.teacher import shared_vocab_size
from rlkd.compose import load_config
from rlkd.distill_losses import minillm_loss, minillm_token_rewards, whiten
from rlkd.losses import selective_log_softmax
from rlkd.models import resolve_model
from rlkd.packing import collate
from rlkd.prune import prune
from rlkd.types import DistillBatch, TrainBatch

PLAIN_MICRO_BATCH = 8


class PlainMiniLLM:
    """MiniLLM's default update as the learner computed it before: two passes of both models."""

    def __init__(self, cfg, student_path: str, teacher_path: str, vocab: int, device: torch.device):
        self.cfg, self.device, self.vocab = cfg, device, vocab
        self.model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).to(device).train()
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).to(device).eval()
        self.teacher.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.learner.lr,
                                     weight_decay=cfg.learner.weight_decay, fused=device.type == "cuda")

    def _rows(self, batch: DistillBatch, idx: list[int]):
        t = collate(TrainBatch([batch.prompt_ids[i] for i in idx], [batch.completion_ids[i] for i in idx],
                               [batch.student_logprobs[i] for i in idx], [0.0] * len(idx)))
        return (t["input_ids_BL"].to(self.device), t["attn_BL"].to(self.device), t["mask_BT"].to(self.device),
                t["rollout_logprobs_BT"].to(self.device))

    def _logits(self, model, ids_BL, attn_BL):
        return model(input_ids=ids_BL, attention_mask=attn_BL, use_cache=False).logits[:, :-1, :self.vocab]

    def train_step(self, batch: DistillBatch) -> None:
        d, g, n = self.cfg.distill, self.cfg.grpo, len(batch)
        chunks = [list(range(s, min(s + PLAIN_MICRO_BATCH, n))) for s in range(0, n, PLAIN_MICRO_BATCH)]
        returns_BT = []
        with torch.no_grad():
            for idx in chunks:
                ids_BL, attn_BL, mask_BT, sampler_BT = self._rows(batch, idx)
                self._logits(self.model, ids_BL, attn_BL)  # the pre-update student's pass it made
                tlp_BT = selective_log_softmax(self._logits(self.teacher, ids_BL, attn_BL), ids_BL[:, 1:])
                r_BT, _ = minillm_token_rewards(sampler_BT, tlp_BT, mask_BT, gamma=d.gamma,
                                                length_norm=d.length_norm, from_next=True)
                returns_BT.append((r_BT, mask_BT))
        width = max(r.shape[1] for r, _ in returns_BT)
        pad = [(torch.nn.functional.pad(r, (0, width - r.shape[1])),
                torch.nn.functional.pad(m, (0, width - m.shape[1]))) for r, m in returns_BT]
        white = whiten(torch.cat([r for r, _ in pad]), torch.cat([m for _, m in pad]))
        total = float(sum(len(c) for c in batch.completion_ids))
        for k, idx in enumerate(chunks):
            ids_BL, attn_BL, mask_BT, sampler_BT = self._rows(batch, idx)
            logits_BTV = self._logits(self.model, ids_BL, attn_BL)
            with torch.no_grad():
                teacher_BTV = self._logits(self.teacher, ids_BL, attn_BL)
            logprobs_BT = selective_log_softmax(logits_BTV, ids_BL[:, 1:])
            ret_BT = white[k * PLAIN_MICRO_BATCH:k * PLAIN_MICRO_BATCH + len(idx), :mask_BT.shape[1]]
            mask = mask_BT.bool()
            loss, _ = minillm_loss(logprobs_BT, logprobs_BT.detach(), ret_BT, mask_BT,
                                   clip_low=g.clip_low, clip_high=g.clip_high,
                                   rollout_logprobs_BT=sampler_BT, tis_cap=g.tis_cap or None,
                                   student_logits_NV=logits_BTV[mask], teacher_logits_NV=teacher_BTV[mask],
                                   single_step_coef=d.single_step_coef)
            (loss * mask.sum().item() / total).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.learner.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    p = parser("bench_distill_learner", __doc__)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=[128])
    p.add_argument("--steps", type=int, default=2, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("overrides", nargs="*", help="rlkd config overrides for the rlkd side, key=value")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.group, args.max_new_tokens, args.steps, args.warmup = 1, 4, [16], 1, 0
    gpu = on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    rows, results, targets = [], {}, []
    teacher = str(resolve_model("smollm2-135m-instruct"))
    student = str(Path(tempfile.mkdtemp(prefix="rlkd-bench-")) / "student")
    prune(teacher, student, "every_other")
    for max_new in args.max_new_tokens:
        # lr 1e-6 as in bench_learner: Adam's first step moves every weight by about lr, and an
        # element with a near-zero gradient may move either way, so |dparam| is read against lr.
        base = [f"grpo.group_size={args.group}", f"grpo.prompts_per_step={args.prompts}",
                f"rollout.max_new_tokens={max_new}", "learner.lr=1e-6", *args.overrides]
        cfg = load_config(None, [*base, "learner.dtype=float32"])
        data = sample_batch(cfg, teacher, args.data, args.prompts, args.group, max_new)
        batch = DistillBatch(data["prompt_ids"], data["completion_ids"], [], [0.0] * len(data["completion_ids"]),
                             student_logprobs=data["logprobs"])
        tokens = sum(len(a) + len(b) for a, b in zip(data["prompt_ids"], data["completion_ids"], strict=True))
        for dtype in ("float32", "auto"):
            cfg = load_config("minillm_gsm8k", [*base, f"learner.dtype={dtype}"])
            vocab = shared_vocab_size(student, [teacher])
            learner = DistillLearner(cfg, student, [teacher], vocab, master_port=free_port())
            plain = PlainMiniLLM(cfg, student, teacher, vocab, device)
            secs = {"rlkd": [], "plain": []}
            for step in range(args.warmup + args.steps):
                t_rlkd = timed(learner.distill_step, batch, gpu)
                t_plain = timed(plain.train_step, batch, gpu)
                if step >= args.warmup:
                    secs["rlkd"].append(t_rlkd)
                    secs["plain"].append(t_plain)
            diff = max((a - b).abs().max().item() for a, b in zip(
                learner.engine.module.parameters(), plain.model.parameters(), strict=True))
            precision = learner.compute_dtype
            learner.close()
            learner.engine.destroy()
            mean = {k: sum(v) / len(v) for k, v in secs.items()}
            ratio = mean["plain"] / mean["rlkd"]
            rows.append([max_new, precision, tokens, mean["plain"], mean["rlkd"], ratio, diff])
            results[f"{max_new}/{precision}"] = {"seconds": secs, "ratio": ratio, "max_param_diff": diff,
                                                 "tokens": tokens}
            if precision == "float32":
                targets.append(target(f"MiniLLM learner step plain/rlkd, fp32, {max_new} tokens", ratio,
                                      "> 1 with params within 1e-5", ratio > 1 and diff < 1e-5))
            print(f"[bench_distill_learner] {rows[-1]}", flush=True)
            del learner, plain
            gc.collect()
    headers = ["max_new_tokens", "rlkd precision", "tokens/batch", "plain s/step", "rlkd s/step",
               "plain/rlkd", "max |dparam|"]
    title = (f"MiniLLM learner step: {args.prompts} prompts x {args.group} sampled completions, 135M teacher -> "
             f"every-other-layer student, plain = two-pass padded fp32 loop, {'GPU' if gpu else 'CPU'}")
    report("bench_distill_learner", args, gpu, title, headers, rows, results, targets)

if __name__ == "__main__":
    main()
