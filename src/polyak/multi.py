"""Several EMAs of one model, of different lengths, kept in one shadow and updated in one read of the model."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .checks import plain
from .ema import _AVERAGER_FORMAT, check_compensate, weight_of
from .front_end import FrontEnd, check_schedule
from .options import Options
from .rules import ConstantDecay, Rule
from .state import Keyed, Spec, damaged, entry

__all__ = ["Average", "MultiEMA"]

_FORMAT = "polyak.multi_ema/2"
_FORMAT_1 = "polyak.multi_ema/1"  # each average a whole averager state (before the one-path redesign)


def _name(decay: float) -> str:
    """A name for a decay that is safe in dotted checkpoint paths: 0.999 -> "0_999" (every digit kept, so that
    0.99991 stays apart from 0.9999)."""
    return repr(float(decay)).replace(".", "_").replace("-", "m").replace("+", "")


class MultiEMA(FrontEnd):
    """K exponential moving averages of one model, e.g. of decays 0.999 and 0.9999, in one pass over it.

    The K averages share one shadow: each model tensor is read once per update for all of them, in every dtype,
    and every option of :class:`~polyak.EMA` (``nonfinite``, ``dtype`` and ``rounding``, ``lazy``, selection)
    applies to all K. Each average is reached by name (:class:`Average`): ``multi["0_999"].swapped(model)``,
    ``.copy_to()``, ``.averaged_model()``, ``.state_dict()`` (an :class:`~polyak.EMA` state, which a plain EMA
    of that decay loads).

    Args:
        model: the model being trained.
        decays: a sequence of decays per optimizer step (named ``"0_999"``, ``"0_9999"``, ...), or a mapping
            from names to decays or :mod:`polyak.rules` rules, e.g. ``{"fast": 0.999, "slow": 0.9999}``.
        update_every, start_step, compensate: the schedule, as :class:`~polyak.EMA`'s, shared by all K.
        options: how the averages are kept (:class:`~polyak.options.Options`: ``nonfinite``, ``dtype``,
            ``rounding``, ``lazy``, selection), shared by all K. A live ``target`` and ``switch_every`` belong
            to one average: use :class:`~polyak.EMA` for those.
    """

    def __init__(
        self,
        model: nn.Module,
        decays: Sequence[float] | Mapping[str, float | Rule],
        *,
        update_every: int = 1,
        start_step: int = 0,
        compensate: bool = True,
        **options: Any,
    ) -> None:
        for key in ("target", "switch_every", "switch_blend"):
            if key in options:
                raise ValueError(f"MultiEMA does not take {key}=; build a polyak.EMA for the one average that needs it")
        self.update_every, self.start_step = check_schedule(model, update_every, "start_step", start_step)
        self.rules = _rules(decays)
        self.compensate = check_compensate(compensate, self.rules.values())
        names = tuple(self.rules)
        self.SPEC = Spec(_FORMAT, "MultiEMA", Keyed("averages", names), defaults={"compensate": True})  # type: ignore[misc]
        self._init_averages(model, Options(**options), len(names))

    def _weights(self, t: int) -> tuple[Sequence[float], bool] | None:
        if t < 1 or t % self.update_every:
            return None
        delta = t - self.last_update_step
        return tuple(weight_of(rule, t, delta, self.compensate, False) for rule in self.rules.values()), True

    def _config(self) -> dict[str, Any]:
        return {
            "rules": {name: rule.config() for name, rule in self.rules.items()},
            "update_every": self.update_every,
            "start_step": self.start_step,
            "policy": self.options.saved(),
            "compensate": self.compensate,
        }

    def __getitem__(self, name: str) -> Average:
        if name not in self.rules:
            raise KeyError(f"no average named {name!r}; this MultiEMA holds {list(self.rules)}")
        return Average(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def items(self) -> Iterator[tuple[str, Average]]:
        """(name, :class:`Average`) pairs, in the order given."""
        return ((name, Average(self, name)) for name in self.rules)

    def select(
        self, model: nn.Module, evaluate: Callable[[nn.Module], float], *, mode: str = "min", **options: Any
    ) -> Any:
        """The average scoring best on ``evaluate(model)``: :func:`polyak.posthoc.select_average` over these."""
        from .posthoc import select_average

        return select_average(self.items(), model, evaluate, mode=mode, **options)  # type: ignore[arg-type]

    def _upgrade(self, state: Any) -> Any:
        """A format /1 state (one whole averager state per average) as one format /2 state."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT_1:
            return state
        saved = entry(state, "averages", dict, "MultiEMA")
        if set(saved) != set(self.rules):
            raise ValueError(f"saved MultiEMA holds averages {sorted(saved)}, this one {sorted(self.rules)}")
        parts = [entry(saved, name, dict, "MultiEMA") for name in self.rules]
        first = parts[0]
        keys = ("step", "num_updates", "last_update_step", "update_every", "start_step", "policy")
        for name, part in zip(self.rules, parts, strict=True):
            if any(part.get(key) != first.get(key) for key in keys):
                raise damaged("MultiEMA", f"has average {name!r} at another step or with other settings than the rest")
        upgraded = {key: first.get(key) for key in keys} | {"format": _FORMAT, "skipped_updates": 0}
        upgraded["rules"] = {name: part.get("rule") for name, part in zip(self.rules, parts, strict=True)}
        upgraded["averages"] = {name: part.get("shadow") for name, part in zip(self.rules, parts, strict=True)}
        if "rounding_state" in first:
            upgraded["rounding_state"] = first["rounding_state"]
        return upgraded | ({"compensate": first["compensate"]} if "compensate" in first else {})

    def __repr__(self) -> str:
        inner = ", ".join(f"{name!r}: {rule!r}" for name, rule in self.rules.items())
        return f"MultiEMA({{{inner}}}, step={self.step})"


def _rules(decays: Any) -> dict[str, Rule]:
    """The averages by name, each a rule (a number is a constant decay, checked there)."""
    if isinstance(decays, Mapping):
        named = dict(decays)
    elif isinstance(decays, Sequence) and not isinstance(decays, str):
        numbers_ = [plain(d) for d in decays]  # numpy numbers and 0-d tensors as Python's
        if any(isinstance(d, bool) or not isinstance(d, numbers.Real) for d in numbers_):
            raise TypeError(
                f"a sequence of decays holds numbers only, got {list(decays)!r}; name rules with a mapping, "
                'e.g. {"teacher": CosineMomentum(...)}'
            )
        named = {_name(d): d for d in numbers_}
        if len(named) != len(decays):
            raise ValueError(f"decays must differ from each other, got {list(decays)!r}")
    else:
        raise TypeError(f"decays must be a sequence of decays or a mapping of names to decays, got {decays!r}")
    if not named:
        raise ValueError("MultiEMA needs at least one decay, got none")
    for name in named:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"average names must be non-empty str without dots (checkpoint paths), got {name!r}")
    return {name: value if isinstance(value, Rule) else ConstantDecay(value) for name, value in named.items()}


class Average:
    """One average of a :class:`MultiEMA`, by name: evaluate, copy or export it as an :class:`~polyak.EMA`'s."""

    def __init__(self, multi: MultiEMA, name: str) -> None:
        self.multi, self.name, self.index = multi, name, list(multi.rules).index(name)
        self.rule = multi.rules[name]

    @property
    def step(self) -> int:
        return self.multi.step

    @property
    def num_updates(self) -> int:
        return self.multi.num_updates

    @property
    def skipped_updates(self) -> int:
        return self.multi.skipped_updates

    @contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Within the block the model holds this average; its own weights come back exactly on exit."""
        with self.multi.swapped(model, self.index) as swapped_model:
            yield swapped_model

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write this average into the model, permanently."""
        self.multi.copy_to(model, self.index)

    def averaged_model(self, *, dtype: torch.dtype | None = None) -> nn.Module:
        """A new module holding this average (eval mode, no grad; see :meth:`polyak.EMA.averaged_model`)."""
        return self.multi.averaged_model(self.index, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        """This average as an :class:`~polyak.EMA` state (format ``polyak.averager/1``): a plain EMA of its rule,
        built with the MultiEMA's settings, loads it."""
        multi = self.multi
        state = multi.state_dict()
        single = {key: state[key] for key in ("update_every", "start_step", "policy", "compensate", "step")}
        single |= {key: state[key] for key in ("num_updates", "last_update_step", "skipped_updates")}
        single |= {"format": _AVERAGER_FORMAT, "kind": "EMA", "rule": self.rule.config(), "target": None}
        single["shadow"] = state["averages"][self.name]
        return single | {key: state[key] for key in ("rounding_state", "started", "shard") if key in state}

    def __repr__(self) -> str:
        return f"Average({self.name!r} of {self.multi!r})"
