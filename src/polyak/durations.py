"""Durations in optimizer steps, epochs, samples or tokens, converted to optimizer steps.

Spelled as in Composer: ``"2000ba"`` (optimizer steps, "batches"), ``"1ep"`` (epochs), ``"10M samples"`` /
``"10Msp"``, ``"5B tokens"`` / ``"5Btok"``. A number may carry a K, M, B or T multiplier (10**3 .. 10**12).
Converting needs the matching rate: ``steps_per_epoch`` for epochs, ``batch_size`` (samples per optimizer
step, all ranks together) for samples, ``tokens_per_step`` (all ranks together) for tokens.

A front end keeps the duration as given and converts it with the rates of the current run, so a horizon of
``"10M samples"`` stays 10M samples when a resumed run uses another batch size or world size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .checks import check_number

__all__ = ["Duration", "to_steps"]

_UNITS = {
    "ba": "steps",
    "batch": "steps",
    "batches": "steps",
    "step": "steps",
    "steps": "steps",
    "ep": "epochs",
    "epoch": "epochs",
    "epochs": "epochs",
    "sp": "samples",
    "sample": "samples",
    "samples": "samples",
    "tok": "tokens",
    "token": "tokens",
    "tokens": "tokens",
}
_SCALE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
# The unit is matched by name (any case), so that a multiplier letter that starts a unit name backtracks: "1 Batch"
# and "2 Tokens" are 1 step and 2 tokens, "1B tokens" a billion tokens.
_UNIT_NAMES = "|".join(sorted(_UNITS, key=len, reverse=True))
_PATTERN = re.compile(rf"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)\s*([kKMBGT]?)\s*((?i:{_UNIT_NAMES}))\s*$")
_RATE = {"epochs": "steps_per_epoch", "samples": "batch_size", "tokens": "tokens_per_step"}
_RATE_MEANING = {
    "steps_per_epoch": "optimizer steps per epoch",
    "batch_size": "samples per optimizer step, all ranks together",
    "tokens_per_step": "tokens per optimizer step, all ranks together",
}


@dataclass(frozen=True)
class Duration:
    """An amount of training time: ``value`` (> 0) in ``unit`` ("steps", "epochs", "samples" or "tokens")."""

    value: float
    unit: str

    @classmethod
    def parse(cls, text: str, *, name: str = "duration") -> Duration:
        """Read ``"2000ba"``, ``"1ep"``, ``"10M samples"``, ``"5B tokens"``, ...; ``name`` is used in errors."""
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str such as '2000ba' or '10M samples', got {type(text).__name__}")
        match = _PATTERN.match(text)
        unit = _UNITS.get(match.group(3).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"{name}={text!r} is not a duration; write a positive number, an optional K/M/B/T and a unit: "
                "'2000ba' (optimizer steps), '1ep' (epochs), '10M samples' or '5B tokens'"
            )
        value = float(match.group(1)) * _SCALE[match.group(2)]
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name}={text!r} must be a positive, finite duration")
        return cls(value, unit)

    def to_steps(
        self,
        *,
        steps_per_epoch: float | None = None,
        batch_size: float | None = None,
        tokens_per_step: float | None = None,
        name: str = "duration",
    ) -> float:
        """This duration in optimizer steps (a float); raises naming the unit when its rate is missing."""
        if self.unit == "steps":
            return self.value
        rates = {"steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "tokens_per_step": tokens_per_step}
        rate_name = _RATE[self.unit]
        rate = rates[rate_name]
        if rate is None:
            raise ValueError(
                f"{name} is given in {self.unit} ({self.value:g}); pass {rate_name}= "
                f"({_RATE_MEANING[rate_name]}) to convert {self.unit} to optimizer steps"
            )
        hint = f"give the {_RATE_MEANING[rate_name]}, to convert {name} from {self.unit}"
        rate = check_number(rate_name, rate, low=0.0, low_open=True, hint=hint)
        return self.value * rate if self.unit == "epochs" else self.value / rate


def to_steps(
    duration: float | str,
    *,
    steps_per_epoch: float | None = None,
    batch_size: float | None = None,
    tokens_per_step: float | None = None,
    name: str = "duration",
) -> float:
    """``duration`` in optimizer steps: a number is already in steps, a string is parsed by :class:`Duration`.

    Numbers (the duration and the rates) may be Python or numpy numbers or 0-d tensors
    (:func:`polyak.checks.check_number`).
    """
    if isinstance(duration, str):
        parsed = Duration.parse(duration, name=name)
        return parsed.to_steps(
            steps_per_epoch=steps_per_epoch, batch_size=batch_size, tokens_per_step=tokens_per_step, name=name
        )
    hint = "give a number of optimizer steps or a str such as '1ep' or '10M samples'"
    return check_number(name, duration, low=0.0, low_open=True, hint=hint)
