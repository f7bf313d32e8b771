"""4-bit post-training quantization of a student, and its evaluation on transformers.

    python -m rlkd.quantize SRC DST [--group-size 64]          # int4 checkpoint in DST
    python -m rlkd.quantize --eval model.name=DST eval.num_samples=50

Weights: torchao's CPU int4 layout (`Int4OpaqueTensor`): every nn.Linear of the decoder, asymmetric
4-bit integers with one bf16 scale and zero point per `group_size` input weights, two weights
packed per byte. Matmuls run in ATen's `_weight_int4pack_mm_for_cpu` kernel, which unpacks the
4-bit weights on the fly, with bf16 activations: the kernel's float32-activation path is ~50x
slower (measured on this CPU), so a quantized model computes in bf16 throughout. The output
head stays unquantized: SmolLM2 ties it to the embedding matrix, and quantizing it would store
the matrix twice.

vLLM cannot load these tensors on CPU, so `--eval` generates with transformers (greedy,
batched, left-padded) and grades with `rlkd.eval.score`, writing the same metrics.json and
predictions.jsonl as `rlkd.eval`. It evaluates plain checkpoints too: the quantized model's
fp32 source on the same engine is the fair reference for its memory and latency.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

# torchao's import warns about its CUDA-only extensions, which a CPU torch cannot load.
logging.getLogger("torchao").setLevel(logging.ERROR)

import torchao  # noqa: E402
from torchao.prototype.quantization.int4 import (  # noqa: E402
    Int4OpaqueTensor,
    PrototypeInt4WeightOnlyConfig,
)
from torchao.quantization import quantize_  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessor  # noqa: E402

from rlkd.config import Config  # noqa: E402
from rlkd.console import out  # noqa: E402
from rlkd.data import encode_prompt, load_split  # noqa: E402
from rlkd.errors import InputError  # noqa: E402
from rlkd.models import count_parameters, resolve_model  # noqa: E402
from rlkd.preflight import check_context, check_prompt_lengths  # noqa: E402
from rlkd.scoring import PeakMemory, print_summary, score, write_results  # noqa: E402
from rlkd.types import Generation, SamplingSpec  # noqa: E402

GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel supports
WEIGHTS_FILE = "model.pt"
QUANT_FILE = "quantization.json"


def quantize_model(model: torch.nn.Module, group_size: int) -> dict:
    """Quantize `model`'s linear weights to int4 in place (bf16 elsewhere); returns what it did."""
    if group_size not in GROUP_SIZES:
        raise InputError(f"group size {group_size}: the CPU int4 kernel takes one of {GROUP_SIZES}")
    # Parameters only: Module.to() would also cast the float32 RoPE frequencies (buffers) to bf16.
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    head = model.get_output_embeddings()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    misfits = [name for name, m in linears.items() if m.in_features % group_size]
    if misfits:
        raise InputError(f"group size {group_size} does not divide the input size of {misfits[0]} "
                         f"({linears[misfits[0]].in_features}); pick one of {GROUP_SIZES} that does")
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group_size),
              filter_fn=lambda m, fqn: fqn in linears)
    stored = storage_bytes(model)
    packed = [n for n, p in model.named_parameters() if isinstance(p, Int4OpaqueTensor)]
    weights = sum(model.get_parameter(n).numel() for n in packed)
    return {"library": f"torchao {torchao.__version__}", "scheme": "int4 weight-only, asymmetric, "
            "group-wise (Int4OpaqueTensor, ATen _weight_int4pack_mm_for_cpu), bf16 activations",
            "bits": 4, "group_size": group_size, "quantized_linears": len(packed),
            # What a quantized weight costs with its share of the scales and zero points.
            "bits_per_linear_weight": 8 * sum(stored[n] for n in packed) / max(weights, 1),
            "unquantized": [n for n in stored if n not in packed]}


def storage_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes each parameter occupies, counting a quantized tensor's packed data and scales."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, Int4OpaqueTensor):
            inner = [getattr(p, k) for k in p.__tensor_flatten__()[0]]
        else:
            inner = [p]
        out[name] = sum(t.numel() * t.element_size() for t in inner)
    return out


def quantize(src: str | Path, dst: str | Path, group_size: int = 64) -> dict:
    """Write an int4 copy of checkpoint `src` to `dst`: config, tokenizer, model.pt (the packed
    state dict) and quantization.json. Staged in a temp dir and renamed, like rlkd.prune."""
    src, dst = Path(src), Path(dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    info = {"source": str(src), **quantize_model(model, group_size)}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
    info["weights_bytes"] = (tmp / WEIGHTS_FILE).stat().st_size
    (tmp / QUANT_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return info


def is_quantized(path: str | Path) -> bool:
    """Whether `path` was written by `quantize` (and so needs `load`, not from_pretrained)."""
    return (Path(path) / QUANT_FILE).is_file()


def load(path: str | Path) -> torch.nn.Module:
    """A checkpoint from `quantize` (int4) or a plain one (float32), in eval mode."""
    path = Path(path)
    if not is_quantized(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    # weights_only: torchao registers its tensor classes as safe to unpickle, nothing else runs.
    state = torch.load(path / WEIGHTS_FILE, weights_only=True)
    model.load_state_dict(state, assign=True)
    model.tie_weights()  # assign=True replaced the tied head's Parameter with a separate one
    return model.eval()


class _GreedyLogprobs(LogitsProcessor):
    """Log-probability of the greedy token at each step, without keeping B x V logits per step."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.float().log_softmax(-1).amax(-1))
        return scores


class TransformersGenerator:
    """`generate(prompts, spec) -> Generation` on transformers, for models vLLM cannot load:
    greedy, `batch_size` prompts at a time, left-padded so every row continues at the same
    column. Completions keep their end-of-turn token, as vLLM's do."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
        # Padding needs some token; the mask hides which.
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _left_padded(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, prompts: list[str], spec: SamplingSpec) -> Generation:
        if spec.n != 1 or spec.temperature != 0.0:
            raise InputError("the transformers engine decodes greedily: eval.temperature must be 0")
        gen = Generation([], [], [], [], [])
        start = time.perf_counter()
        for b0 in range(0, len(prompts), self.batch_size):
            enc = self._left_padded([encode_prompt(self.tokenizer, p) for p in prompts[b0:b0 + self.batch_size]])
            record = _GreedyLogprobs()
            with torch.inference_mode():
                # use_cache explicitly: a checkpoint's config may turn the KV cache off (older
                # rlkd training runs saved use_cache=false), making each new token cost a full pass.
                seq_BL = self.model.generate(**enc, max_new_tokens=spec.max_tokens, do_sample=False, use_cache=True,
                                             logits_processor=[record], pad_token_id=self.pad,
                                             eos_token_id=sorted(self.eos))
            new_BT = seq_BL[:, enc["input_ids"].shape[1]:]
            logprobs_BT = torch.stack(record.steps, 1) if record.steps else torch.zeros(new_BT.shape)
            for ids_L, mask_L, ids, lps in zip(enc["input_ids"], enc["attention_mask"], new_BT.tolist(),
                                               logprobs_BT.tolist(), strict=True):
                end = next((i + 1 for i, t in enumerate(ids) if t in self.eos), None)
                gen.prompt_ids.append(ids_L[mask_L.bool()].tolist())
                gen.completion_ids.append(ids[:end])
                gen.logprobs.append(lps[:end])
                gen.texts.append(self.tokenizer.decode(ids[:end], skip_special_tokens=True))
                gen.truncated.append(end is None)
        gen.seconds = time.perf_counter() - start
        return gen


def evaluate(cfg: Config, run_dir: Path) -> dict[str, float]:
    """`rlkd.eval.evaluate` on the transformers engine: same inputs, same output files."""
    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir or None)
    check_context(str(model_path), cfg.model.max_model_len)
    examples = load_split(cfg.data, cfg.data.split, limit=cfg.eval.num_samples)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_prompt_lengths(tokenizer, examples, cfg, "eval.max_new_tokens", cfg.eval.max_new_tokens)
    spec = SamplingSpec(n=1, max_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                        seed=cfg.run.seed)
    quantized = is_quantized(model_path)
    start = time.perf_counter()
    with PeakMemory() as mem:
        model = load(model_path)
        loaded = time.perf_counter() - start
        predictions, metrics = score(TransformersGenerator(model, tokenizer), tokenizer, examples,
                                     cfg.data, spec)
    metrics.update(
        parameters=count_parameters(model), peak_memory_gb=mem.peak / 2**30, engine_startup_s=loaded,
        wall_s=time.perf_counter() - start,
        engine="transformers, int4 weights + bf16" if quantized else "transformers, float32",
    )
    write_results(run_dir, model_path, predictions, metrics)
    print_summary(f"{cfg.model.name} ({metrics['engine']})", cfg.data.split, metrics, run_dir,
                  f"{cfg.data.name} evaluation (transformers)")
    return metrics


def main(argv: list[str]) -> None:
    """`python -m rlkd.quantize SRC DST`: write the int4 checkpoint (`--eval` is rlkd.quantize's)."""
    parser = argparse.ArgumentParser(prog="python -m rlkd.quantize", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="checkpoint to quantize (local dir, hub id or embedded name)")
    parser.add_argument("dst", help="directory of the int4 checkpoint")
    parser.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES)
    args = parser.parse_args(argv)
    try:
        info = quantize(resolve_model(args.src), args.dst, args.group_size)
    except InputError as e:
        raise SystemExit(f"rlkd: error: {e}") from None
    out(f"{args.dst}: {info['quantized_linears']} linear layers in int4 (group {args.group_size}), "
          f"{info['weights_bytes'] / 2**20:.1f} MiB of weights")

