"""A smaller student cut out of its teacher: same embeddings, head and tokenizer, fewer layers.

    python -m rlkd.prune smollm2-135m-instruct DST every_other     # or first:K, 0,2,4,... or drop:12,14

Layer dropping keeps the residual stream's basis, so the student starts close to the teacher
in function, not at random (Sanh et al. 2019, DistilBERT, initialise every other layer). The
result is a normal Hugging Face checkpoint that transformers and vLLM load.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.errors import InputError
from rlkd.models import count_parameters, resolve_model


class LayerSpecError(InputError):
    """A `student.layers` value that does not name layers of the teacher."""


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Indices of the layers to keep: `every_other` (0, 2, 4, ...), `first:K`, `i,j,k`, or
    `drop:i,j,k` (all but those)."""
    spec = spec.strip()
    if spec == "every_other":
        keep = list(range(0, num_layers, 2))
    elif spec.startswith("drop:"):
        dropped = parse_layers(spec.split(":", 1)[1] or "none", num_layers)
        keep = [i for i in range(num_layers) if i not in dropped]
    elif spec.startswith("first:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise LayerSpecError(f"student.layers={spec!r}: expected first:K with an integer K") from None
        keep = list(range(k))
    else:
        try:
            keep = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise LayerSpecError(
                f"student.layers={spec!r}: expected every_other, first:K, indices like 0,2,5 or drop:1,3"
            ) from None
    if not keep or len(set(keep)) != len(keep) or keep != sorted(keep):
        raise LayerSpecError(f"student.layers={spec!r}: needs distinct layer indices in increasing order")
    if keep[0] < 0 or keep[-1] >= num_layers:
        raise LayerSpecError(f"student.layers={spec!r}: the teacher has layers 0..{num_layers - 1}")
    return keep


def prune(src: str | Path, dst: str | Path, layers: str) -> dict[str, int]:
    """Write to `dst` a copy of checkpoint `src` with only the chosen decoder layers.

    Returns the parameter counts of teacher and student. Written to a temp dir and renamed, so
    an interrupted prune never leaves a directory that looks like a checkpoint.
    """
    src, dst = Path(src), Path(dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    decoder = model.get_decoder()
    keep = parse_layers(layers, len(decoder.layers))
    decoder.layers = torch.nn.ModuleList(decoder.layers[i] for i in keep)
    for new_index, layer in enumerate(decoder.layers):
        # The KV cache indexes layers by this attribute; stale ones would collide.
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    if (src / "generation_config.json").exists():
        shutil.copy(src / "generation_config.json", tmp / "generation_config.json")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return {"teacher_params": count_parameters(src), "student_params": count_parameters(dst),
            "student_layers": len(keep)}


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: python -m rlkd.prune SRC DST every_other|first:K|i,j,k|drop:i,j,k")
    try:
        counts = prune(resolve_model(argv[0]), argv[1], argv[2])
    except ValueError as e:
        raise SystemExit(f"rlkd.prune: error: {e}") from None
    print(f"{argv[1]}: {counts['student_layers']} layers, {counts['student_params']:,} parameters "
          f"(teacher {counts['teacher_params']:,})")


if __name__ == "__main__":
    main(sys.argv[1:])
