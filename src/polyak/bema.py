"""BEMA: an EMA with its lag corrected (Block & Zhang 2025, "EMA Without the Lag", arXiv:2508.00180).

With ``s = step - burn_in`` optimizer steps since averaging began, on every ``update_every``-th step

    EMA_s  = (1 - beta_s) EMA_{s'} + beta_s theta_s,       beta_s  = (rho + gamma s) ** -kappa
    output = EMA_s + alpha_s (theta - theta_0),            alpha_s = (rho + gamma s) ** -eta

where ``s'`` is the previous update and ``theta_0`` and the EMA are the weights at ``s = 0`` (the model as given
to the constructor when ``burn_in`` is 0). The schedules use the step count ``s`` (not the update count) and
are not compounded over the steps between updates. The published implementations differ here: the authors'
offline code uses ``(1 + gamma (s + rho))`` and ``(1 + s + rho)``, their online callback multiplies outside the
power, and TRL counts from the global step rather than from the burn-in; this is the paper's formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .checks import check_flag, check_number
from .front_end import FrontEnd, check_schedule, eager_when_compiled
from .module_tensors import copy_module
from .shadow import Policy, Shadow, extrapolated, write_extrapolated

__all__ = ["BEMA"]

_FORMAT = "polyak.bema/1"


class BEMA(FrontEnd):
    """Bias-corrected EMA of a model's weights; same front end as :class:`polyak.EMA`.

    Stores two copies (``theta_0`` and the EMA, float32 or wider); the corrected output is written into a
    model only when asked (:meth:`swapped`, :meth:`copy_to`, :meth:`averaged_model`), from the model's current
    weights ``theta`` and ``alpha`` of the last update.

    Args:
        model: the model being trained.
        kappa: power of the EMA weight ``beta_s = (rho + gamma s) ** -kappa`` (0.5; 0 turns the EMA off).
        eta: power of the correction ``alpha_s = (rho + gamma s) ** -eta`` (0.2; None turns it off: a plain EMA).
        gamma: multiplier of ``s`` in both schedules (1.0). rho: offset (lag) in both schedules (10.0).
        burn_in: optimizer steps before averaging; ``theta_0`` and the EMA are taken at that step (0).
        update_every: optimizer steps between updates (1).
        buffers: which buffers take part; this and ``frozen``, ``exclude``, ``include_nonpersistent``,
            ``dtype`` and ``device`` are :class:`~polyak.shadow.Shadow`'s options.
    """

    _FORMAT = _FORMAT
    _WHAT = "BEMA"
    _START = "burn_in"

    def __init__(
        self,
        model: nn.Module,
        *,
        kappa: float = 0.5,
        eta: float | None = 0.2,
        gamma: float = 1.0,
        rho: float = 10.0,
        burn_in: int = 0,
        update_every: int = 1,
        buffers: Policy = "average",
        frozen: Policy = "copy",
        exclude: Iterable[str] = (),
        include_nonpersistent: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_schedule(model, update_every, "burn_in", burn_in)
        self.kappa = check_number("kappa", kappa, low=0.0, hint="0.5 is the paper's value; 0 turns the EMA off")
        self.eta = None if eta is None else check_number("eta", eta, low=0.0, hint="0.2 is the paper's value")
        self.gamma = check_number("gamma", gamma, low=0.0, low_open=True, hint="1.0 is the paper's value")
        self.rho = check_number("rho", rho, low=0.0, hint="10.0 is the paper's value")
        if self.rho + self.gamma < 1:
            raise ValueError(
                f"rho: expected rho + gamma >= 1 (so that beta <= 1), got rho={rho!r} with gamma={gamma!r}; raise rho"
            )
        check_flag("include_nonpersistent", include_nonpersistent)
        self.model = model
        self.burn_in = burn_in
        self.update_every = update_every
        options: dict[str, Any] = dict(
            buffers=buffers,
            frozen=frozen,
            exclude=tuple(exclude),
            include_nonpersistent=include_nonpersistent,
            dtype=dtype,
            device=device,
        )
        self.ema = Shadow(model, **options)
        self.anchor = Shadow(model, **options)  # theta_0
        self.step = 0
        self.num_updates = 0
        self.last_update_step = 0  # s of the last update
        self._swapped = False

    def beta(self, s: int) -> float:
        """Weight of the new iterate in the EMA update at ``s`` steps since averaging began."""
        return (self.rho + self.gamma * s) ** -self.kappa

    def alpha(self, s: int) -> float:
        """Weight of the correction ``theta - theta_0`` at ``s`` steps since averaging began."""
        return 0.0 if self.eta is None else (self.rho + self.gamma * s) ** -self.eta

    @eager_when_compiled  # inside a compiled step: one graph break, no recompile per step
    def update(self, model: nn.Module | None = None) -> None:
        """Count one optimizer step; take ``theta_0`` at the burn-in step; update the EMA every ``update_every``."""
        self._check_not_swapped("update")
        s = self.step + 1 - self.burn_in
        if s == 0:
            self.anchor.copy_from(self._model(model))
            self.ema.copy_from(self._model(model))
        elif s >= 1 and s % self.update_every == 0:
            self.ema.update(self._model(model), min(1.0, self.beta(s)))
            self.last_update_step = s
            self.num_updates += 1
        self.step += 1  # counted once the update went through

    def _ready(self, action: str) -> float:
        self._check_not_swapped(action)
        if self.num_updates == 0:
            raise RuntimeError(
                f"cannot {action} before the first update (step={self.step}, burn_in={self.burn_in}, "
                f"update_every={self.update_every}); check `bema.num_updates > 0` first"
            )
        return self.alpha(self.last_update_step)

    @contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Within the block the model holds the BEMA output; its own weights come back exactly on exit."""
        alpha = self._ready("swap")
        self._swapped = True
        try:
            with extrapolated(self._model(model), self.ema, self.anchor, alpha) as swapped_model:
                yield swapped_model
        finally:
            self._swapped = False

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the BEMA output (from the model's current weights) into the model, permanently."""
        write_extrapolated(self._model(model), self.ema, self.anchor, self._ready("copy the average"))

    def averaged_model(self) -> nn.Module:
        """A new module (a deep copy of the model) holding the BEMA output."""
        alpha = self._ready("build the averaged model")
        duplicate = copy_module(self.model)
        write_extrapolated(duplicate, self.ema, self.anchor, alpha)
        return duplicate

    def _config(self) -> dict[str, Any]:
        return {
            "kappa": self.kappa,
            "eta": self.eta,
            "gamma": self.gamma,
            "rho": self.rho,
            "burn_in": self.burn_in,
            "update_every": self.update_every,
            "policy": self.ema.policy(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters, configuration (checked on load), the EMA and ``theta_0``; allowed inside ``swapped()``."""
        self.ema.check(self.model)  # a model changed since the last update: refused here too
        return self._state(ema=self.ema.state_dict(), anchor=self.anchor.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises before changing anything if it does not fit."""
        counters = self._checked_counters(state)
        ema, anchor = self._entry(state, "ema", dict), self._entry(state, "anchor", dict)
        self.ema.check_state_dict(ema)
        self.anchor.check_state_dict(anchor)
        self.ema.load_state_dict(ema)
        self.anchor.load_state_dict(anchor)
        self._set_counters(counters)

    def __repr__(self) -> str:
        return (
            f"BEMA(kappa={self.kappa}, eta={self.eta}, gamma={self.gamma}, rho={self.rho}, burn_in={self.burn_in}, "
            f"update_every={self.update_every}, step={self.step}, num_updates={self.num_updates})"
        )
