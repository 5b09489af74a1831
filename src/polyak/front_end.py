"""What every polyak front end shares: the model it follows, the optimizer hook, the swap guard, checked states.

A front end (``EMA``, ``SWA``, ``BEMA``, ``PostHocEMA``) composes rules and shadows; this base holds only the
plumbing around them, so that each behaves the same way where users touch it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .checks import check_int

__all__ = ["FrontEnd", "check_schedule", "eager_when_compiled"]

_F = TypeVar("_F", bound=Callable[..., Any])


def eager_when_compiled(update: _F) -> _F:
    """Run ``update`` eagerly when dynamo traces it (one graph break), so a compiled step does not recompile.

    Traced, an update's Python counters would be guarded on and recompiled for at every step until dynamo's
    limit. Outside tracing the check costs ~0.15 us (``torch.compiler.disable`` alone: ~1.5 us per call).
    """
    eager = torch.compiler.disable(update)

    @functools.wraps(update)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            return eager(*args, **kwargs)
        return update(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_schedule(model: Any, update_every: Any, start_name: str, start: Any) -> None:
    """Raise a named error unless ``model`` is a module, ``update_every`` an int >= 1 and ``start`` an int >= 0."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_int("update_every", update_every, low=1, hint="give the optimizer steps between updates, e.g. 1")
    check_int(start_name, start, low=0, hint="give the optimizer steps before averaging begins, e.g. 0")


class FrontEnd:
    """Base of the front ends. A subclass sets ``model`` and the counters ``step``, ``num_updates`` and
    ``last_update_step`` (optimizer steps, updates, averaging time of the last update), and defines
    :meth:`update` and ``_config()`` (the settings a saved state must match)."""

    _FORMAT: ClassVar[str]  # the "format" entry of a saved state
    _WHAT: ClassVar[str]  # how messages name this kind of state, e.g. "averager"
    _COUNTERS: ClassVar[tuple[str, ...]] = ("step", "num_updates", "last_update_step")
    _START: ClassVar[str] = "start_step"  # the attribute holding the optimizer steps before averaging begins
    model: nn.Module
    update_every: int
    step: int
    num_updates: int
    last_update_step: int
    _swapped: bool = False

    def update(self, model: nn.Module | None = None) -> None:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _model(self, model: nn.Module | None) -> nn.Module:
        return self.model if model is None else model

    def _check_not_swapped(self, action: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"cannot {action} while the averaged weights are swapped into the model; "
                "leave the `with ....swapped(model):` block first"
            )

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> RemovableHandle:
        """Call :meth:`update` after every ``optimizer.step()``; returns the hook handle.

        Steps that do not run (e.g. skipped by ``GradScaler`` for inf/NaN gradients) are not counted.
        """
        return optimizer.register_step_post_hook(lambda *_: self.update(model))

    def _state(self, **tensors: Any) -> dict[str, Any]:
        """A saved state: format, settings, counters, then the given tensor entries."""
        return {
            "format": self._FORMAT,
            **self._config(),
            **{key: getattr(self, key) for key in self._COUNTERS},
            **tensors,
        }

    def _checked_counters(self, state: Any) -> dict[str, int]:
        """The counters of a saved ``state`` after checking its format, settings and counters (changes nothing)."""
        self._check_not_swapped("load a state")
        if not isinstance(state, dict) or state.get("format") != self._FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a polyak {self._WHAT} state (format {found!r}, expected {self._FORMAT!r})")
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(
                    f"saved {self._WHAT} has {key}={state.get(key)!r} but this one has {key}={value!r}; "
                    f"build the {self._WHAT} with the same settings before loading"
                )
        counters = {}
        for key in self._COUNTERS:
            value = state.get(key)
            if type(value) is not int or value < 0:
                raise ValueError(f"saved {self._WHAT} has {key}={value!r}; expected an int >= 0. The state is damaged")
            counters[key] = value
        self._check_consistent(counters)
        return counters

    def _check_consistent(self, counters: dict[str, int]) -> None:
        """Refuse counters that no run could produce: each is fixed by ``step``, ``update_every`` and the start.

        Every ``update_every``-th step after the start is an update, so after ``step`` steps there were
        ``(step - start) // update_every`` updates, the last at ``update_every`` times that.
        """
        step, every, start = counters["step"], self.update_every, getattr(self, self._START)
        updates = max(0, step - start) // every
        expected = {"num_updates": updates, "last_update_step": updates * every}
        for key, value in expected.items():
            if counters[key] != value:
                raise ValueError(
                    f"saved {self._WHAT} has {key}={counters[key]}, but step={step} with {self._START}={start} and "
                    f"update_every={every} gives {key}={value}. The state is damaged: load an intact copy"
                )
        if counters.get("skipped_updates", 0) > updates:
            raise ValueError(
                f"saved {self._WHAT} has skipped_updates={counters['skipped_updates']}, more than its "
                f"num_updates={updates}. The state is damaged: load an intact copy"
            )

    def _entry(self, state: dict[str, Any], key: str, kind: type) -> Any:
        """The entry ``key`` of a saved state, of type ``kind``; a damaged state is refused naming the key."""
        value = state.get(key)
        if not isinstance(value, kind):
            found = "no such entry" if key not in state else f"a {type(value).__name__}"
            raise ValueError(
                f"saved {self._WHAT} has {found} under {key!r} (expected a {kind.__name__}). "
                "The state is damaged: load an intact copy"
            )
        return value

    def _set_counters(self, counters: dict[str, int]) -> None:
        for key in ("step", "num_updates", "last_update_step"):
            setattr(self, key, counters[key])
