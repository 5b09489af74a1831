"""The one path's two goals: K averages read the model once, and another library's events cost an EMA nothing.

``MultiEMA`` with three decays is timed against three ``EMA`` s of the same decays (goal: at most 0.85x on the
wide shape, 40 float32 tensors of 1 Mi elements, where the model read is a third of the traffic it can save).
An ``EMA`` whose step also assigns ``.data`` of a module it does not average (as a BYOL target update or another
EMA library does) is timed against the ``EMA`` alone (goal: at most 1.10x, the assignment's own cost included).
"""

from __future__ import annotations

from torch import nn

from ....ema import EMA
from ....multi import MultiEMA
from ..goals import Goal
from ..harness import Contender, Step
from .polyak_ema import POLYAK

__all__ = ["CONTENDERS", "GOALS"]

_DECAYS = (0.99, 0.999, 0.9999)
_MULTI = "polyak MultiEMA, 3 decays"
_THREE = "three polyak EMAs, the same 3 decays"
_FOREIGN = "polyak EMA, another module's .data assigned each step"
_MULTI_SHAPES = ("wide", "many")  # one large-tensor shape and one of per-tensor overhead
_FOREIGN_SHAPES = ("resnet50", "gpt2", "many", "wide")  # not the RL shapes: there a .data assignment is 5% of a step


def _multi(model: nn.Module) -> Step:
    return MultiEMA(model, decays=_DECAYS).update


def _three(model: nn.Module) -> Step:
    emas = [EMA(model, decay=decay) for decay in _DECAYS]

    def step() -> None:
        for ema in emas:
            ema.update()

    return step


def _beside_foreign_events(model: nn.Module) -> Step:
    ema = EMA(model, decay=_DECAYS[1])
    other = nn.Linear(4, 4).to(next(model.parameters()).device)
    values = [other.weight.detach().clone(), other.weight.detach().clone()]
    turn = [0]

    def step() -> None:
        turn[0] ^= 1
        other.weight.data = values[turn[0]]
        ema.update()

    return step


_AVERAGE_BYTES = 4 + 2 * 4 * len(_DECAYS)  # a float32 model read once, three float32 averages read and written
CONTENDERS = [
    Contender(_MULTI, _multi, shapes=_MULTI_SHAPES, moved_bytes=_AVERAGE_BYTES),
    Contender(_THREE, _three, shapes=_MULTI_SHAPES, moved_bytes=3 * (4 + 2 * 4)),
    Contender(_FOREIGN, _beside_foreign_events, shapes=_FOREIGN_SHAPES),
]
GOALS = [
    Goal(_MULTI, _THREE, 0.85, shapes=("wide",)),
    Goal(_MULTI, _THREE, 0.85, shapes=("many",), judged=False, label="MultiEMA, 3 decays", against="x three EMAs"),
    Goal(_FOREIGN, POLYAK, 1.10, shapes=_FOREIGN_SHAPES, label="EMA beside another module's .data assignment"),
]
