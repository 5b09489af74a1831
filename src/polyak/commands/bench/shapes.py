"""The model shapes ``polyak bench`` runs on, by name. A plain table: reading it imports no torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["RL_SHAPES", "SHAPES", "Shape"]


@dataclass(frozen=True)
class Shape:
    """One shape: a class of :mod:`polyak.commands.bench.models`, its full-size title, its ``--quick`` stand-in."""

    model: str  # class name in polyak.commands.bench.models
    title: str  # the full shape, in words
    quick: dict[str, int] | None = field(default=None)  # the stand-in's arguments; None: already small, run in full
    quick_title: str = ""
    rl: bool = False  # a reinforcement-learning target network: the RL libraries' rows run on it

    def build(self, quick: bool) -> nn.Module:
        """The model, scaled down when ``quick`` and the shape has a stand-in."""
        cls = getattr(importlib.import_module(".models", __package__), self.model)
        return cls(**self.quick) if quick and self.quick is not None else cls()

    def scaled(self, quick: bool) -> bool:
        """Whether ``--quick`` runs a stand-in (whose goals, set for the full shape, are not judged)."""
        return quick and self.quick is not None


SHAPES = {
    "resnet50": Shape(
        "ResNet50Shape",
        "ResNet-50 (CNN, BatchNorm)",
        {"width": 8, "classes": 10},
        "ResNet-50 layout at width 8 (--quick)",
    ),
    "gpt2": Shape(
        "GPT2Shape",
        "GPT-2 small (tied)",
        {"vocab": 1000, "context": 64, "width": 64, "layers": 2},
        "GPT-2 layout, 2 layers of width 64 (--quick)",
    ),
    "many": Shape("ManyTensors", "2,000 small tensors", {"count": 200, "side": 16}, "200 small tensors (--quick)"),
    "wide": Shape("WideTensors", "40 tensors of 1 Mi", {"count": 40, "numel": 1 << 14}, "40 of 16 Ki (--quick)"),
    "sac": Shape("SACTwinCritic", "SAC twin critic (2 x 3-layer MLP, width 256)", rl=True),
    "dqn": Shape("NatureDQNShape", "Nature DQN CNN", rl=True),
}

# Shapes of reinforcement learning's target networks, where the peers' rows re-implement RL libraries' updates.
RL_SHAPES = tuple(name for name, shape in SHAPES.items() if shape.rl)
