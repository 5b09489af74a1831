"""Several EMAs of one model, each a full :class:`~polyak.EMA`, updated together in one read of the model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .ema import EMA
from .rules import Rule
from .shadow import check_same_layout, update_many

__all__ = ["MultiEMA"]

_FORMAT = "polyak.multi_ema/1"


def _name(decay: float) -> str:
    """A name for a decay that is safe in dotted checkpoint paths: 0.999 -> "0_999"."""
    return f"{decay:g}".replace(".", "_").replace("-", "m")


class MultiEMA:
    """K exponential moving averages of one model, e.g. of decays 0.999 and 0.9999, in one pass over it.

    Each model tensor is read once per update for all K averages (a tensor that must be cast or moved is
    staged once). Every average is an :class:`~polyak.EMA` of its own, reached by name: swap it in with
    ``multi["0_999"].swapped(model)``, export it with ``multi["0_999"].state_dict()`` or ``copy_to``.

    Args:
        model: the model being trained.
        decays: a sequence of decays per optimizer step (named ``"0_999"``, ``"0_9999"``, ...), or a mapping
            from names to decays or :mod:`polyak.rules` rules, e.g. ``{"fast": 0.999, "slow": 0.9999}``.
        options: as :class:`~polyak.EMA` (``update_every``, ``start_step``, ``lazy``, dtype and selection),
            shared by all K averages. A live ``target`` and ``switch_every`` belong to one average: use
            :class:`~polyak.EMA` for those.
    """

    def __init__(self, model: nn.Module, decays: Sequence[float] | Mapping[str, float | Rule], **options: Any) -> None:
        for key in ("target", "switch_every"):
            if options.get(key) is not None:
                raise ValueError(f"MultiEMA does not take {key}=; build a polyak.EMA for the one average that needs it")
        if isinstance(decays, Mapping):
            named = dict(decays)
        elif isinstance(decays, Sequence) and not isinstance(decays, str):
            if not all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in decays):
                raise TypeError(
                    f"a sequence of decays holds numbers only, got {list(decays)!r}; name rules with a mapping, "
                    'e.g. {"teacher": CosineMomentum(...)}'
                )
            named = {_name(float(d)): d for d in decays}
            if len(named) != len(decays):
                raise ValueError(f"decays must differ from each other, got {list(decays)!r}")
        else:
            raise TypeError(f"decays must be a sequence of decays or a mapping of names to decays, got {decays!r}")
        if not named:
            raise ValueError("MultiEMA needs at least one decay, got none")
        self.averages: dict[str, EMA] = {}
        for name, value in named.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"average names must be non-empty str without dots (checkpoint paths), got {name!r}")
            given = {"rule": value} if isinstance(value, Rule) else {"decay": value}
            self.averages[name] = EMA(model, **given, **options)
        self.model = model
        first = next(iter(self.averages.values()))
        for other in self.averages.values():
            if first._shadow is not None and other._shadow is not None:
                check_same_layout(first.shadow, other.shadow)

    def __getitem__(self, name: str) -> EMA:
        if name not in self.averages:
            raise KeyError(f"no average named {name!r}; this MultiEMA holds {list(self.averages)}")
        return self.averages[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.averages)

    def __len__(self) -> int:
        return len(self.averages)

    def items(self) -> Iterator[tuple[str, EMA]]:
        """(name, EMA) pairs, in the order given."""
        return iter(self.averages.items())

    def update(self, model: nn.Module | None = None) -> None:
        """Count one optimizer step; when due, fold ``model`` into every average in one pass."""
        members = list(self.averages.values())
        for member in members:
            member._check_not_swapped("update")
        module = self.model if model is None else model
        weights = [member._begin_update(module) for member in members]
        if weights[0] is not None:
            if members[0].nonfinite == "propagate":
                update_many([member.shadow for member in members], module, weights)  # type: ignore[arg-type]
                for member in members:
                    member._end_update(module, None)
            else:
                for member, weight in zip(members, weights, strict=True):
                    member._end_update(module, member.shadow.update(module, weight, nonfinite=member.nonfinite))  # type: ignore[arg-type]
        for member in members:
            member.step += 1

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> RemovableHandle:
        """Call :meth:`update` after every ``optimizer.step()``; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.update(model))

    def state_dict(self) -> dict[str, Any]:
        """Each average's :meth:`~polyak.EMA.state_dict`, by name."""
        return {"format": _FORMAT, "averages": {name: ema.state_dict() for name, ema in self.averages.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every average by name; checks all of them before changing any."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a polyak MultiEMA state (format {found!r}, expected {_FORMAT!r})")
        saved = state.get("averages")
        if not isinstance(saved, dict) or set(saved) != set(self.averages):
            names = sorted(saved) if isinstance(saved, dict) else saved
            raise ValueError(
                f"saved MultiEMA holds averages {names!r}, this one {sorted(self.averages)}; build it with the same "
                'decays, or load one average with multi["name"].load_state_dict(state["averages"]["name"])'
            )
        for name, ema in self.averages.items():  # check everything first
            counters = ema._checked_counters(saved[name])
            if saved[name].get("shadow") is not None and ema._shadow is not None:
                ema._shadow.check_state_dict(saved[name]["shadow"])
            elif saved[name].get("shadow") is None and counters["num_updates"]:
                raise ValueError(f"saved average {name!r} has no tensors after {counters['num_updates']} updates")
        for name, ema in self.averages.items():
            ema.load_state_dict(saved[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{name!r}: {ema.rule!r}" for name, ema in self.averages.items())
        return f"MultiEMA({{{inner}}}, step={next(iter(self.averages.values())).step})"

    def select(
        self, model: nn.Module, evaluate: Callable[[nn.Module], float], *, mode: str = "min", **options: Any
    ) -> Any:
        """The average scoring best on ``evaluate(model)``: :func:`polyak.posthoc.select_average` over these."""
        from .posthoc import select_average

        return select_average(self.items(), model, evaluate, mode=mode, **options)  # type: ignore[arg-type]
