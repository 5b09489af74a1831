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

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .checks import check_number
from .front_end import FrontEnd, check_schedule
from .kernels import Mix
from .options import NonFinite, Options, Policy, Rounding
from .state import Entries, Spec

__all__ = ["BEMA"]


class BEMA(FrontEnd):
    """Bias-corrected EMA of a model's weights; same front end as :class:`polyak.EMA`.

    Stores two averages in one shadow (``theta_0`` and the EMA, float32 or wider): the anchor is the EMA's twin
    kept with weight 0 after its copy. The corrected output is written into a model only when asked
    (:meth:`swapped`, :meth:`copy_to`, :meth:`averaged_model`), from the model's current weights ``theta`` and
    ``alpha`` of the last update; averaged buffers (BatchNorm statistics) get the EMA itself, since an
    extrapolated running variance could turn negative.

    Args:
        model: the model being trained.
        kappa: power of the EMA weight ``beta_s = (rho + gamma s) ** -kappa`` (0.5; 0 turns the EMA off).
        eta: power of the correction ``alpha_s = (rho + gamma s) ** -eta`` (0.2; None turns it off: a plain EMA).
        gamma: multiplier of ``s`` in both schedules (1.0). rho: offset (lag) in both schedules (10.0).
        burn_in: optimizer steps before averaging; ``theta_0`` and the EMA are taken at that step (0).
        update_every: optimizer steps between updates (1).
        nonfinite, buffers, frozen, exclude, include_nonpersistent, dtype, device, rounding, lazy, watch: how the
            averages are kept (:class:`~polyak.options.Options`), as for :class:`~polyak.EMA`.
    """

    SPEC = Spec("polyak.bema/1", "BEMA", Entries(("ema", "anchor")), start="burn_in")

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
        nonfinite: NonFinite = "propagate",
        buffers: Policy = "average",
        frozen: Policy = "copy",
        exclude: Iterable[str] = (),
        include_nonpersistent: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        rounding: Rounding = "nearest",
        lazy: bool = False,
        watch: bool = True,
    ) -> None:
        self.update_every, self.burn_in = check_schedule(model, update_every, "burn_in", burn_in)
        self.kappa = check_number("kappa", kappa, low=0.0, hint="0.5 is the paper's value; 0 turns the EMA off")
        self.eta = None if eta is None else check_number("eta", eta, low=0.0, hint="0.2 is the paper's value")
        self.gamma = check_number("gamma", gamma, low=0.0, low_open=True, hint="1.0 is the paper's value")
        self.rho = check_number("rho", rho, low=0.0, hint="10.0 is the paper's value")
        if self.rho + self.gamma < 1:
            raise ValueError(
                f"rho: expected rho + gamma >= 1 (so that beta <= 1), got rho={rho!r} with gamma={gamma!r}; raise rho"
            )
        options = Options(
            buffers=buffers,
            frozen=frozen,
            exclude=exclude,  # type: ignore[arg-type]  # checked and made a tuple there
            include_nonpersistent=include_nonpersistent,
            dtype=dtype,
            device=device,  # type: ignore[arg-type]  # checked and made a device there
            rounding=rounding,
            nonfinite=nonfinite,
            lazy=lazy,
            watch=watch,
        )
        self._init_averages(model, options, 2)

    def beta(self, s: int) -> float:
        """Weight of the new iterate in the EMA update at ``s`` steps since averaging began."""
        return (self.rho + self.gamma * s) ** -self.kappa

    def alpha(self, s: int) -> float:
        """Weight of the correction ``theta - theta_0`` at ``s`` steps since averaging began."""
        return 0.0 if self.eta is None else (self.rho + self.gamma * s) ** -self.eta

    def _weights(self, s: int) -> tuple[Sequence[float], bool] | None:
        if s == 0:  # the burn-in step: theta_0 and the EMA start here
            return (1.0, 1.0), False
        if s < 1 or s % self.update_every:
            return None
        return (min(1.0, self.beta(s)), 0.0), True

    def _mix(self, index: int) -> tuple[Mix, Mix | None]:
        """``EMA + alpha (theta - theta_0)`` for parameters; the EMA itself for buffers."""
        if index != 0:
            raise ValueError(f"BEMA has one output; index must be 0, got {index!r}")
        alpha = self.alpha(self.last_update_step)
        return Mix(alpha, (1.0, -alpha)), Mix.copy(0, 2)

    def _config(self) -> dict[str, Any]:
        return {
            "kappa": self.kappa,
            "eta": self.eta,
            "gamma": self.gamma,
            "rho": self.rho,
            "burn_in": self.burn_in,
            "update_every": self.update_every,
            "policy": self.options.saved(),
        }

    def __repr__(self) -> str:
        return (
            f"BEMA(kappa={self.kappa}, eta={self.eta}, gamma={self.gamma}, rho={self.rho}, burn_in={self.burn_in}, "
            f"update_every={self.update_every}, step={self.step}, num_updates={self.num_updates})"
        )
