"""Learner throughput: rlkd's GRPO `Learner.train_step` vs today's plain padded PyTorch loop.

    python scripts/bench_learner.py [--max-new-tokens 128 256] [--dtypes float32 auto] [--steps 2]
                                    [--profile] [--quick] [key=value ...]

Realistic batches: `--prompts` GSM8K train questions x `--group` completions sampled from the
embedded model by vLLM (temperature 1, fp32, `--max-new-tokens` each), scored by the default
rewards and turned into group advantages, as a GRPO step would. Each batch is trained twice:
  * `as scored`: the advantages the rewards give (groups without reward variance carry none);
  * `all signal`: the same rows with random advantages, so every row is scored by both sides;
  * `no signal`: every advantage 0 (all rewards equal), whose rlkd step time is compared with
    the `all signal` step's (goal: <= 15%).
Both sides start from the same weights and do the same update (token mean, clip 0.2/0.28, TIS
cap 2, clipping at 1.0, one AdamW step):
  rlkd:  `rlkd.actors.learner.Learner` (DeepSpeed engine): zero-signal rows skipped, rows packed into
         `learner.max_tokens_per_micro_batch`, shared prompts, lm_head only where scored, and
         the precision `learner.dtype` picks (fp32 and `auto` are both measured);
  plain: micro-batches of 8 right-padded rows through `rlkd.packing.collate`, full logits,
         `torch.optim.AdamW` and `clip_grad_norm_`, fp32: the learner as it was.
Steps alternate (rlkd, plain, ...) so a change in machine load hits both sides alike; the first
--warmup steps are not timed. Tokens/s counts every prompt and completion token of the batch
(the same work on both sides). After the fp32 steps the largest |parameter difference| between
the two sides is printed: the speed-up must keep the update.

--profile runs one more rlkd step of each fp32 `all signal` and `no signal` case under
torch.profiler and writes its top operators by self CPU time to
bench_results/bench_learner_profile_<tokens>_<signal>.txt (where a missed goal's time goes).
"""

from __future__ import annotations

import gc
import json
import random
import time

import torch
from bench_common import (
    RESULTS_DIR,
    free_port,
    gsm8k_prompts,
    on_gpu,
    parser,
    print_table,
    target,
    write_result,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards import compute_rewards, load_reward
from rlkd.actors.learner import Learner
from rlkd.compose import load_config
from rlkd.losses import group_advantages, grpo_loss, selective_log_softmax
from rlkd.models import resolve_model
from rlkd.packing import collate
from rlkd.preflight import reward_name
from rlkd.types import TrainBatch

PLAIN_MICRO_BATCH = 8


def sample_batch(cfg, model_path: str, data_dir, prompts: int, group: int, max_new_tokens: int) -> dict:
    """Completions sampled by vLLM, cached in bench_results/ (sampling is not what is timed)."""
    cache = RESULTS_DIR / f"bench_learner_batch_{prompts}x{group}_{max_new_tokens}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import vllm

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts, answers = gsm8k_prompts(tokenizer, data_dir, prompts)
    llm = vllm.LLM(model_path, dtype="float32", enforce_eager=True, max_model_len=cfg.model.max_model_len, seed=0)
    outs = llm.generate(texts, vllm.SamplingParams(n=group, temperature=1.0, max_tokens=max_new_tokens,
                                                   logprobs=0, seed=0))
    prompt_ids, completion_ids, logprobs, completions = [], [], [], []
    for out in outs:
        for c in out.outputs:
            prompt_ids.append(list(out.prompt_token_ids))
            completion_ids.append(list(c.token_ids))
            logprobs.append([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)])
            completions.append(c.text)
    del llm  # the vLLM engine process exits with it: nothing else runs while the learners are timed
    gc.collect()
    fns = {reward_name(spec): load_reward(spec) for spec in cfg.rewards.funcs}
    rewards, _, _ = compute_rewards(fns, dict(zip(fns, cfg.rewards.weights, strict=True)), completions,
                                    answer=[a for a in answers for _ in range(group)])
    data = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, "rewards": rewards}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(data))
    return data


def train_batch(data: dict, group: int, signal: str) -> TrainBatch:
    if signal == "as scored":
        adv, _ = group_advantages(torch.tensor(data["rewards"]), group)
        advantages = adv.tolist()
    elif signal == "no signal":
        advantages = [0.0] * len(data["rewards"])
    else:
        rng = random.Random(0)
        advantages = [rng.gauss(0, 1) for _ in data["rewards"]]
    return TrainBatch(data["prompt_ids"], data["completion_ids"], data["logprobs"], advantages)


class PlainLoop:
    """The same GRPO update written as a bare PyTorch training loop."""

    def __init__(self, cfg, model_path: str, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
        self.model.config.use_cache = False
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.learner.lr,
                                     weight_decay=cfg.learner.weight_decay, fused=device.type == "cuda")

    def train_step(self, batch: TrainBatch) -> None:
        g, mbs = self.cfg.grpo, PLAIN_MICRO_BATCH
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


def profile_step(learner: Learner, batch: TrainBatch, path, rows: int = 30) -> list[dict]:
    """One learner step under torch.profiler: its top operators by self time, also written to path."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        learner.train_step(batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
            "calls": e.count} for e in events[:rows]]
    lines = [f"{'op':<60} {'self s':>8} {'share':>7} {'calls':>7}"]
    lines += [f"{t['op'][:60]:<60} {t['self_s']:>8.3f} {t['share']:>7.1%} {t['calls']:>7}" for t in top]
    lines.append(f"{'total':<60} {total / 1e6:>8.3f}")
    path.write_text("\n".join(lines) + "\n")
    print(f"[bench_learner] profile -> {path}\n" + "\n".join(lines[:16]), flush=True)
    return top


def timed(fn, batch, gpu: bool, metrics: dict | None = None) -> float:
    """Seconds of fn(batch); its returned metrics go into `metrics` when given."""
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(batch)
    if metrics is not None:
        metrics.update(out)
    if gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = parser("bench_learner", __doc__)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=[128, 256])
    p.add_argument("--steps", type=int, default=2, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "auto"], default=["float32", "auto"],
                   help="rlkd learner.dtype values to measure")
    p.add_argument("--profile", action="store_true", help="profile the fp32 all/no-signal rlkd steps")
    p.add_argument("overrides", nargs="*", help="rlkd config overrides for the rlkd side, key=value")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.group, args.max_new_tokens, args.steps, args.warmup = 1, 4, [16], 1, 0
    gpu = on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    rows, results, targets = [], {}, []
    for max_new in args.max_new_tokens:
        base = [f"grpo.group_size={args.group}", f"grpo.prompts_per_step={args.prompts}",
                f"rollout.max_new_tokens={max_new}", *args.overrides]
        cfg = load_config(None, [*base, "learner.dtype=float32"])
        model_path = str(resolve_model(cfg.model.name))
        data = sample_batch(cfg, model_path, args.data, args.prompts, args.group, max_new)
        tokens = sum(len(a) + len(b) for a, b in zip(data["prompt_ids"], data["completion_ids"], strict=True))
        for dtype in args.dtypes:
            cfg = load_config(None, [*base, f"learner.dtype={dtype}"])
            for signal in ("as scored", "all signal", "no signal"):
                batch = train_batch(data, args.group, signal)
                learner = Learner(cfg, model_path, master_port=free_port())
                plain = PlainLoop(cfg, model_path, device)
                secs = {"rlkd": [], "plain": []}
                metrics = {}
                for step in range(args.warmup + args.steps):
                    t_rlkd = timed(learner.train_step, batch, gpu, metrics)
                    t_plain = timed(plain.train_step, batch, gpu)
                    if step >= args.warmup:
                        secs["rlkd"].append(t_rlkd)
                        secs["plain"].append(t_plain)
                diff = max((a - b).abs().max().item() for a, b in zip(
                    learner.engine.module.parameters(), plain.model.parameters(), strict=True))
                profile = None
                if args.profile and learner.compute_dtype == "float32" and signal != "as scored":
                    out = RESULTS_DIR / f"bench_learner_profile_{max_new}_{signal.replace(' ', '_')}.txt"
                    profile = profile_step(learner, batch, out)
                learner.close()
                mean = {k: sum(v) / len(v) for k, v in secs.items()}
                ratio = mean["plain"] / mean["rlkd"]
                precision = learner.compute_dtype
                rows.append([max_new, precision, signal, tokens, metrics["train/skipped_rows_frac"],
                             tokens / mean["plain"], tokens / mean["rlkd"], ratio, diff])
                results[f"{max_new}/{precision}/{signal}"] = {
                    "seconds": secs, "ratio": ratio, "max_param_diff": diff, "tokens": tokens,
                    "skipped_rows_frac": metrics["train/skipped_rows_frac"],
                    "micro_batches": metrics["train/micro_batches"], "profile": profile}
                if precision == "float32":
                    targets.append(target(f"learner tokens/s rlkd/plain, fp32, {max_new} tokens, {signal}",
                                          ratio, ">= 2.0 with params within 1e-5", ratio >= 2.0 and diff < 1e-5))
                print(f"[bench_learner] {rows[-1]}", flush=True)
                learner.engine.destroy()  # DeepSpeed keeps engines alive otherwise: 16 GiB after six
                del learner, plain
                gc.collect()
            full = results[f"{max_new}/{precision}/all signal"]["seconds"]["rlkd"]
            zero = results[f"{max_new}/{precision}/no signal"]["seconds"]["rlkd"]
            frac = sum(zero) / sum(full)
            results[f"{max_new}/{precision}/zero-signal step / full step"] = frac
            targets.append(target(f"zero-signal step / full step, {precision}, {max_new} tokens", frac,
                                  "<= 0.15", frac <= 0.15))
    headers = ["max_new_tokens", "rlkd precision", "advantages", "tokens/batch", "skipped rows",
               "plain tok/s", "rlkd tok/s", "rlkd/plain", "max |dparam|"]
    title = (f"GRPO learner step: {args.prompts} prompts x {args.group} sampled completions, "
             f"plain = padded fp32 loop ({PLAIN_MICRO_BATCH} rows/micro-batch), {'GPU' if gpu else 'CPU'}")
    report("bench_learner", args, gpu, title, headers, rows, results, targets)


def report(name: str, args, gpu: bool, title: str, headers: list[str], rows: list[list],
           results: dict, targets: list[dict]) -> None:
    """Print the table and the targets, and write bench_results/<name>.json (learner benches)."""
    print_table(title, headers, rows)
    print_table("targets", ["figure", "value", "goal", "met"],
                [[t["name"], t["value"], t["goal"], t["met"]] for t in targets])
    write_result(args.out, name, {
        "title": title,
        "settings": {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
                     "steps": args.steps, "warmup": args.warmup, "overrides": args.overrides,
                     "quick": args.quick, "device": "gpu" if gpu else "cpu"},
        "results": results,
        "table": {"headers": headers, "rows": rows},
        "ratios": {k: v["ratio"] for k, v in results.items() if isinstance(v, dict)},
        "targets": targets,
    })


if __name__ == "__main__":
    main()
