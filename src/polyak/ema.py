"""Front ends: EMA and SWA, each a rule plus a shadow plus a step counter."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_flag
from .front_end import FrontEnd, check_schedule
from .rules import ConstantDecay, EqualWeights, HalfLife, Rule
from .shadow import _NONFINITE, NonFinite, Policy, Shadow

__all__ = ["EMA", "SWA", "Averager", "load_state"]

_AVERAGER_FORMAT = "polyak.averager/1"


def load_state(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read an averager state saved with ``torch.save(averager.state_dict(), path)``, safely.

    Only tensors and plain Python values are unpickled (``weights_only=True``). A file that is missing,
    truncated, corrupt or not a polyak state raises a one-line ``ValueError`` (``FileNotFoundError`` if absent).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no averager state at {os.fspath(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... from deep inside
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"cannot read averager state {os.fspath(path)!r}: the file is truncated, corrupt or holds "
            f"objects other than tensors and plain values ({type(error).__name__}: {reason[:200]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != _AVERAGER_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{os.fspath(path)!r} is not a polyak averager state (format {found!r}, expected {_AVERAGER_FORMAT!r})"
        )
    return state


class Averager(FrontEnd):
    """Keeps an average of a model's weights, updated after optimizer steps by a :class:`~polyak.rules.Rule`.

    Call :meth:`update` once after every optimizer step (or :meth:`attach` the optimizer). Time is counted
    in optimizer steps: with ``update_every=k`` the work happens on every k-th call and the rule's weight
    covers all k steps, so the horizon in steps does not change. Nothing happens during the first
    ``start_step`` calls; the first update after that copies the model.

    Args:
        model: the model being trained (DDP / ``torch.compile`` wrappers are fine).
        rule: the weight schedule.
        update_every: optimizer steps between updates (>= 1).
        start_step: optimizer steps to wait before averaging begins (>= 0).
        nonfinite: what an update does when an averaged model tensor holds inf or NaN: ``"propagate"``
            (default, no check: the average turns non-finite too, visibly), ``"skip"`` (the average keeps
            its values, :attr:`skipped_updates` counts it; decided on the device, no host sync) or
            ``"raise"`` (``RuntimeError`` naming the tensor before anything changes; syncs with the device).
            A skipped update still counts as a step in time; a refused one (``"raise"``) does not count at
            all. Steps that ``GradScaler`` skips never reach an attached averager, so they are no steps.
        buffers, frozen, exclude, include_nonpersistent, dtype, device: what is averaged and how it is
            stored; see :class:`~polyak.shadow.Shadow`. By default the average is float32 or wider.
    """

    _FORMAT = _AVERAGER_FORMAT
    _WHAT = "averager"
    _COUNTERS = (*FrontEnd._COUNTERS, "skipped_updates")

    def __init__(
        self,
        model: nn.Module,
        rule: Rule,
        *,
        update_every: int = 1,
        start_step: int = 0,
        nonfinite: NonFinite = "propagate",
        buffers: Policy = "average",
        frozen: Policy = "copy",
        exclude: Iterable[str] = (),
        include_nonpersistent: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_schedule(model, update_every, "start_step", start_step)
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a polyak.rules.Rule, got {type(rule).__name__}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        check_flag("include_nonpersistent", include_nonpersistent)
        self.model = model
        self.rule = rule
        self.update_every = update_every
        self.start_step = start_step
        self.nonfinite: NonFinite = nonfinite
        self.shadow = Shadow(
            model,
            buffers=buffers,
            frozen=frozen,
            exclude=exclude,
            include_nonpersistent=include_nonpersistent,
            dtype=dtype,
            device=device,
        )
        self.step = 0  # optimizer steps seen (calls to update)
        self.num_updates = 0  # updates folded into the average
        self.last_update_step = 0  # averaging time (step - start_step) of the last update
        self._skipped: int | Tensor = 0  # updates skipped for non-finite values (a device tensor once counted)
        self._swapped = False

    # ------------------------------------------------------------------ updating

    def update(self, model: nn.Module | None = None) -> None:
        """Count one optimizer step; on every ``update_every``-th step, fold ``model`` into the average."""
        self._check_not_swapped("update")
        t = self.step + 1 - self.start_step
        if t >= 1 and t % self.update_every == 0:
            weight = self.rule.weight(t, t - self.last_update_step)
            applied = self.shadow.update(self._model(model), weight, nonfinite=self.nonfinite)
            if applied is not None:
                self._skipped = self._skipped + ~applied
            self.last_update_step = t
            self.num_updates += 1
        self.step += 1

    @property
    def skipped_updates(self) -> int:
        """Updates left out for non-finite values (``nonfinite="skip"``); reading it syncs with the device."""
        return int(self._skipped)

    # ------------------------------------------------------------------ using the average

    def _check_ready(self, action: str) -> None:
        self._check_not_swapped(action)
        if self.num_updates == 0:
            raise RuntimeError(
                f"cannot {action} before the first update: the average holds no training step yet "
                f"(step={self.step}, start_step={self.start_step}, update_every={self.update_every}); "
                "check `averager.num_updates > 0` first"
            )

    @contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights; its own come back on exit, even on error.

        Refused (``RuntimeError``) before the first update and while the model is already swapped (by this or
        any other averager). Inside the block, ``model.state_dict()`` warns and is marked as holding the
        average: check a checkpoint with :func:`polyak.is_swapped_state_dict`.
        """
        self._check_ready("swap")
        self._swapped = True
        try:
            with self.shadow.swapped(self._model(model)) as swapped_model:
                yield swapped_model
        finally:
            self._swapped = False

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into the model, permanently."""
        self._check_ready("copy the average")
        self.shadow.copy_to(self._model(model))

    def averaged_model(self) -> nn.Module:
        """A new module (a deep copy of the model) holding the averaged weights, for evaluation or export."""
        self._check_ready("build the averaged model")
        return self.shadow.clone_module(self.model)

    # ------------------------------------------------------------------ checkpoints

    def _config(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "rule": self.rule.config(),
            "update_every": self.update_every,
            "start_step": self.start_step,
            "policy": self.shadow.policy(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: counters, configuration (checked on load), tensors.

        Allowed inside ``swapped()``: a swap backs the model up and leaves the average itself untouched, so
        a checkpoint taken during evaluation holds the same average as one taken outside.
        """
        return self._state(shadow=self.shadow.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; raises before changing anything if it does not fit."""
        counters = self._checked_counters(state)
        self.shadow.load_state_dict(self._entry(state, "shadow", dict))
        self._set_counters(counters)
        self._skipped = counters["skipped_updates"]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rule={self.rule!r}, update_every={self.update_every}, "
            f"start_step={self.start_step}, step={self.step}, num_updates={self.num_updates}, "
            f"tensors={len(self.shadow.names)})"
        )


class EMA(Averager):
    """Exponential moving average of a model's weights.

    Give exactly one of ``decay`` (per optimizer step, e.g. 0.999: a horizon of ~1000 steps),
    ``half_life`` (in optimizer steps) or ``rule`` (any :mod:`polyak.rules` schedule, e.g. a warm-up).
    Other keyword arguments: see :class:`Averager`.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        rule: Rule | None = None,
        **options: Any,
    ) -> None:
        given = [
            name for name, value in (("decay", decay), ("half_life", half_life), ("rule", rule)) if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"EMA takes exactly one of decay, half_life or rule, got {given or 'none'}; "
                "e.g. EMA(model, decay=0.999)"
            )
        if rule is None:
            rule = ConstantDecay(decay) if decay is not None else HalfLife(half_life)  # type: ignore[arg-type]
        super().__init__(model, rule, **options)


class SWA(Averager):
    """Stochastic weight averaging: the uniform average of the iterates (Izmailov et al. 2018).

    Typically with ``start_step`` (where the SWA phase begins) and ``update_every`` (e.g. one epoch of
    steps). Recompute BatchNorm statistics afterwards with :func:`polyak.swa_utils.update_bn`.
    Keyword arguments: see :class:`Averager`.
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, EqualWeights(), **options)
