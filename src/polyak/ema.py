"""Front ends: EMA and SWA, each a rule over one average, and the live target and Switch EMA options.

Each says the weight of its one average at each optimizer step (a :class:`~polyak.rules.Rule`); the update, the
storage and the state are :class:`~polyak.front_end.FrontEnd`'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .checks import check_flag, check_int, check_number
from .durations import to_steps
from .front_end import FrontEnd, check_schedule
from .io import CheckpointError, load_torch
from .kernels import Mix
from .live import Target, make_target
from .options import NonFinite, Options, Policy, Rounding
from .rules import ConstantDecay, EqualWeights, HalfLife, Rule
from .state import Entries, Spec

__all__ = ["EMA", "SWA", "Averager", "check_compensate", "load_state", "weight_of"]

_AVERAGER_FORMAT = "polyak.averager/1"


def load_state(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read an averager state saved with ``torch.save(averager.state_dict(), path)``, safely.

    Only tensors and plain Python values are unpickled (``weights_only=True``), and the file is checked first
    (zip CRCs, declared sizes: see :mod:`polyak.io`). A file that is missing raises ``FileNotFoundError``; one
    that is truncated, damaged, not a regular file, or not a polyak state, a one-line ``ValueError``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no averager state at {os.fspath(path)!r}")
    try:
        state, _ = load_torch(path, map_location=map_location, mmap=False)
    except CheckpointError as error:
        reason = str(error).removeprefix(f"{os.fspath(path)}: ")
        raise ValueError(
            f"cannot read averager state {os.fspath(path)!r}: the file is truncated, corrupt or holds "
            f"objects other than tensors and plain values ({reason[:300]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != _AVERAGER_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{os.fspath(path)!r} is not a polyak averager state (format {found!r}, expected {_AVERAGER_FORMAT!r})"
        )
    for counter in ("step", "num_updates", "last_update_step", "skipped_updates", "start_step", "update_every"):
        value = state.get(counter, 0)
        if type(value) is not int or not 0 <= value < 2**63:  # what a torch.int64 step counter can hold
            raise ValueError(
                f"{os.fspath(path)!r} is a damaged averager state: {counter} is {value!r}, expected an integer "
                "in [0, 2**63); re-create the state or load an earlier checkpoint"
            )
    return state


def weight_of(rule: Rule, t: int, delta: int, compensate: bool, blend: bool) -> float:
    """The weight of an update at step ``t`` covering ``delta`` steps: the rule's over all of them (compensated),
    or one step's (``compensate=False``); the first update copies unless the average ``blend``-s from the start
    (a live target, which starts as the model)."""
    if not compensate and (delta < t or blend):  # one step's weight, every k steps
        return 1.0 - rule.decay_at(t)
    if blend:  # the initial copy is the iterate at time 0
        return 1.0 - rule.decay_over(t, delta)
    return rule.weight(t, delta)


def check_compensate(compensate: Any, rules: Iterable[Rule]) -> bool:
    """``compensate`` as a bool, refused for equal weights (SWA), which are exact only when compensated."""
    check_flag("compensate", compensate)
    if not compensate and any(isinstance(rule, EqualWeights) for rule in rules):
        raise ValueError(
            "compensate=False weighs every update by the rule at its step (1/t for equal weights), which is not "
            "an equal average of the updates; SWA is exact for any update_every: leave compensate=True"
        )
    return bool(compensate)


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
        compensate: with ``update_every=k``, give each update the weight of all k steps (``1 - d**k`` for a
            constant decay; default) so that the horizon in optimizer steps stays the same; ``False`` applies
            the plain per-step weight (``1 - d``, the rule at the current step) once every k steps, as
            ema-pytorch, Lightning's ``EMAWeightAveraging`` and Stable-Baselines3 do. Refused for
            :class:`SWA`, whose equal weights are exact only when compensated.
        nonfinite, buffers, frozen, exclude, include_nonpersistent, dtype, device, rounding, lazy, watch: how the
            average is kept (:class:`~polyak.options.Options`): e.g. ``nonfinite="skip"`` leaves out an update
            whose model holds inf or NaN (counted in :attr:`skipped_updates`; a skipped update still counts as a
            step in time), ``dtype=torch.bfloat16, rounding="stochastic"`` halves the memory without stalling,
            ``lazy=True`` allocates nothing before the first update after ``start_step``.
        target: ``"copy"`` or a module of the model's structure: the average is then a live module,
            ``averager.target`` (a target network, a teacher), that starts as the model and blends every update
            into it (the first with weight ``1 - decay``). Its tensors hold the average where they have its
            storage dtype; for a bf16/fp16 model the average is kept apart in float32 (or ``dtype=`` with
            ``rounding=``) and copied into the module after every update, at the cost of that copy's memory
            (``dtype=`` the model's dtype keeps none, and stalls like any low-precision average).
        switch_every: every this many optimizer steps, move the model to the average (Switch EMA,
            arXiv:2402.09240); a multiple of ``update_every``.
        switch_blend: how far the model moves then: ``model + switch_blend * (average - model)``, in (0, 1].
    """

    SPEC = Spec(_AVERAGER_FORMAT, "averager", Entries(("shadow",)), defaults={"target": None, "compensate": True})

    def __init__(
        self,
        model: nn.Module,
        rule: Rule,
        *,
        update_every: int = 1,
        start_step: int = 0,
        compensate: bool = True,
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
        target: Target | None = None,
        switch_every: int | None = None,
        switch_blend: float = 1.0,
    ) -> None:
        self.update_every, self.start_step = check_schedule(model, update_every, "start_step", start_step)
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a polyak.rules.Rule, got {type(rule).__name__}")
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
        self.rule = rule
        self.compensate = check_compensate(compensate, [rule])
        if switch_every is not None:
            switch_every = check_int("switch_every", switch_every, low=1, hint="give optimizer steps, or None")
            if switch_every % self.update_every:
                raise ValueError(
                    f"switch_every: expected a multiple of update_every={self.update_every} (optimizer steps), got "
                    f"{switch_every!r}"
                )
        hint = "1 copies the average into the model"
        self.switch_every = switch_every
        self.switch_blend = check_number("switch_blend", switch_blend, low=0.0, high=1.0, low_open=True, hint=hint)
        if target is not None and lazy:
            raise ValueError("lazy=True allocates the average late; a target module exists from the start")
        self.target: nn.Module | None = None if target is None else make_target(model, target)
        self._init_averages(model, options, 1, target=self.target)

    def _weights(self, t: int) -> tuple[Sequence[float], bool] | None:
        if t == 0 and self.target is not None:  # the step before averaging starts: the target starts here
            return (1.0,), False
        if t < 1 or t % self.update_every:
            return None
        return (weight_of(self.rule, t, t - self.last_update_step, self.compensate, self.target is not None),), True

    def _after_update(self, module: nn.Module, t: int) -> None:
        if self.switch_every is not None and t % self.switch_every == 0:
            blend = self.switch_blend
            self.shadow.write(module, Mix(1.0 - blend, (blend,)) if blend < 1.0 else Mix.copy(0, 1))

    def _config(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "rule": self.rule.config(),
            "update_every": self.update_every,
            "start_step": self.start_step,
            "policy": self.options.saved(),
            "target": None if self.target is None else "module",
            "compensate": self.compensate,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rule={self.rule!r}, update_every={self.update_every}, "
            f"start_step={self.start_step}, step={self.step}, num_updates={self.num_updates}, "
            f"tensors={0 if self._shadow is None else len(self._shadow.names)})"
        )


class EMA(Averager):
    """Exponential moving average of a model's weights.

    Give exactly one of ``decay`` (per optimizer step, e.g. 0.999: a horizon of ~1000 steps), ``tau``
    (``1 - decay``, as RL libraries spell it: ``tau=0.005`` is ``decay=0.995``; ``tau=1`` with
    ``update_every=N`` copies every N steps, DQN's hard update), ``half_life`` or ``rule`` (any
    :mod:`polyak.rules` schedule, e.g. :class:`~polyak.rules.CosineMomentum`).

    ``half_life`` is in optimizer steps, or a duration string converted with the rates of this run:
    ``"2000ba"`` (steps), ``"1ep"`` with ``steps_per_epoch``, ``"10M samples"`` with ``batch_size`` (samples
    per optimizer step, all ranks together), ``"5B tokens"`` with ``tokens_per_step``. A saved state keeps the
    duration as written, so a run resumed with another batch or world size keeps the same horizon in samples.
    ``tau``, ``decay`` and ``total_steps`` of a rule stay per optimizer step. Other keyword arguments
    (``target="copy"`` for a live target network or teacher, ``lazy``, ``switch_every``): see :class:`Averager`.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | None = None,
        *,
        tau: float | None = None,
        half_life: float | str | None = None,
        rule: Rule | None = None,
        steps_per_epoch: float | None = None,
        batch_size: float | None = None,
        tokens_per_step: float | None = None,
        **options: Any,
    ) -> None:
        given = [
            name
            for name, value in (("decay", decay), ("tau", tau), ("half_life", half_life), ("rule", rule))
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"EMA takes exactly one of decay, tau, half_life or rule, got {given or 'none'}; "
                "e.g. EMA(model, decay=0.999) or EMA(model, tau=0.005)"
            )
        if isinstance(decay, (tuple, list)):
            raise TypeError(f"decay must be one number, got {decay!r}; for several decays use polyak.MultiEMA")
        rates = {"steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "tokens_per_step": tokens_per_step}
        self._duration = half_life if isinstance(half_life, str) else None
        if self._duration is None and any(value is not None for value in rates.values()):
            unused = [name for name, value in rates.items() if value is not None]
            raise ValueError(
                f"{unused[0]} converts a half_life given as a duration string (e.g. half_life='10M samples'); "
                f"it has no use with {given[0]}"
            )
        if tau is not None:
            rule = ConstantDecay(1.0 - _check_tau(tau))
        elif half_life is not None:
            rule = HalfLife(to_steps(half_life, name="half_life", **rates))
        elif decay is not None:
            rule = ConstantDecay(decay)
        super().__init__(model, rule, **options)  # type: ignore[arg-type]  # one of them is given

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        if self._duration is not None:  # the horizon as written, not in this run's steps
            config["rule"] = {"type": "HalfLife", "half_life": self._duration}
        return config


def _check_tau(tau: Any) -> float:
    """``tau`` as a float in (0, 1], or a named error."""
    hint = "the weight of the online model per optimizer step; tau=1 copies"
    return check_number("tau", tau, low=0.0, high=1.0, low_open=True, hint=hint)


class SWA(Averager):
    """Stochastic weight averaging: the uniform average of the iterates (Izmailov et al. 2018).

    Typically with ``start_step`` (where the SWA phase begins) and ``update_every`` (e.g. one epoch of
    steps). Recompute BatchNorm statistics afterwards with :func:`polyak.swa_utils.update_bn`.
    Keyword arguments: see :class:`Averager`.
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, EqualWeights(), **options)
