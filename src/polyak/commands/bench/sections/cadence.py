"""``update_every=k``: the update's work on every k-th call, reported per optimizer step."""

from __future__ import annotations

from ..goals import Goal
from ..harness import Contender
from .polyak_ema import POLYAK, polyak_update

__all__ = ["CONTENDERS", "GOALS"]

_EVERY = 4
_NAME = f"polyak EMA, update_every={_EVERY} (per step)"

CONTENDERS = [Contender(_NAME, polyak_update(update_every=_EVERY), calls=_EVERY)]
GOALS = [
    Goal(
        _NAME,
        POLYAK,
        1 / _EVERY,
        judged=False,
        label=f"update_every={_EVERY}",
        against="of an every-step update per step",
    )
]
