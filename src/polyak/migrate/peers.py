"""What each peer library keeps, read into one description (:class:`Peer`): the average, the step, the schedule.

A peer is given as its live object (its settings are then known) or as its saved state. Schedules are written
per optimizer step: ``weight(s, done)`` is the weight the peer gives the model at the optimizer step that
follows ``s`` earlier ones (``None``: no update then, ``1.0``: a copy), ``done`` the updates it has made before.
The formulas are the peers' own, evaluated in float64.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..rules import ConstantDecay, EqualWeights, PowerWarmup, RationalWarmup

__all__ = ["SOURCES", "Peer", "detect", "read"]

Weight = Callable[[int, int], "float | None"]


@dataclass
class Peer:
    """A peer's average and what is known of its run."""

    source: str
    named: dict[str, Tensor] | None = None  # the average by qualified name
    ordered: list[Tensor] | None = None  # the average in ``model.parameters()`` order (parameters only)
    step: int | None = None  # optimizer steps taken, as polyak counts them
    updates: int | None = None  # updates folded in, where the peer counts them (``n_averaged``)
    weight: Weight | None = None  # the schedule, where the settings are known
    options: dict[str, Any] | None = None  # polyak.EMA keyword arguments that continue the schedule
    why_no_options: str = ""
    empty: str = ""  # why the peer holds no average yet, if it does not
    extra: dict[str, Any] = field(default_factory=dict)


def _int(value: Any, what: str) -> int:
    """A counter stored as an int or a one-element integer tensor, checked to be >= 0."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} is {value!r}, expected an int >= 0; the state is damaged: load an intact copy")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, expected a finite number; the state is damaged: load an intact copy")
    return float(value)


def _prefixed(state: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _power(n: float, inv_gamma: float, power: float) -> float:
    return 1.0 - (1.0 + n / inv_gamma) ** -power


# ---------------------------------------------------------------------- ema-pytorch


def _ema_pytorch(state: dict[str, Any], obj: Any) -> Peer:
    peer = Peer("ema_pytorch", named=_prefixed(state, "ema_model."), step=_int(state["step"], "ema-pytorch's step"))
    if not bool(state["initted"]) or not peer.named:
        peer.empty = "ema-pytorch's initted is False"
    if obj is None:
        peer.why_no_options = "ema-pytorch saves no settings: pass the EMA object (settings=ema) to check them"
        return peer
    beta, after, every = float(obj.beta), int(obj.update_after_step), int(obj.update_every)
    inv_gamma, power, floor = float(obj.inv_gamma), float(obj.power), float(obj.min_value)

    def weight(s: int, done: int) -> float | None:
        if s == 0:
            return 1.0  # the first call copies (initted)
        if s % every:
            return None
        if s <= after:
            return 1.0
        return 1.0 - min(max(_power(s - after, inv_gamma, power), floor), beta)

    peer.weight = weight
    if every == 1:
        start = after
    else:  # polyak's first update (a copy) at ema-pytorch's last copy, on the same grid of every k-th step
        last_copy = after // every * every
        start = last_copy + 1 - every if last_copy else 1  # a first copy at step 1 is off polyak's grid
    rule = PowerWarmup(beta, inv_gamma=inv_gamma, power=power, min_decay=floor, offset=start - after)
    peer.options = {"rule": rule, "update_every": every, "start_step": start}
    if every > 1:
        peer.options["compensate"] = False
    return peer


# ---------------------------------------------------------------------- torch_ema and diffusers: parameter lists


def _tensor_list(state: dict[str, Any], what: str) -> list[Tensor]:
    tensors = state.get("shadow_params")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(f"{what}'s 'shadow_params' is not a list of tensors; the state is damaged: load an intact one")
    return list(tensors)


def _torch_ema(state: dict[str, Any], obj: Any) -> Peer:
    decay = _number(state["decay"], "torch_ema's decay")
    counted = state["num_updates"]
    peer = Peer("torch_ema", ordered=_tensor_list(state, "torch_ema"))
    if counted is None:  # use_num_updates=False: a constant decay, no step
        peer.weight = lambda s, done: 1.0 - decay
        peer.options = {"decay": decay, "buffers": "copy"}
        return peer
    # torch_ema copies the weights when built, then its i-th update decays by min(d, (1+i)/(10+i)): polyak's
    # first update (a copy) stands for the construction, so polyak's step is one ahead.
    peer.step = _int(counted, "torch_ema's num_updates") + 1
    peer.weight = lambda s, done: 1.0 - min(decay, (1.0 + s) / (10.0 + s))
    peer.options = {"rule": RationalWarmup(decay), "buffers": "copy"}
    return peer


def _diffusers(state: dict[str, Any], obj: Any) -> Peer:
    decay = _number(state["decay"], "diffusers' decay")
    floor = _number(state["min_decay"], "diffusers' min_decay")
    after = _int(state["update_after_step"], "diffusers' update_after_step")
    warmup = bool(state["use_ema_warmup"])
    inv_gamma = _number(state["inv_gamma"], "diffusers' inv_gamma")
    power = _number(state["power"], "diffusers' power")
    peer = Peer("diffusers", ordered=_tensor_list(state, "diffusers"))
    peer.step = _int(state["optimization_step"], "diffusers' optimization_step")

    def weight(s: int, done: int) -> float | None:
        n = s - after  # optimization_step - update_after_step - 1, optimization_step = s + 1
        if n <= 0:
            return 1.0
        value = _power(n, inv_gamma, power) if warmup else (1.0 + n) / (10.0 + n)
        return 1.0 - max(min(value, decay), floor)

    peer.weight = weight
    if warmup:
        rule: Any = PowerWarmup(decay, inv_gamma=inv_gamma, power=power, min_decay=floor)
    elif floor <= min(decay, 2.0 / 11.0):  # the ramp's lowest decay in use (the first update copies)
        rule = RationalWarmup(decay)
    else:
        peer.why_no_options = f"no polyak rule has diffusers' (1+n)/(10+n) warm-up floored at min_decay={floor}"
        return peer
    peer.options = {"rule": rule, "start_step": after, "buffers": "copy"}
    return peer


# ---------------------------------------------------------------------- timm


def _timm(state: dict[str, Any], obj: Any) -> Peer:
    tensors = state["state_dict_ema"] if "state_dict_ema" in state else _prefixed(state, "module.")
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("the timm checkpoint's 'state_dict_ema' is not a state dict; the state is damaged")
    peer = Peer("timm", named=dict(tensors))
    if obj is None:
        peer.why_no_options = "timm saves no settings: pass the ModelEmaV3 object (settings=model_ema) to check them"
        return peer
    decay = float(obj.decay)
    if type(obj).__name__ == "ModelEmaV2":  # blends from the copy made when built, no warm-up
        peer.weight = lambda s, done: 1.0 - decay
        peer.options = {"decay": decay}
        return peer
    after, floor, warmup = int(obj.update_after_step), float(obj.min_decay), bool(obj.use_warmup)
    inv_gamma, power = float(obj.warmup_gamma), float(obj.warmup_power)

    def weight(s: int, done: int) -> float | None:
        n = s - after  # timm's train.py passes step=num_updates, s + 1 here
        if n <= 0:
            return 1.0
        return 1.0 - (min(max(_power(n, inv_gamma, power), floor), decay) if warmup else decay)

    peer.weight = weight
    rule: Any = PowerWarmup(decay, inv_gamma, power, min_decay=floor) if warmup else ConstantDecay(decay)
    peer.options = {"rule": rule, "start_step": after} | ({"buffers": "copy"} if obj.exclude_buffers else {})
    return peer


# ---------------------------------------------------------------------- torch's AveragedModel, Lightning


def _closure_decay(function: Any) -> float | None:
    """The ``decay`` that ``torch.optim.swa_utils.get_ema_avg_fn(decay)`` closed over, if that is what it is."""
    function = inspect.unwrap(function)  # torch.no_grad() wraps it
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None) or ()
    names = getattr(code, "co_freevars", ())
    return float(cells[names.index("decay")].cell_contents) if "decay" in names else None


def _averaging_weight(avg_fn: Any, multi_avg_fn: Any) -> tuple[Weight | None, dict[str, Any] | None]:
    """The schedule of an ``AveragedModel`` by its functions: equal weights, an EMA of a known decay, or unknown."""
    if avg_fn is None and multi_avg_fn is None:
        return (lambda s, done: 1.0 / (done + 1)), {"rule": EqualWeights()}
    decay = _closure_decay(avg_fn if avg_fn is not None else multi_avg_fn)
    if decay is None:
        return None, None
    return (lambda s, done: 1.0 if done == 0 else 1.0 - decay), {"decay": decay}


def _averaged_model(state: dict[str, Any], obj: Any) -> Peer:
    peer = Peer("averaged_model", named=_prefixed(state, "module."))
    peer.updates = _int(state["n_averaged"], "AveragedModel's n_averaged")
    if obj is None:
        peer.why_no_options = "AveragedModel saves no averaging function: pass the object (settings=...) to check it"
        return peer
    weight, options = _averaging_weight(obj.avg_fn, obj.multi_avg_fn)
    if weight is None or options is None:
        peer.why_no_options = "the AveragedModel's averaging function is neither SWA's nor get_ema_avg_fn's"
        return peer
    # its update cadence is the caller's: checked only through n_averaged
    peer.extra["rule_only"] = True
    peer.weight, peer.options = weight, options | ({} if obj.use_buffers else {"buffers": "copy"})
    return peer


def _lightning(state: dict[str, Any], obj: Any) -> Peer:
    averaging = state["averaging_state"]
    if not isinstance(averaging, dict) or not isinstance(state.get("state_dict"), dict):
        raise ValueError("the Lightning checkpoint's 'averaging_state' or 'state_dict' is not a dict; it is damaged")
    peer = Peer("lightning", named=dict(state["state_dict"]))  # WeightAveraging puts the average there
    peer.updates = _int(averaging.get("n_averaged"), "the Lightning checkpoint's averaging_state['n_averaged']")
    peer.step = _int(state.get("global_step"), "the Lightning checkpoint's global_step")
    if obj is None:
        peer.why_no_options = "the checkpoint holds no averaging settings: pass the callback (settings=...) to check"
        return peer
    weight, options = _averaging_weight(obj._kwargs.get("avg_fn"), obj._kwargs.get("multi_avg_fn"))
    if weight is None or options is None:
        peer.why_no_options = "the callback's averaging function is neither SWA's nor get_ema_avg_fn's"
        return peer
    should_update = obj.should_update
    blend = weight
    peer.weight = lambda s, done: blend(s, done) if should_update(step_idx=s) else None
    options |= {} if obj._use_buffers else {"buffers": "copy"}
    if type(obj).__name__ == "EMAWeightAveraging":
        every, first = int(obj.update_every_n_steps), int(obj.update_starting_at_step or 0)
        first_update = -(-first // every) * every  # the first step index it updates at
        start = first_update + 1 - every if first_update else (1 if every > 1 else 0)
        options |= {"update_every": every, "start_step": start} | ({"compensate": False} if every > 1 else {})
    peer.options = options  # a subclass's own should_update: its steps are still compared one by one
    return peer


# ---------------------------------------------------------------------- detection


def _is_module_state(state: dict[str, Any]) -> bool:
    return bool(state) and all(isinstance(k, str) and k.startswith("module.") for k in state if k != "n_averaged")


SOURCES: dict[str, tuple[str, Callable[[dict[str, Any]], bool], Callable[[dict[str, Any], Any], Peer]]] = {
    "ema_pytorch": (
        "ema-pytorch EMA (ema_model.*, step, initted)",
        lambda s: "initted" in s and "step" in s and any(str(k).startswith("ema_model.") for k in s),
        _ema_pytorch,
    ),
    "torch_ema": (
        "torch_ema ExponentialMovingAverage (shadow_params, num_updates, decay)",
        lambda s: "shadow_params" in s and "num_updates" in s and "decay" in s,
        _torch_ema,
    ),
    "diffusers": (
        "diffusers EMAModel (shadow_params, optimization_step, its warm-up settings)",
        lambda s: "shadow_params" in s and "optimization_step" in s,
        _diffusers,
    ),
    "timm": (
        "timm (a checkpoint's state_dict_ema, or a ModelEmaV2/V3 state module.*)",
        lambda s: isinstance(s.get("state_dict_ema"), dict) or (_is_module_state(s) and "n_averaged" not in s),
        _timm,
    ),
    "averaged_model": (
        "torch.optim.swa_utils.AveragedModel (module.*, n_averaged)",
        lambda s: "n_averaged" in s and _is_module_state(s),
        _averaged_model,
    ),
    "lightning": (
        "a Lightning checkpoint written with WeightAveraging / EMAWeightAveraging (averaging_state)",
        lambda s: "averaging_state" in s and "current_model_state" in s,
        _lightning,
    ),
}

_OBJECTS = {  # class name -> source, for peers given as live objects
    "EMA": "ema_pytorch",
    "ExponentialMovingAverage": "torch_ema",
    "EMAModel": "diffusers",
    "ModelEmaV2": "timm",
    "ModelEmaV3": "timm",
    "AveragedModel": "averaged_model",
    "WeightAveraging": "lightning",
    "EMAWeightAveraging": "lightning",
}


def _object_source(obj: Any) -> str | None:
    for cls in type(obj).__mro__:
        source = _OBJECTS.get(cls.__name__)
        if source is not None and (source != "ema_pytorch" or cls.__module__.startswith("ema_pytorch")):
            return source
    return None


def _listing() -> str:
    return "; ".join(f"{name!r}: {what}" for name, (what, _, _) in SOURCES.items())


def detect(state: Any, source: str = "auto") -> str:
    """The peer that wrote ``state`` (a state dict, a checkpoint or a live peer object); a one-line error if unclear."""
    if source != "auto":
        if source not in SOURCES:
            raise ValueError(f"source must be 'auto' or one of {sorted(SOURCES)}, got {source!r}")
        return source
    if not isinstance(state, dict):
        found = _object_source(state)
        if found is None:
            raise TypeError(
                f"cannot migrate a {type(state).__name__}: give a peer's state dict, checkpoint or object, from: "
                + _listing()
            )
        return found
    candidates = [name for name, (_, matches, _) in SOURCES.items() if matches(state)]
    if not candidates:
        keys = sorted(map(str, state))[:6]
        raise ValueError(f"cannot tell which library wrote this state (keys {keys}...); known: {_listing()}")
    if len(candidates) > 1:
        raise ValueError(f"this state could come from any of {candidates}: name one with source=")
    return candidates[0]


def read(state: Any, source: str, settings: Any = None) -> Peer:
    """Read the peer's average, step and (from a live object in ``state`` or ``settings``) its schedule."""
    if not isinstance(state, dict):
        settings = state if settings is None else settings
        state = state.state_dict() if source != "lightning" else None
        if state is None:
            raise TypeError("a Lightning callback holds no checkpoint: give the checkpoint, with settings=callback")
    if settings is not None and _object_source(settings) != source:
        raise TypeError(f"settings must be the {source} object that wrote the state, got {type(settings).__name__}")
    what, matches, reader = SOURCES[source]
    if not matches(state):
        raise ValueError(f"this state is not a {what}: its keys are {sorted(map(str, state))[:6]}...")
    try:
        return reader(state, settings)
    except KeyError as error:
        raise ValueError(
            f"the {source} state lacks {error.args[0]!r}; it is partial or damaged: load an intact copy"
        ) from None
