"""Build a complete polyak averager state from a peer's, check it continues the peer's schedule, load it once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..module_tensors import canonical_name, unwrap
from ..rules import Rule, rule_from_config
from ..shadow import Shadow
from .peers import Peer, detect, read

__all__ = ["load", "options"]

_FORMAT = "polyak.averager/1"
_KINDS = ("EMA", "SWA")
_CHECKED_STEPS = 64  # steps compared one by one after the migration point (at least 3 updates)
_LATER = (100, 1_000, 10_000, 100_000, 1_000_000)  # and the updates at about these many steps later
_TOLERANCE = 1e-9  # both weights are float64 evaluations of the same formula


def options(peer: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`polyak.EMA` that continue ``peer``'s schedule step for step.

    ``peer`` is the peer's live object (ema-pytorch ``EMA``, torch_ema ``ExponentialMovingAverage``, diffusers
    ``EMAModel``, timm ``ModelEmaV2``/``ModelEmaV3``, ``AveragedModel``, Lightning's ``WeightAveraging`` /
    ``EMAWeightAveraging``), or a state that carries its settings (torch_ema's, diffusers'). Build the averager
    with them, then :func:`load` the peer's state: ``ema = polyak.EMA(model, **polyak.migrate.options(peer))``.
    Raises ``ValueError`` when the state does not say the settings, or no polyak rule reproduces them.
    """
    source = detect(peer)
    found = _read_settings_only(peer, source) if isinstance(peer, dict) or source == "lightning" else read(peer, source)
    if found.options is None:
        raise ValueError(f"cannot give polyak settings for this {source} peer: {found.why_no_options}")
    return dict(found.options)


def _read_settings_only(peer: Any, source: str) -> Peer:
    if isinstance(peer, dict):
        return read(peer, source)
    # a Lightning callback: its settings without a checkpoint
    fake = {"averaging_state": {"n_averaged": 1}, "current_model_state": {}, "state_dict": {}, "global_step": 0}
    return read(fake, source, settings=peer)


def load(
    averager: Any,
    state: Any,
    source: str = "auto",
    *,
    step: int | None = None,
    settings: Any = None,
    strict: bool = True,
) -> str:
    """Continue a peer library's average in a polyak averager: set its average and its step. Returns the source.

    ``state`` is what the peer saved or the peer itself: ema-pytorch's ``EMA`` (``ema_model.*``, ``step``,
    ``initted``; ``online_model.*`` is ignored), torch_ema's ``ExponentialMovingAverage`` (``shadow_params`` in
    ``model.parameters()`` order, ``num_updates``, ``decay``), diffusers' ``EMAModel`` (``shadow_params``,
    ``optimization_step``, its warm-up settings), timm (a checkpoint's ``state_dict_ema`` or a ``ModelEmaV2``/
    ``ModelEmaV3`` state, ``module.*``), torch's ``AveragedModel`` (``module.*``, ``n_averaged``), or a Lightning
    checkpoint written with ``WeightAveraging``/``EMAWeightAveraging`` (the average under ``state_dict``,
    ``averaging_state``, ``global_step``). ``source`` names the library when the state alone does not tell:
    ``"ema_pytorch"``, ``"torch_ema"``, ``"diffusers"``, ``"timm"``, ``"averaged_model"``, ``"lightning"``.

    Tensors pair by name (wrapper prefixes ``_orig_mod.`` etc. ignored), or for the parameter lists of
    torch_ema and diffusers by ``model.parameters()`` order, every shape checked. Those two average parameters
    only: buffers the averager holds start from the model's own (what the peer evaluates with). The step is
    the peer's (torch_ema's ``num_updates + 1``: its construction copy is polyak's first update); timm keeps none
    and torch_ema with ``use_num_updates=False`` neither: pass ``step`` (optimizer steps so far). An
    ``AveragedModel`` keeps only ``n_averaged``: the step defaults to ``start_step + n_averaged *
    update_every``. The counters follow from the step and the averager's ``update_every`` and ``start_step``.

    ``strict`` (default): refuse unless the averager continues the peer's schedule, compared step by step over
    the next updates and far ahead, where the settings are known (from the state: torch_ema, diffusers; or
    from the live object, given as ``state`` or ``settings``); the error names the settings that do
    (:func:`options`). ``strict=False`` takes the average and the step and lets the averager follow its own rule.

    Supported averagers: :class:`polyak.EMA` and :class:`polyak.SWA`, plain, ``lazy`` or with a ``target``.
    Refused: ``MultiEMA``, ``BEMA``, ``PostHocEMA`` (migrate into an EMA first), a sharded (DTensor) average, and
    every state that does not fit. A damaged, partial or mismatched state is refused in one line before
    anything changes: the complete polyak state is built first and loaded once with ``load_state_dict``.
    """
    template = averager.state_dict() if hasattr(averager, "state_dict") else None
    if not isinstance(template, dict) or template.get("format") != _FORMAT or template.get("kind") not in _KINDS:
        kind = template.get("kind", template.get("format")) if isinstance(template, dict) else type(averager).__name__
        raise TypeError(f"averager must be a polyak.EMA or polyak.SWA, got {kind!r}; migrate into one of those first")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    name = detect(state, source)
    peer = read(state, name, settings)
    if peer.empty:
        raise ValueError(f"the {name} state holds no average yet ({peer.empty}): there is nothing to migrate")
    model: nn.Module = averager.model
    shadow = _shadow(averager, template, peer, model)
    counters = _counters(template, peer, step)
    if counters["num_updates"] == 0:
        raise ValueError(
            f"at step {counters['step']} this averager (start_step={template['start_step']}, update_every="
            f"{template['update_every']}) has made no update yet, so its next update would replace the {name} "
            "average; build it with an earlier start_step (see polyak.migrate.options)"
        )
    if strict:
        _check_schedule(template, peer, counters)
    averager.load_state_dict(template | counters | {"shadow": shadow})
    return name


# ---------------------------------------------------------------------- the average


def _layout(averager: Any, template: dict[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """The averager's tensors by name (tied names too): its own, or a lazy one's as it would allocate them."""
    if template.get("shadow") is not None:
        return dict(template["shadow"])
    policy = dict(template["policy"])
    dtype = policy.pop("dtype", None)
    policy["dtype"] = getattr(torch, dtype.removeprefix("torch.")) if dtype else None
    return Shadow(model, **policy).state_dict()


def _shadow(averager: Any, template: dict[str, Any], peer: Peer, model: nn.Module) -> dict[str, Tensor]:
    layout = _layout(averager, template, model)
    if any(type(t) is not Tensor and not isinstance(t, nn.Parameter) for t in layout.values()):
        raise TypeError("the averager's average is sharded (DTensor): migrate into an unsharded one, then save it")
    inner = unwrap(model)
    known = {canonical_name(n): t for n, t in inner.state_dict(keep_vars=True).items()}
    if peer.ordered is not None:
        found = _by_order(peer, inner)
    else:
        found = {canonical_name(n): t for n, t in (peer.named or {}).items()}
        unexpected = [n for n in found if n not in known]
        if unexpected:
            raise ValueError(
                f"the {peer.source} state holds {unexpected[0]!r}, which the model does not have "
                f"({len(unexpected)} such tensors): was it saved from another model?"
            )
    first_of: dict[int, str] = {}
    out: dict[str, Tensor] = {}
    for name, slot in layout.items():
        primary = first_of.setdefault(id(slot), name)
        if primary != name:  # a tied name: the same tensor
            out[name] = out[primary]
            continue
        value = found.get(name)
        if value is None and peer.ordered is not None and name in dict(inner.named_buffers()):
            value = known[name]  # parameters-only peers: the model's own buffer, as the peer evaluates
        if value is None:
            missing = [n for n in layout if n not in found]
            raise ValueError(
                f"the {peer.source} state has no tensor {name!r}, which the averager holds ({len(missing)} missing); "
                "it is partial, or from another model"
            )
        out[name] = _converted(name, value, slot, peer.source)
    return out


def _by_order(peer: Peer, inner: nn.Module) -> dict[str, Tensor]:
    """A parameter list paired with ``model.parameters()``, every shape checked."""
    named = [(canonical_name(n), p) for n, p in inner.named_parameters()]
    tensors = peer.ordered or []
    if len(tensors) != len(named):
        raise ValueError(
            f"the {peer.source} state holds {len(tensors)} tensors but the model has {len(named)} parameters "
            "(paired in model.parameters() order): was the peer built on another model, or on some of its parameters?"
        )
    for index, ((name, param), value) in enumerate(zip(named, tensors, strict=True)):
        if value.shape != param.shape:
            raise ValueError(
                f"the {peer.source} state's tensor {index} has shape {tuple(value.shape)}, but parameter {index} "
                f"{name!r} has shape {tuple(param.shape)}: was the peer built on another model?"
            )
    return {name: value for (name, _), value in zip(named, tensors, strict=True)}


def _converted(name: str, value: Any, slot: Tensor, source: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"the {source} state's {name!r} is a {type(value).__name__}, not a tensor; it is damaged")
    if value.shape != slot.shape:
        raise ValueError(
            f"the {source} state's {name!r} has shape {tuple(value.shape)}, the averager's {tuple(slot.shape)}: "
            "was it saved from another model?"
        )
    if value.is_floating_point() != slot.is_floating_point():
        raise ValueError(f"the {source} state's {name!r} is {value.dtype}, the averager's {slot.dtype}; it is damaged")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"the {source} state's {name!r} holds inf or NaN; load an intact copy")
    return value.detach().to(device=slot.device, dtype=slot.dtype, copy=True)


# ---------------------------------------------------------------------- the counters and the schedule


def _counters(template: dict[str, Any], peer: Peer, step: int | None) -> dict[str, int]:
    every, start = template["update_every"], template["start_step"]
    if step is not None:
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0 (optimizer steps so far), got {step!r}")
    elif peer.step is not None:
        step = peer.step
    elif peer.updates is not None:
        step = start + peer.updates * every
    else:
        raise ValueError(
            f"the {peer.source} state keeps no step: pass step= (optimizer steps taken so far; timm's train.py "
            "calls it num_updates)"
        )
    updates = max(0, step - start) // every
    return {"step": step, "num_updates": updates, "last_update_step": updates * every, "skipped_updates": 0}


def _rule(template: dict[str, Any]) -> Rule:
    try:
        return rule_from_config(template["rule"])
    except (ValueError, TypeError, KeyError):
        raise ValueError(
            f"cannot compare this averager's rule {template['rule']!r} with the peer's schedule; pass strict=False "
            "to continue with it unchecked"
        ) from None


def _polyak_weight(template: dict[str, Any], rule: Rule, s: int) -> float | None:
    """The weight this averager gives the optimizer step after ``s`` earlier ones (its documented semantics)."""
    every, start = template["update_every"], template["start_step"]
    t = s + 1 - start
    if t < 1 or t % every:
        return None
    delta = t - max(0, t - 1) // every * every
    target = template.get("target") is not None
    if not template.get("compensate", True) and (delta < t or target):
        return 1.0 - rule.decay_at(t)
    if target:
        return 1.0 - rule.decay_over(t, delta)
    return rule.weight(t, delta)


def _check_schedule(template: dict[str, Any], peer: Peer, counters: dict[str, int]) -> None:
    if peer.weight is None:
        return  # the settings are unknown: nothing to compare
    rule, step, done = _rule(template), counters["step"], peer.updates if peer.updates is not None else 1
    if template["kind"] == "SWA" and peer.updates is not None and peer.updates != counters["num_updates"]:
        raise ValueError(
            f"the {peer.source} average holds {peer.updates} updates but this SWA would count "
            f"{counters['num_updates']} at step {step}: its next weight would differ; pass step= or set update_every"
        )
    steps: list[int] = list(range(step, step + max(_CHECKED_STEPS, 3 * template["update_every"])))
    if peer.extra.get("rule_only"):  # AveragedModel: updated when the caller says; compare the next updates
        steps = [s for s in range(step, step + 3 * template["update_every"]) if _polyak_weight(template, rule, s)]
    if peer.updates is None:  # far ahead only where the weight does not hang on the count of updates
        for later in _LATER:
            steps += range(step + later, step + later + 2 * template["update_every"] + 1)
    for s in steps:
        ours, theirs = _polyak_weight(template, rule, s), peer.weight(s, done)
        if peer.extra.get("rule_only"):
            theirs = theirs if ours is not None else None
        if (ours is None) != (theirs is None) or (
            ours is not None and theirs is not None and abs(ours - theirs) > _TOLERANCE
        ):
            hint = (
                f"build it with polyak.EMA(model, **{peer.options!r})"
                if peer.options is not None
                else f"no polyak settings reproduce it ({peer.why_no_options})"
            )
            raise ValueError(
                f"this averager does not continue the {peer.source} schedule: at optimizer step {s + 1} "
                f"{peer.source} would {_say(theirs)}, this averager {_say(ours)}; {hint}, or pass strict=False "
                "to continue with this averager's own schedule"
            )
        if theirs is not None:
            done += 1


def _say(weight: float | None) -> str:
    if weight is None:
        return "not update"
    return "copy the model" if weight == 1.0 else f"blend with weight {weight:.10g}"
