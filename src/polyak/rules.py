"""Weight schedules: how much of the new iterate enters the average at each update.

Every averager in polyak applies ``shadow <- shadow + w * (theta - shadow)``. A rule says ``w``.

Time is explicit. ``step`` (t >= 1) counts optimizer steps since averaging began, the current one
included; ``delta`` (1 <= delta <= t) is the number of those steps since the previous update. Each
rule is defined by a per-step decay ``beta_j`` (the weight kept on the old average at step j), and an
update that covers steps ``t - delta + 1 .. t`` uses

    w = 1 - prod_{j = t - delta + 1}^{t} beta_j

so updating every k steps keeps the horizon in steps (constant decay d gives w = 1 - d**k), and the
first update (delta == t) copies. Rules are pure arithmetic on Python floats (float64).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from .checks import check_int, check_number

__all__ = [
    "ConstantDecay",
    "CosineMomentum",
    "DebiasedDecay",
    "EqualWeights",
    "HalfLife",
    "LinearMomentum",
    "PowerFunction",
    "PowerWarmup",
    "RationalWarmup",
    "Rule",
    "gamma_to_sigma_rel",
    "rule_from_config",
    "sigma_rel_to_gamma",
]


def _check_step(step: int, delta: int) -> tuple[int, int]:
    """``step`` and ``delta`` as plain ints, after checking ``1 <= delta <= step``."""
    if type(step) is int and type(delta) is int and 1 <= delta <= step:  # every call from a front end: ~0.1 us
        return step, delta
    step, delta = check_int("step", step, low=1), check_int("delta", delta, low=1)
    if delta > step:
        raise ValueError(f"delta: expected 1 <= delta <= step={step}, got {delta}")
    return step, delta


def _check_decay(decay: float, name: str = "decay") -> float:
    return check_number(
        name, decay, low=0.0, high=1.0, high_open=True, hint="e.g. 0.999 (a decay of 1 would never update)"
    )


def _check_positive(name: str, value: Any, hint: str = "") -> float:
    return check_number(name, value, low=0.0, low_open=True, hint=hint)


class Rule(ABC):
    """A weight schedule. Subclasses define ``decay_at(j)`` and may give a closed form for products."""

    def weight(self, step: int, delta: int = 1) -> float:
        """Weight in [0, 1] of the iterate at ``step`` for an update covering ``delta`` steps."""
        step, delta = _check_step(step, delta)
        if delta == step:
            return 1.0
        return 1.0 - self.decay_over(step, delta)

    def decay_over(self, step: int, delta: int) -> float:
        """Product of the per-step decays over steps ``step - delta + 1 .. step`` (step - delta >= 1)."""
        product = 1.0
        for j in range(step - delta + 1, step + 1):
            product *= self.decay_at(j)
        return product

    @abstractmethod
    def decay_at(self, j: int) -> float:
        """Per-step decay at step ``j >= 1`` (an average that starts with a copy never uses step 1's)."""

    def config(self) -> dict[str, Any]:
        """Hyper-parameters, as saved in a state dict and compared on load."""
        fields: dict[str, Any] = asdict(self) if is_dataclass(self) else {}
        return {"type": type(self).__name__, **fields}


@dataclass(frozen=True)
class ConstantDecay(Rule):
    """EMA with a constant per-step decay d: ``beta_j = d``, so ``w = 1 - d**delta``.

    The first update copies, as ``torch.optim.swa_utils.AveragedModel`` does.
    """

    decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_decay(self.decay))

    def decay_at(self, j: int) -> float:
        return self.decay

    def decay_over(self, step: int, delta: int) -> float:
        return self.decay**delta


@dataclass(frozen=True)
class HalfLife(ConstantDecay):
    """EMA whose weights halve every ``half_life`` steps: ``d = 0.5 ** (1 / half_life)``."""

    decay: float = 0.0
    half_life: float = 1.0

    def __init__(self, half_life: float) -> None:
        half_life = _check_positive("half_life", half_life, "give the half-life in optimizer steps, e.g. 1000")
        decay = 0.5 ** (1.0 / half_life)
        if decay == 1.0:
            raise ValueError(
                f"half_life: expected at most ~6e15 steps, got {half_life!r}; the per-step decay rounds to 1"
            )
        object.__setattr__(self, "half_life", half_life)
        object.__setattr__(self, "decay", decay)


@dataclass(frozen=True)
class DebiasedDecay(Rule):
    """Zero-initialised EMA divided by ``1 - d**t`` (Adam's bias correction, TF ``zero_debias``).

    Equivalent to a copy-initialised EMA with ``beta_t = d (1 - d**(t-1)) / (1 - d**t)``; the product over
    an interval telescopes to ``w = (1 - d**delta) / (1 - d**t)``. Early on it is the running mean (SWA),
    later the plain EMA. Kingma & Ba, arXiv:1412.6980, section 3.
    """

    decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_decay(self.decay))

    def decay_at(self, j: int) -> float:
        d = self.decay
        return d * (1.0 - d ** (j - 1)) / (1.0 - d**j)

    def decay_over(self, step: int, delta: int) -> float:
        d = self.decay
        return d**delta * (1.0 - d ** (step - delta)) / (1.0 - d**step)


@dataclass(frozen=True)
class RationalWarmup(Rule):
    """Decay ramped up as ``min(d, (1 + n) / (10 + n))`` with ``n = j - 1`` steps before this one.

    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``; diffusers' ``EMAModel`` without
    ``use_ema_warmup`` uses the same offsets (first update copies, the second uses 2/11).
    """

    decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_decay(self.decay))

    def decay_at(self, j: int) -> float:
        n = j - 1
        return min(self.decay, (1.0 + n) / (10.0 + n))


@dataclass(frozen=True)
class PowerWarmup(Rule):
    """Decay ramped up as ``1 - (1 + n / inv_gamma) ** -power`` in ``[min_decay, d]``, ``n = j - 1 + offset``.

    The warm-up of timm's ``ModelEmaV3(use_warmup=True)``, diffusers' ``use_ema_warmup`` and ema-pytorch (K.
    Crowson). ``power=2/3`` reaches 0.999 after ~31.6k steps; ``power=3/4`` after ~10k. ``offset`` (steps, may be
    negative; ``n`` is floored at 0) moves the warm-up's clock against the start of averaging: ema-pytorch counts
    it from ``update_after_step``, which can lie off the ``update_every`` grid (see :mod:`polyak.migrate`).
    """

    decay: float
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    offset: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_decay(self.decay))
        object.__setattr__(self, "min_decay", _check_decay(self.min_decay, "min_decay"))
        object.__setattr__(self, "inv_gamma", _check_positive("inv_gamma", self.inv_gamma, "1.0 is the usual value"))
        object.__setattr__(self, "power", _check_positive("power", self.power, "2/3 or 3/4 are the usual values"))
        if self.min_decay > self.decay:
            raise ValueError(
                f"min_decay: expected at most decay={self.decay}, got {self.min_decay}; lower min_decay or raise decay"
            )
        hint = "steps from the start of averaging to the warm-up clock"
        object.__setattr__(self, "offset", check_int("offset", self.offset, low=-(2**62), hint=hint))

    def decay_at(self, j: int) -> float:
        n = max(0, j - 1 + self.offset)
        value = 1.0 - (1.0 + n / self.inv_gamma) ** (-self.power)
        return min(max(value, self.min_decay), self.decay)

    def config(self) -> dict[str, Any]:
        config = super().config()
        if not self.offset:  # states saved before offset existed compare equal
            del config["offset"]
        return config


@dataclass(frozen=True)
class EqualWeights(Rule):
    """Uniform average of the iterates (SWA): ``beta_j = (j - 1) / j``, so ``w = delta / t``.

    With regular updates this is ``1 / (n + 1)`` after n earlier updates, torch's SWA average; with
    irregular intervals each iterate is weighted by the steps it stands for. Izmailov et al. 2018.
    """

    def decay_at(self, j: int) -> float:
        return (j - 1) / j

    def decay_over(self, step: int, delta: int) -> float:
        return (step - delta) / step


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent ``gamma`` (> 0).

    ``sigma_rel = sqrt((g + 1) / ((g + 2)**2 (g + 3)))``; Karras et al. 2024, arXiv:2312.02696, eq. 123.
    """
    g = _check_positive("gamma", gamma, "e.g. 6.94 (sigma_rel 0.10) or 16.97 (sigma_rel 0.05)")
    return math.sqrt((g + 1.0) / (g + 3.0)) / (g + 2.0)  # the same, without overflow for a huge gamma


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma`` of the power-function profile of relative width ``sigma_rel``.

    ``gamma`` is the largest real root of ``g**3 + 7 g**2 + (16 - s) g + (12 - s)`` with ``s = sigma_rel**-2``
    (arXiv:2312.02696, eq. 126). Requires ``1e-9 <= sigma_rel < 1/sqrt(12) ~= 0.2887`` (gamma > 0).
    """
    s_rel = check_number("sigma_rel", sigma_rel, low=1e-9, high=12.0**-0.5, high_open=True, hint="e.g. 0.05 or 0.10")
    s = s_rel**-2

    # The cubic is increasing for g > 0 once it is negative at 0; bisect, then polish with Newton.
    def f(g: float) -> float:
        return ((g + 7.0) * g + (16.0 - s)) * g + (12.0 - s)

    lo, hi = 0.0, max(1.0, s)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
    g = 0.5 * (lo + hi)
    for _ in range(3):
        g -= f(g) / ((3.0 * g + 14.0) * g + (16.0 - s))
    return g


@dataclass(frozen=True)
class PowerFunction(Rule):
    """Power-function EMA of Karras et al. 2024 (EDM2): ``beta_j = (1 - 1/j) ** (gamma + 1)``.

    The product over an interval gives ``w = 1 - (1 - delta/t) ** (gamma + 1)``, exact for any update
    interval (arXiv:2312.02696, eq. 127). The average's weight profile is ``(gamma+1) tau**gamma / t**(gamma+1)``
    over the steps since averaging began. Give ``gamma`` or ``sigma_rel``.
    """

    gamma: float

    def __init__(self, gamma: float | None = None, *, sigma_rel: float | None = None) -> None:
        if (gamma is None) == (sigma_rel is None):
            raise ValueError("PowerFunction takes exactly one of gamma or sigma_rel")
        value = sigma_rel_to_gamma(sigma_rel) if sigma_rel is not None else _check_positive("gamma", gamma)
        object.__setattr__(self, "gamma", value)

    @property
    def sigma_rel(self) -> float:
        """Relative width of the profile."""
        return gamma_to_sigma_rel(self.gamma)

    def decay_at(self, j: int) -> float:
        return (1.0 - 1.0 / j) ** (self.gamma + 1.0)

    def decay_over(self, step: int, delta: int) -> float:
        return (1.0 - delta / step) ** (self.gamma + 1.0)


_RULES: dict[str, type[Rule]] = {
    cls.__name__: cls
    for cls in (ConstantDecay, HalfLife, DebiasedDecay, RationalWarmup, PowerWarmup, EqualWeights, PowerFunction)
}


def rule_from_config(config: dict[str, Any]) -> Rule:
    """Rebuild a rule from ``Rule.config()`` (as stored in a state dict)."""
    kwargs = dict(config)
    name = kwargs.pop("type", None)
    if name not in _RULES:
        raise ValueError(f"unknown rule type {name!r}; known: {sorted(_RULES)}")
    if name == "HalfLife":
        return HalfLife(kwargs["half_life"])
    return _RULES[name](**kwargs)


# ---------------------------------------------------------------------- momentum schedules (target networks, teachers)
#
# Any schedule is a small Rule: subclass it as a frozen dataclass whose fields are the hyper-parameters and define
# ``decay_at(j)``, the per-step decay at optimizer step j >= 1. Everything else (``update_every``, saving and
# checking the settings on load) follows. For example, a decay that steps from 0.99 to 0.999 at step 1000:
#
#     @dataclass(frozen=True)
#     class StepDecay(Rule):
#         before: float = 0.99
#         after: float = 0.999
#         at: int = 1000
#
#         def decay_at(self, j: int) -> float:
#             return self.before if j < self.at else self.after


@dataclass(frozen=True)
class _Schedule(Rule):
    """A decay that moves from ``start`` to ``end`` over ``total_steps`` optimizer steps; subclasses say how."""

    start: float
    end: float = 1.0
    total_steps: int = 1

    def __post_init__(self) -> None:
        hint = "a decay per optimizer step, e.g. 0.996"
        object.__setattr__(self, "start", check_number("start", self.start, low=0.0, high=1.0, hint=hint))
        object.__setattr__(self, "end", check_number("end", self.end, low=0.0, high=1.0, hint=hint))
        total = check_int("total_steps", self.total_steps, low=1, hint="the optimizer steps of the schedule")
        object.__setattr__(self, "total_steps", total)

    def _progress(self, j: int) -> float:
        """How far step ``j`` is along the schedule, in [0, 1]: ``min(j - 1, total_steps) / total_steps``."""
        return min(j - 1, self.total_steps) / self.total_steps


@dataclass(frozen=True)
class CosineMomentum(_Schedule):
    """Decay that rises from ``start`` to ``end`` on a half cosine over ``total_steps`` optimizer steps.

    ``m_t = end - (end - start) * (cos(pi * k / total_steps) + 1) / 2`` with ``k = min(t - 1, total_steps)``:
    the first step uses ``start``, step ``total_steps + 1`` and later use ``end``. With ``end=1`` this is the
    momentum-encoder schedule of BYOL (Grill et al. 2020, eq. in section 3.2; k counted from 0) and DINO.
    """

    start: float = 0.996

    def decay_at(self, j: int) -> float:
        return self.end - (self.end - self.start) * (math.cos(math.pi * self._progress(j)) + 1.0) / 2.0


@dataclass(frozen=True)
class LinearMomentum(_Schedule):
    """Decay that moves linearly from ``start`` to ``end`` over ``total_steps`` optimizer steps.

    ``m_t = start + (end - start) * k / total_steps`` with ``k = min(t - 1, total_steps)`` (as
    :class:`CosineMomentum`: the first step uses ``start``, step ``total_steps + 1`` and later use ``end``).
    """

    start: float = 0.99

    def decay_at(self, j: int) -> float:
        return self.start + (self.end - self.start) * self._progress(j)


_RULES.update(CosineMomentum=CosineMomentum, LinearMomentum=LinearMomentum)
