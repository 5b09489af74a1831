"""polyak's EMA update on the model as it is and on a model laid out flat by ``flatten_parameters``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from ....ema import EMA
from ....flat import flatten_parameters
from ..goals import FLOOR, Goal
from ..harness import DECAY, Contender, Step
from .floors import BARE

__all__ = ["CONTENDERS", "GOALS", "POLYAK", "polyak_update"]

POLYAK = "polyak EMA"
_FLAT = "polyak EMA, flatten_parameters"


def polyak_update(**options: Any) -> Callable[[nn.Module], Step]:
    """Builds ``EMA(model, decay=DECAY, **options).update``."""
    return lambda model: EMA(model, decay=DECAY, **options).update


def _flat_copy(model: nn.Module) -> nn.Module:
    duplicate = copy.deepcopy(model)
    flatten_parameters(duplicate)
    return duplicate


CONTENDERS = [
    Contender(POLYAK, polyak_update()),
    Contender(_FLAT, polyak_update(), prepare=_flat_copy),
]
GOALS = [
    Goal(POLYAK, BARE, 1.10),
    Goal(_FLAT, FLOOR, 1.10),
]
