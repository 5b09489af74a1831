"""16-bit models: a float32 average of a bf16 or fp16 model (against the float32 floor), and a bf16 average,
rounded to nearest (which stalls) or stochastically (against a bf16 floor)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ....flat import flatten_parameters
from ..goals import FLOOR, Goal
from ..harness import DECAY, Contender, Step
from .floors import flat_pair
from .polyak_ema import polyak_update

__all__ = ["CONTENDERS", "GOALS"]

_BF16 = "polyak EMA, bf16 model, fp32 average"
_FP16 = "polyak EMA, fp16 model, fp32 average"
_BF16_FLOOR = "floor, bf16: one lerp_ over a flat bf16 buffer"
_ROUNDED = "polyak EMA, bf16 model, bf16 average, stochastic rounding"
_FP32_FLOOR = "vs the fp32 floor"
_CPU_CAST = (
    " (CPU has no lerp that reads a 16-bit model into a float32 average: the conversion into the staging buffer"
    " is a pass of its own; on many small tensors it is one copy per tensor)"
)

_CPU_ROUNDING = " (on a CPU the widen, lerp, add-bits, truncate and narrow are passes of their own)"


def _cast(dtype: torch.dtype, flat: bool = False) -> Callable[[nn.Module], nn.Module]:
    """A copy of the model in ``dtype`` (laid out by ``flatten_parameters`` when ``flat``)."""

    def prepare(model: nn.Module) -> nn.Module:
        duplicate = copy.deepcopy(model).to(dtype)
        if flat:
            flatten_parameters(duplicate)
        return duplicate

    return prepare


def _floor_bf16(model: nn.Module) -> Step:
    """The floor of a bfloat16 model with a bfloat16 average: one ``lerp_`` over flat bf16 buffers."""
    average, target = (t.to(torch.bfloat16) for t in flat_pair(model))

    def step() -> None:
        average.lerp_(target, 1 - DECAY)

    return step


CONTENDERS = [
    Contender(_BF16, polyak_update(), _cast(torch.bfloat16), note=_FP32_FLOOR),
    Contender(_FP16, polyak_update(), _cast(torch.float16), note=_FP32_FLOOR),
    Contender(
        "polyak EMA, bf16 model (flatten_parameters), fp32 average",
        polyak_update(),
        _cast(torch.bfloat16, flat=True),
        note=_FP32_FLOOR,
    ),
    Contender(_BF16_FLOOR, _floor_bf16, average_bytes=2),
    Contender(
        "polyak EMA, bf16 model, bf16 average",
        polyak_update(dtype=torch.bfloat16),
        _cast(torch.bfloat16),
        note="rounds to nearest: stalls",
        average_bytes=2,
    ),
    Contender(
        _ROUNDED,
        polyak_update(dtype=torch.bfloat16, rounding="stochastic"),
        _cast(torch.bfloat16),
        average_bytes=2,
    ),
]
GOALS = [
    Goal(_BF16, FLOOR, 1.15, ("resnet50", "gpt2"), _CPU_CAST),
    Goal(_BF16, FLOOR, 1.5, ("many",), _CPU_CAST),
    Goal(_FP16, FLOOR, 1.15, ("resnet50", "gpt2"), _CPU_CAST),
    Goal(_FP16, FLOOR, 1.5, ("many",), _CPU_CAST),
    Goal(_ROUNDED, _BF16_FLOOR, 1.2, on_cpu=_CPU_ROUNDING),
]
