"""The learner's weights as the rollout engines and checkpoints get them: the plain model's
parameter names and full shapes, LoRA adapters merged in, ZeRO-3 partitions gathered.

One path serves every transport (shared memory, Ray's object store, NCCL) and the checkpoints.
Under ZeRO-3 a parameter is a partition placeholder (`param.data` is empty, the full shape is
`param.ds_shape`), so each unit (a LoRA layer, or a module's own parameters) is gathered, read
and released in turn; the gather is a collective, so every data-parallel rank walks the units
in the same order. vLLM's `ModuleSource` reads `named_parameters()` as they are, which would
send empty tensors under ZeRO-3 and PEFT's names and unmerged adapters under LoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import deepspeed
import peft
import torch
from peft.tuners.lora import LoraLayer
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource


@dataclass
class Unit:
    names: list[str]  # the plain model's parameter names this unit yields
    shapes: list[tuple[int, ...]]  # their full shapes
    dtypes: list[torch.dtype]
    params: list[torch.nn.Parameter]  # what must be gathered to compute them
    merge: Callable[[list[torch.Tensor]], list[torch.Tensor]]  # params' data -> fresh tensors


def _shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _merge_lora(layer: LoraLayer) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    has_bias = layer.base_layer.bias is not None

    def merge(data: list[torch.Tensor]) -> list[torch.Tensor]:
        w, rest = data[0], data[2 if has_bias else 1:]
        merged = w.float()
        for k, a in enumerate(adapters):  # W + (alpha / r) B A, in fp32
            A, B = rest[2 * k].float(), rest[2 * k + 1].float()
            merged = merged + (B @ A) * layer.scaling[a]
        return [merged.to(w.dtype)] + ([data[1].clone()] if has_bias else [])
    return merge


def export_units(module: torch.nn.Module) -> list[Unit]:
    """Every parameter of the plain model, in `named_parameters()` order, grouped by module."""
    model = module.get_base_model() if isinstance(module, peft.PeftModel) else module
    units, seen, inside = [], set(), None
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue  # base_layer, lora_A, lora_B of the LoRA layer just handled
        prefix = f"{name}." if name else ""
        if isinstance(m, LoraLayer):
            if m.merged:
                raise RuntimeError(f"{name}: adapters merged in place; the export merges them itself")
            inside, base = prefix, m.base_layer
            own = [base.weight] + ([base.bias] if base.bias is not None else [])
            adapters = [p for a in m.active_adapters if a in m.lora_A
                        for p in (m.lora_A[a].weight, m.lora_B[a].weight)]
            units.append(Unit([prefix + "weight"] + ([prefix + "bias"] if base.bias is not None else []),
                              [_shape(p) for p in own], [p.dtype for p in own], own + adapters,
                              _merge_lora(m)))
            continue
        own = [(n, p) for n, p in m.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)  # a tied weight is exported once, under its first name
        if own:
            units.append(Unit([prefix + n for n, _ in own], [_shape(p) for _, p in own],
                              [p.dtype for _, p in own], [p for _, p in own],
                              lambda data: [d.clone() for d in data]))
    return units


def exported(module: torch.nn.Module, zero3: bool,
             units: list[Unit] | None = None) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """(names, full tensors) unit by unit (`units`: `export_units(module)`, when the caller
    already holds them); the tensors are copies that outlive the gather."""
    for unit in export_units(module) if units is None else units:
        with deepspeed.zero.GatheredParameters(unit.params) if zero3 else nullcontext():
            yield unit.names, unit.merge([p.detach() for p in unit.params])


class ExportSource(WeightSource):
    """`exported` for vLLM's NCCL weight-transfer engine, one send group per unit."""

    def __init__(self, module: torch.nn.Module, zero3: bool) -> None:
        self._module, self._zero3 = module, zero3
        self._units = export_units(module)

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, d, s) for u in self._units
                for n, d, s in zip(u.names, u.dtypes, u.shapes, strict=True)]

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        return exported(self._module, self._zero3, self._units)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for names, tensors in self.iter_groups():
            yield from zip(names, tensors, strict=True)
