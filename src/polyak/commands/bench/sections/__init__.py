"""The benchmark's sections, in the order their rows are printed (the floors first: every ratio is to the floor).

A section is a module here with ``CONTENDERS`` (a list of :class:`~polyak.commands.bench.harness.Contender`)
and ``GOALS`` (a list of :class:`~polyak.commands.bench.goals.Goal`), named in ``SECTIONS``.
"""

from __future__ import annotations

from ..goals import Goal
from ..harness import Contender
from . import cadence, floors, mixed_precision, one_path, peers, polyak_ema

__all__ = ["SECTIONS", "contenders", "goals"]

SECTIONS = (floors, polyak_ema, mixed_precision, cadence, one_path, peers)


def contenders() -> tuple[list[Contender], list[str]]:
    """The implementations to time (the floor first) and the names of those skipped because not installed."""
    chosen: list[Contender] = []
    skipped: list[Contender] = []
    for contender in (contender for section in SECTIONS for contender in section.CONTENDERS):
        (chosen if contender.available() else skipped).append(contender)
    return chosen, [contender.name for contender in skipped]


def goals() -> list[Goal]:
    """Every section's goals, in section order."""
    return [goal for section in SECTIONS for goal in section.GOALS]
