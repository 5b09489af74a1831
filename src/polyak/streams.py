"""The random streams of stochastic rounding: one per device of the averages, seeded, saved and restored."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Streams"]


class Streams(dict[str, torch.Generator]):
    """One generator per device (by name), seeded from ``torch.initial_seed()``; empty when rounding to nearest."""

    def __init__(self, devices: Iterable[str]) -> None:
        super().__init__((device, torch.Generator(device).manual_seed(torch.initial_seed())) for device in devices)

    def state(self) -> dict[str, Tensor]:
        """Each stream's state, by device."""
        return {device: generator.get_state() for device, generator in self.items()}

    def load(self, state: Any) -> None:
        """Restore :meth:`state`, after checking it (nothing changes on error)."""
        if not isinstance(state, dict) or set(state) != set(self):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"saved rounding state is for devices {found}, this average rounds stochastically on "
                f"{sorted(self)}; build it with the same dtype, rounding and device"
            )
        for device, value in state.items():
            if not (isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
                raise ValueError(f"saved rounding state for {device!r} is not a generator state (a 1-d uint8 tensor)")
        before = self.state()
        try:
            for device, value in state.items():
                self[device].set_state(value)
        except RuntimeError as error:
            for device, value in before.items():
                self[device].set_state(value)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"saved rounding state is damaged ({reason}); nothing was loaded") from None
