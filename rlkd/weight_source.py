"""The learner's weights as vLLM's NCCL weight-transfer engine reads them, under ZeRO-3 too.

vLLM's `ModuleSource` reads `module.named_parameters()`. Under ZeRO-3 those are partition
placeholders (`param.data` is an empty tensor; the full shape lives in `param.ds_shape`), so it
would declare and send empty tensors. `ZeroSource` declares the full shapes and gathers each
layer's parameters for the send; the gather is a collective, so every data-parallel rank
iterates the source in the same order (vLLM's engine does that on non-sender ranks).
"""

from __future__ import annotations

from collections.abc import Iterator

import deepspeed
import torch
from vllm.distributed.weight_transfer.base import ModuleSource, ParamMeta, WeightSource


class ZeroSource(WeightSource):
    """Full, gathered parameters of a ZeRO-3 module, one gather per layer group."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._params = dict(module.named_parameters())

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, p.dtype, tuple(p.ds_shape)) for name, p in self._params.items()]

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        for names in self.groups():
            params = [self._params[n] for n in names]
            with deepspeed.zero.GatheredParameters(params):
                # Copies: leaving the context re-partitions, which frees the gathered storage.
                tensors = [p.detach().clone() for p in params]
            yield names, tensors

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for names, tensors in self.iter_groups():
            yield from zip(names, tensors, strict=True)


def weight_source(module: torch.nn.Module, zero3: bool) -> WeightSource:
    return ZeroSource(module) if zero3 else ModuleSource(module)
