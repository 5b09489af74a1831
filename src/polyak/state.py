"""Declared state: how a front end's saved state is laid out, checked and restored, written once for all of them.

A front end declares its :class:`Spec` (format, how messages name it, its counters, where its K averages go in
the state, the defaults of settings that older files lack); :class:`~polyak.front_end.FrontEnd` then saves,
checks and loads every front end's state with the functions here. Loading checks everything first (format,
settings, counters that no run could produce, every tensor's name, shape and dtype, the random streams, the
shard identity) and changes nothing on error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["Entries", "Keyed", "Layout", "Listed", "Spec", "checked_counters", "damaged", "entry"]


def damaged(what: str, detail: str) -> ValueError:
    return ValueError(f"saved {what} {detail}. The state is damaged: load an intact copy")


def entry(state: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """The entry ``key`` of a saved state, of type ``kind``; a damaged state is refused naming the key."""
    value = state.get(key)
    if not isinstance(value, kind):
        found = "no such entry" if key not in state else f"a {type(value).__name__}"
        raise damaged(what, f"has {found} under {key!r} (expected a {kind.__name__})")
    return value


class Layout:
    """Where the K averages (each a dict of tensors by name, or None before a lazy start) go in a state."""

    def pack(self, averages: list[dict[str, Tensor] | None]) -> dict[str, Any]:
        raise NotImplementedError

    def unpack(self, state: dict[str, Any], count: int, what: str) -> list[dict[str, Tensor] | None]:
        raise NotImplementedError


@dataclass(frozen=True)
class Entries(Layout):
    """One entry per average, under its own key (``("shadow",)``; BEMA's ``("ema", "anchor")``)."""

    keys: tuple[str, ...]

    def pack(self, averages: list[dict[str, Tensor] | None]) -> dict[str, Any]:
        return dict(zip(self.keys, averages, strict=True))

    def unpack(self, state: dict[str, Any], count: int, what: str) -> list[dict[str, Tensor] | None]:
        return [None if key in state and state[key] is None else entry(state, key, dict, what) for key in self.keys]


@dataclass(frozen=True)
class Listed(Layout):
    """A list of the averages under one key (PostHocEMA's ``"shadows"``)."""

    key: str

    def pack(self, averages: list[dict[str, Tensor] | None]) -> dict[str, Any]:
        return {self.key: averages}

    def unpack(self, state: dict[str, Any], count: int, what: str) -> list[dict[str, Tensor] | None]:
        saved = entry(state, self.key, list, what)
        if len(saved) != count:
            raise damaged(what, f"holds {len(saved)} averages under {self.key!r}, this one {count}")
        return [None if s is None else entry({"average": s}, "average", dict, what) for s in saved]


@dataclass(frozen=True)
class Keyed(Layout):
    """A dict of the averages by their names under one key (MultiEMA's ``"averages"``)."""

    key: str
    names: tuple[str, ...] = field(default=())

    def pack(self, averages: list[dict[str, Tensor] | None]) -> dict[str, Any]:
        return {self.key: dict(zip(self.names, averages, strict=True))}

    def unpack(self, state: dict[str, Any], count: int, what: str) -> list[dict[str, Tensor] | None]:
        saved = entry(state, self.key, dict, what)
        if set(saved) != set(self.names):
            raise ValueError(
                f"saved {what} holds averages {sorted(saved)}, this one {sorted(self.names)}; build it with the "
                "same names and decays"
            )
        return [None if saved[n] is None else entry(saved, n, dict, what) for n in self.names]


@dataclass(frozen=True)
class Spec:
    """A front end's declared state.

    Attributes:
        format: the ``"format"`` entry, e.g. ``"polyak.averager/1"``.
        what: how messages name the state, e.g. ``"averager"``.
        layout: where the averages go.
        start: the attribute holding the optimizer steps before averaging begins.
        defaults: settings (``_config`` keys) that files written before they existed lack, with what they meant.
    """

    format: str
    what: str
    layout: Layout
    start: str = "start_step"
    defaults: dict[str, Any] = field(default_factory=dict)


COUNTERS = ("step", "num_updates", "last_update_step")


def checked_counters(state: dict[str, Any], what: str, start: str, start_value: int, every: int) -> dict[str, int]:
    """The counters of a saved state, after refusing values that no run could produce.

    Every ``every``-th step after the start is an update, so after ``step`` steps there were
    ``(step - start) // every`` updates, the last at ``every`` times that.
    """
    counters = {}
    for key in (*COUNTERS, "skipped_updates"):
        value = state.get(key, 0 if key == "skipped_updates" else None)  # older states have no skip count
        if type(value) is not int or not 0 <= value < 2**63:
            raise damaged(what, f"has {key}={value!r}; expected an int in [0, 2**63)")
        counters[key] = value
    updates = max(0, counters["step"] - start_value) // every
    for key, value in {"num_updates": updates, "last_update_step": updates * every}.items():
        if counters[key] != value:
            raise damaged(
                what,
                f"has {key}={counters[key]}, but step={counters['step']} with {start}={start_value} and "
                f"update_every={every} gives {key}={value}",
            )
    if counters["skipped_updates"] > updates:
        raise damaged(what, f"has skipped_updates={counters['skipped_updates']}, more than its num_updates={updates}")
    return counters
