"""The shadow: storage of the averaged tensors, paired by name with a module's, and their updates.

This is the only place in polyak where tensors are averaged (with the kernels of :mod:`polyak.kernels`).
A :class:`Shadow` selects which tensors of a module take part (found by :mod:`polyak.module_tensors`),
stores them (never below float32 unless asked), and applies

    shadow <- shadow + w * (theta - shadow)

with one kernel per group of tensors that share a device and dtype. It pairs tensors by qualified name,
not by position, and knows nothing about which rule produced ``w``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import distributed
from .kernels import StochasticLerp, all_finite, copy_all, foreach_lerp
from .module_tensors import Found, copy_module, unwrap, walk
from .plan import GENERATION, Plan, Slot, build, refuse_meta, watch_changes

__all__ = [
    "NonFinite",
    "Policy",
    "Rounding",
    "Shadow",
    "check_same_layout",
    "exporting_average",
    "extrapolated",
    "is_swapped_state_dict",
    "update_many",
    "write_extrapolated",
]

Policy = Literal["average", "copy", "skip"]
_POLICIES = ("average", "copy", "skip")
NonFinite = Literal["propagate", "skip", "raise"]
_NONFINITE = ("propagate", "skip", "raise")
Rounding = Literal["nearest", "stochastic"]
_ROUNDINGS = ("nearest", "stochastic")

# Modules that hold swapped-in averaged weights right now (any Shadow's), and the state-dict marker key.
_SWAPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_OPEN_SWAPS = [0]  # blocks open now, so that the common case (none) costs one comparison per update
_SWAP_MARK = "polyak_swapped"


def _laid_out_like(piece: Tensor, tensor: Tensor) -> Tensor:
    """The flat ``piece`` viewed with ``tensor``'s shape and, when dense (e.g. channels_last), its strides too:
    an average laid out like its model is read and written in the same memory order, not strided."""
    if tensor.is_contiguous():
        return piece.view(tensor.shape)
    # empty_like keeps the strides of a dense tensor exactly and makes its own for any other
    dense = torch.empty_like(tensor, device="meta").stride() == tensor.stride()
    return piece.as_strided(tensor.shape, tensor.stride()) if dense else piece.view(tensor.shape)


_EXPORTS = [0]  # open `exporting_average()` blocks


@contextmanager
def exporting_average() -> Iterator[None]:
    """Within the block a swapped module's ``state_dict()`` is taken on purpose, to export the average: it is
    still marked (:func:`is_swapped_state_dict`) but does not warn."""
    _EXPORTS[0] += 1
    try:
        yield
    finally:
        _EXPORTS[0] -= 1


def _mark_swapped(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    """State-dict hook while swapped: mark the module's metadata entry (kept by ``torch.save``) and warn."""
    local_metadata[_SWAP_MARK] = True
    if _EXPORTS[0]:
        return
    warnings.warn(
        f"state_dict() of {type(module).__name__} taken inside a `swapped()` block holds the averaged weights, "
        "not the training weights; polyak.is_swapped_state_dict() tells such a state apart",
        stacklevel=3,
    )


def is_swapped_state_dict(state: dict[str, Any]) -> bool:
    """True when ``state`` (a module's ``state_dict()``) was taken while averaged weights were swapped in."""
    metadata = getattr(state, "_metadata", None) or {}
    return any(isinstance(entry, dict) and entry.get(_SWAP_MARK) is True for entry in metadata.values())


class Shadow:
    """Averaged copies of a module's tensors, paired by qualified name.

    Args:
        module: the model; wrappers (DDP, DataParallel, ``torch.compile``) are looked through. Of a DTensor
            (FSDP2) parameter only this rank's shard is stored, shown as a DTensor laid out like the parameter.
        buffers: floating buffers are ``"average"``-d (default), ``"copy"``-ed from the model at each update,
            or ``"skip"``-ped (left to the model). Integer and bool buffers are always copied, never averaged.
        frozen: parameters with ``requires_grad=False`` are ``"copy"``-ed (default), ``"average"``-d or
            ``"skip"``-ped (saves their memory, e.g. the frozen base of a LoRA model).
        exclude: glob patterns (``fnmatch``) of qualified names left to the model, e.g. ``("*.running_*",)``.
        include_nonpersistent: also keep buffers registered with ``persistent=False`` (default: skipped).
        dtype: storage dtype of averaged tensors. Default: the model's dtype promoted to at least float32,
            so a bf16/fp16 model gets a float32 average. A lower precision is an explicit opt-in.
        device: where the shadow lives. Default: beside each model tensor.
        adopt: store nothing of its own: ``module``'s tensors are the storage, so an update writes into
            ``module`` (which is then the average, not the model). ``dtype`` and ``device`` must be None.
        rounding: how an update's float32 result is written into a ``dtype=torch.bfloat16`` average:
            ``"nearest"`` (default; an increment under half a bf16 spacing is lost, so a long average stalls)
            or ``"stochastic"`` (up or down at random, unbiased; the random stream is seeded from
            ``torch.initial_seed()`` and saved by :meth:`rounding_state`).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        buffers: Policy = "average",
        frozen: Policy = "copy",
        exclude: Iterable[str] = (),
        include_nonpersistent: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        adopt: bool = False,
        rounding: Rounding = "nearest",
    ) -> None:
        if rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
        if rounding == "stochastic" and dtype != torch.bfloat16:
            raise ValueError(
                f'rounding="stochastic" is for a bfloat16 average; got dtype={dtype}. Pass dtype=torch.bfloat16, '
                'or keep rounding="nearest" (a float32 average stalls only for increments under 6e-8 of a weight; '
                "use dtype=torch.float64 there)"
            )
        if adopt and (dtype is not None or device is not None):
            raise ValueError("Shadow(adopt=True) stores the module's own tensors: leave dtype and device as None")
        for arg, value in (("buffers", buffers), ("frozen", frozen)):
            if value not in _POLICIES:
                raise ValueError(f"{arg} must be one of {_POLICIES}, got {value!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.buffers = buffers
        self.frozen = frozen
        self.exclude = tuple(exclude)
        self.include_nonpersistent = bool(include_nonpersistent)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.rounding: Rounding = rounding

        watch_changes()
        distributed.reshard(module)  # FSDP2 keeps some parameters gathered after an evaluation forward
        aliases: dict[str, str] = {}
        found, _ = walk(module, aliases)
        refuse_meta(found, "build the averager after to_empty() and loading or initialising the weights")
        chosen = [(f, mode) for f in found if (mode := self._policy(f)) != "skip"]
        if adopt:
            detached = [(f, mode, f.tensor.detach()) for f, mode in chosen]
            self._slots = [Slot(f.name, mode, distributed.local(t), f.tensor.dtype, t) for f, mode, t in detached]
        else:
            self._slots = self._allocate(chosen)
        self._by_name = {slot.name: slot for slot in self._slots}
        # other names of tied tensors (e.g. lm_head.weight for embed.weight), so exports load with strict=True
        self.aliases = {alias: name for alias, name in aliases.items() if name in self._by_name}
        self._plan: Plan | None = None
        # stochastic rounding: one random stream per device of the average, and the kernels of the current plan
        self._generators: dict[str, torch.Generator] = {}
        if rounding == "stochastic":
            for device in {str(slot.tensor.device) for slot in self._slots if slot.mode == "average"}:
                self._generators[device] = torch.Generator(device).manual_seed(torch.initial_seed())
            complex_ = next((slot.name for slot in self._slots if slot.tensor.is_complex()), None)
            if complex_ is not None:
                raise ValueError(f'rounding="stochastic" averages real tensors; {complex_!r} is complex: exclude it')
        self._rounded: tuple[Plan, list[StochasticLerp]] | None = None
        if not adopt:
            self.copy_from(module)

    # ------------------------------------------------------------------ selection and storage

    def _policy(self, found: Found) -> Policy:
        """What happens to one model tensor: averaged, copied, or left to the model."""
        if any(fnmatchcase(found.name, pattern) for pattern in self.exclude):
            return "skip"
        averageable = found.tensor.is_floating_point() or found.tensor.is_complex()
        if found.is_param:
            if not averageable:
                return "copy"
            return "average" if found.tensor.requires_grad else self.frozen
        if not found.persistent and not self.include_nonpersistent:
            return "skip"
        if self.buffers == "skip" or not averageable:
            return "skip" if self.buffers == "skip" else "copy"
        return self.buffers

    def _storage_dtype(self, tensor: Tensor, mode: Policy) -> torch.dtype:
        if mode == "copy":
            return tensor.dtype
        if self.dtype is not None:  # the precision asked for; complex tensors keep their imaginary part
            return self.dtype.to_complex() if tensor.is_complex() else self.dtype
        return torch.promote_types(tensor.dtype, torch.float32)

    def _allocate(self, chosen: Sequence[tuple[Found, Policy]]) -> list[Slot]:
        """One flat buffer per (device, dtype, mode, model dtype); slots are views, in storage order."""
        groups: dict[tuple[Any, ...], list[tuple[Found, Policy]]] = {}
        for f, mode in chosen:
            device = self.device if self.device is not None else f.tensor.device
            key = (str(device), self._storage_dtype(f.tensor, mode), mode, f.tensor.dtype, str(f.tensor.device))
            groups.setdefault(key, []).append((f, mode))
        slots: list[Slot] = []
        for (device, dtype, mode, model_dtype, _), members in groups.items():
            shards = [distributed.local(f.tensor) for f, _ in members]  # a DTensor stores its local shard only
            flat = torch.empty(sum(t.numel() for t in shards), dtype=dtype, device=device)
            offset = 0
            for (f, _), shard in zip(members, shards, strict=True):
                n = shard.numel()
                view = _laid_out_like(flat[offset : offset + n], shard)
                value = distributed.sharded_like(view, f.tensor) if distributed.is_dtensor(f.tensor) else view
                slots.append(Slot(f.name, mode, view, model_dtype, value))
                offset += n
        return slots

    # ------------------------------------------------------------------ pairing with a module

    def _plan_for(self, module: nn.Module) -> Plan:
        """The cached pairing with ``module``, re-checked after a watched change (see :mod:`polyak.plan`)."""
        plan = self._plan
        if plan is not None and not _OPEN_SWAPS[0] and plan.current(module):
            return plan
        _refuse_swapped(module)
        return self.check(module)

    def check(self, module: nn.Module) -> Plan:
        """Pair with ``module`` again if it may have changed; raise ``ValueError`` naming a change that the
        average cannot follow (see :func:`polyak.plan.build`). Cheap when nothing changed."""
        plan = self._plan
        if plan is not None and plan.root is module:
            if plan.current(module):
                return plan
            generation = GENERATION[0]
            if plan.sharded:  # FSDP2 / ZeRO-3 may hold gathered parameters after a forward without backward
                distributed.reshard(module)
            if plan.unchanged():
                plan.generation = generation
                if plan.current(module):
                    return plan
        plan, self.aliases = build(module, self._slots, self.aliases, self)
        self._plan = plan
        return plan

    # ------------------------------------------------------------------ the update

    def update(self, module: nn.Module, weight: float | Tensor, *, nonfinite: NonFinite = "propagate") -> Tensor | None:
        """``shadow <- shadow + weight * (model - shadow)`` for averaged tensors; copy the copied ones.

        ``weight`` is a Python float in [0, 1] or a 0-d tensor on the shadow's device (no host sync either way).
        ``nonfinite`` says what happens when an averaged model tensor holds inf or NaN:

        - ``"propagate"`` (fastest): nothing is checked; the non-finite values enter the average.
        - ``"skip"``: the averaged tensors keep their (finite) values bit for bit; copied tensors are still copied.
          The check and the choice stay on the device: one fused norm per group, then every group is
          staged through a small buffer where the shadow's own values replace the model's when the flag is
          False (a lerp by weight 0 would not do: ``0 * NaN`` is NaN). Returns the 0-d bool flag, True when
          the update was applied (None when nothing is averaged). An average kept on another device than the
          model (``device="cpu"``) receives the flag with the staged values, a copy that waits anyway.
        - ``"raise"``: ``RuntimeError`` naming the first non-finite tensor, before anything changes. Reading
          the flag synchronises with the device.
        """
        plan = self._plan
        if plan is None or _OPEN_SWAPS[0] or not plan.current(module):  # first call, a watched change, a swap
            plan = self._plan_for(module)
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        rounded = self._stochastic(plan) if self.rounding == "stochastic" else None
        if nonfinite == "skip":
            keep = plan.finite()
            if keep is not None:
                for staged in rounded if rounded is not None else plan.staged():
                    staged.run(weight, keep)
                if plan.copies[0]:
                    torch._foreach_copy_(*plan.copies)
                return keep
        elif nonfinite == "raise":
            keep = plan.finite()
            if keep is not None and not bool(keep):
                self._raise_nonfinite(plan)
        if isinstance(weight, float) and weight == 1.0:
            self._copy_all(plan)
            return None
        for shadows, models in plan.lerps if rounded is None else ():
            foreach_lerp(shadows, models, weight)
        for cast in plan.casts if rounded is None else rounded:
            cast.run(weight)
        if plan.copies[0]:
            torch._foreach_copy_(*plan.copies)
        return None

    def _stochastic(self, plan: Plan) -> list[StochasticLerp]:
        """The stochastically rounding kernels of ``plan``: one per (average device, model device and dtype)."""
        if self._rounded is None or self._rounded[0] is not plan:
            groups: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
            for slot, data in zip(self._slots, plan.data, strict=True):
                if slot.mode == "average":
                    key = (slot.tensor.device, data.device, data.dtype)
                    groups.setdefault(key, ([], []))
                    groups[key][0].append(slot.tensor)
                    groups[key][1].append(data)
            kernels = [StochasticLerp(s, m, self._generators[str(s[0].device)]) for s, m in groups.values()]
            self._rounded = (plan, kernels)
        return self._rounded[1]

    def rounding_state(self) -> dict[str, Tensor]:
        """The state of each random stream of stochastic rounding, by device (empty when rounding to nearest)."""
        return {device: generator.get_state() for device, generator in self._generators.items()}

    def load_rounding_state(self, state: Any) -> None:
        """Restore :meth:`rounding_state`, after checking it (nothing changes on error)."""
        if not isinstance(state, dict) or set(state) != set(self._generators):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"saved rounding state is for devices {found}, this average rounds stochastically on "
                f"{sorted(self._generators)}; build it with the same dtype, rounding and device"
            )
        for device, value in state.items():
            if not (isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
                raise ValueError(f"saved rounding state for {device!r} is not a generator state (a 1-d uint8 tensor)")
        before = self.rounding_state()
        try:
            for device, value in state.items():
                self._generators[device].set_state(value)
        except RuntimeError as error:
            for device, value in before.items():
                self._generators[device].set_state(value)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"saved rounding state is damaged ({reason}); nothing was loaded") from None

    def _raise_nonfinite(self, plan: Plan) -> None:
        for slot, tensor in zip(self._slots, plan.data, strict=True):  # local shards: no collective
            if slot.mode == "average" and not bool(all_finite([tensor])):
                raise RuntimeError(
                    f"model tensor {slot.name!r} holds inf or NaN ({int((~torch.isfinite(tensor)).sum())} of "
                    f"{tensor.numel()} values); the average was not updated. Skip this step, or build the "
                    'averager with nonfinite="skip" to leave such updates out'
                )
        raise RuntimeError(  # a sharded model: the bad value is in another rank's shard
            "a model tensor holds inf or NaN on another rank; the average was not updated. Skip this step, or "
            'build the averager with nonfinite="skip" to leave such updates out'
        )

    @torch.no_grad()
    def update_with(self, module: nn.Module, fn: Callable[..., Any], *, each: bool = False) -> None:
        """Like :meth:`update`, with a caller's function in place of the lerp; copied tensors are copied.

        ``fn(shadows, models)`` updates one group of averaged tensors in place (one call per device and dtype);
        with ``each=True``, ``fn(shadow, model)`` returns the new value of one tensor. Model tensors of another
        dtype or device than the shadow are passed as converted copies.
        """
        plan = self._plan_for(module)
        groups = plan.lerps + [
            (cast.shadows, [m.to(s.device, s.dtype) for s, m in zip(cast.shadows, cast.models, strict=True)])
            for cast in plan.casts
        ]
        for shadows, models in groups:
            if each:
                for shadow, model in zip(shadows, models, strict=True):
                    shadow.copy_(fn(shadow, model))
            else:
                fn(shadows, models)
        if plan.copies[0]:
            torch._foreach_copy_(*plan.copies)

    def _copy_all(self, plan: Plan) -> None:
        for shadows, models in plan.lerps:
            torch._foreach_copy_(shadows, models)
        for cast in plan.casts:
            cast.run(1.0)
        if plan.copies[0]:
            torch._foreach_copy_(*plan.copies)

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        """Set every stored tensor to the model's value."""
        self._copy_all(self._plan_for(module))

    # ------------------------------------------------------------------ into the model

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the stored tensors into ``module`` in place (cast to the model's dtype)."""
        plan = self._plan_for(module)
        copy_all(plan.data, [slot.tensor for slot in self._slots])
        distributed.reshard(module)  # a gathered ZeRO-3 parameter would hide the partition written

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``module`` holds the stored tensors; its own are restored on exit, even on error.

        The module's tensors are backed up (one copy in the model's dtype) and written back in place, so
        compiled graphs and optimizers that hold the parameter objects keep working. While swapped, the
        module refuses a second swap and updates or copies from any shadow (``RuntimeError``), and its
        ``state_dict()`` warns and is marked: :func:`is_swapped_state_dict` tells such a state apart, also
        after ``torch.save`` / ``torch.load``, so a checkpoint taken during evaluation is not mistaken for
        the training weights. Like any ``state_dict()``, its tensors are views of the module's: save or clone
        them inside the block (after it they read the training weights, and the mark stays, conservatively).
        Sharded (FSDP2) parameters swap their local shards; their gathered copies are dropped on exit.
        """
        plan = self._plan_for(module)
        distributed.reshard(module)  # a gathered ZeRO-3 parameter would hide the partition written below
        target = unwrap(module)
        live = list(plan.data)
        with torch.no_grad():
            backup = [t.clone() for t in live]
        _mark_open(target)
        hook = target.register_state_dict_post_hook(_mark_swapped)
        try:
            with torch.no_grad():
                copy_all(live, [slot.tensor for slot in self._slots])
            yield module
        finally:
            distributed.reshard(module)  # else FSDP2 would keep evaluating/training with the averaged weights
            hook.remove()
            _mark_closed(target)
            with torch.no_grad():
                copy_all(live, backup)

    # ------------------------------------------------------------------ inspection and state

    @property
    def names(self) -> list[str]:
        """Qualified names of the stored tensors, in storage order."""
        return [slot.name for slot in self._slots]

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by qualified name (references, not copies; DTensors where the model has them)."""
        return {slot.name: slot.value for slot in self._slots}

    def modes(self) -> dict[str, Policy]:
        """``"average"`` or ``"copy"`` for each stored tensor."""
        return {slot.name: slot.mode for slot in self._slots}

    def policy(self) -> dict[str, Any]:
        """The selection and precision options, as saved in a state dict."""
        return {
            "buffers": self.buffers,
            "frozen": self.frozen,
            "exclude": list(self.exclude),
            "include_nonpersistent": self.include_nonpersistent,
            "dtype": str(self.dtype) if self.dtype is not None else None,
        } | ({"rounding": self.rounding} if self.rounding != "nearest" else {})

    def state_dict(self) -> dict[str, Tensor]:
        """The stored tensors by name (references into the shadow's buffers), tied names included.

        A tied tensor appears under each of its names (the same tensor object, saved once by ``torch.save``),
        so the state loads into the model with ``strict=True``; loading reads it from its first name.
        """
        tensors = self.tensors()
        return tensors | {alias: tensors[name] for alias, name in self.aliases.items()}

    def check_state_dict(self, state: dict[str, Tensor]) -> None:
        """Raise ``ValueError`` naming the first tensor of ``state`` that does not fit; change nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"expected a dict of tensors, got {type(state).__name__}")
        missing = [n for n in self._by_name if n not in state]
        extra = [n for n in state if n not in self._by_name and n not in self.aliases]
        if missing or extra:
            which = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise ValueError(
                f"saved average does not match this model: {which} "
                f"({len(missing)} missing, {len(extra)} unexpected tensors)"
            )
        for name, slot in self._by_name.items():
            value = state[name]
            if not isinstance(value, Tensor):
                raise TypeError(f"saved tensor {name!r} is a {type(value).__name__}, not a tensor")
            if value.shape != slot.value.shape or value.dtype != slot.tensor.dtype:
                raise ValueError(
                    f"saved tensor {name!r} has shape {tuple(value.shape)} and dtype {value.dtype}; this average "
                    f"holds shape {tuple(slot.value.shape)} and dtype {slot.tensor.dtype}"
                )

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy saved tensors in place, after checking all of them (nothing changes on error)."""
        self.check_state_dict(state)
        for name, slot in self._by_name.items():
            value = state[name]
            if slot.value is not slot.tensor and not distributed.is_dtensor(value):
                value = distributed.shard_of(value, slot.value)  # a full tensor: keep this rank's shard
            slot.value.copy_(value)

    def clone_module(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` (unwrapped) holding the stored tensors."""
        sharded = [slot.name for slot in self._slots if slot.value is not slot.tensor]
        sharded += distributed.partitioned_names(module)
        if sharded:
            raise RuntimeError(
                f"cannot build an averaged model: the average is sharded across ranks ({sharded[0]!r} is a "
                "DTensor or a ZeRO-3 partition) and a sharded (FSDP2, ZeRO-3) model cannot be deep-copied. Use "
                "swapped(model) to evaluate with the averaged weights, or polyak.distributed.full_state_dict("
                "averager.state_dict()['shadow'], model=model) to gather them on rank 0 for an unsharded model."
            )
        duplicate = copy_module(module)
        self._plan = None
        self.copy_to(duplicate)
        self._plan = None
        return duplicate


# ---------------------------------------------------------------------- several shadows of one model


def check_same_layout(first: Shadow, other: Shadow) -> None:
    """Raise ``ValueError`` unless ``other`` stores the same tensors as ``first``, in the same order and dtypes."""
    mine = [(s.name, s.mode, s.tensor.shape, s.tensor.dtype, s.tensor.device) for s in first._slots]
    theirs = [(s.name, s.mode, s.tensor.shape, s.tensor.dtype, s.tensor.device) for s in other._slots]
    if mine != theirs:
        index = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
        which = f"{mine[index]} vs {theirs[index]}" if index is not None else f"{len(mine)} vs {len(theirs)} tensors"
        raise ValueError(
            f"the shadows hold different tensors ({which}); build them from the same model with the same options"
        )


@torch.no_grad()
def update_many(shadows: Sequence[Shadow], module: nn.Module, weights: Sequence[float | Tensor]) -> None:
    """:meth:`Shadow.update` of several shadows of the same tensors (e.g. EMAs of several lengths) in one pass.

    A model tensor that has to be cast or moved is staged once for all of them, not once per shadow. The
    shadows must share one layout (see :func:`check_same_layout`: same model, same options).
    """
    if len(shadows) != len(weights) or not shadows:
        raise ValueError(f"expected one weight per shadow, got {len(weights)} weights for {len(shadows)} shadows")
    plans = [shadow._plan_for(module) for shadow in shadows]
    for plan, weight in zip(plans, weights, strict=True):
        copy = isinstance(weight, float) and weight == 1.0
        for targets, models in plan.lerps:
            if copy:
                torch._foreach_copy_(targets, models)
            else:
                foreach_lerp(targets, models, weight)
        if plan.copies[0]:
            torch._foreach_copy_(*plan.copies)
    for casts in zip(*(plan.casts for plan in plans), strict=True):
        casts[0].run_shared(casts, weights)


def _refuse_swapped(module: nn.Module) -> None:
    if _OPEN_SWAPS[0] and unwrap(module) in _SWAPPED:
        raise RuntimeError(
            f"the {type(unwrap(module)).__name__} holds averaged weights swapped in by a `swapped()` block that "
            "is still open; leave that block before updating, copying or swapping again"
        )


def _mark_open(target: nn.Module) -> None:
    _SWAPPED.add(target)
    _OPEN_SWAPS[0] += 1


def _mark_closed(target: nn.Module) -> None:
    _SWAPPED.discard(target)
    _OPEN_SWAPS[0] -= 1


@torch.no_grad()
def write_extrapolated(module: nn.Module, average: Shadow, anchor: Shadow, alpha: float) -> None:
    """Write ``average + alpha * (module - anchor)`` into ``module``, in place (BEMA's output).

    Averaged parameters are combined in the shadow's precision (one temporary of their size) and cast to the
    model's dtype. Buffers get ``average``'s value: BatchNorm statistics are not weights, and extrapolating a
    running variance can make it negative. Copied tensors (integer buffers, frozen parameters) get it too.
    """
    _refuse_swapped(module)
    anchor.check(module)  # follows a frozen or unfrozen parameter as the average does
    check_same_layout(average, anchor)
    plan, _ = build(module, average._slots, average.aliases, average)  # not cached: may be a temporary copy
    parameters = {f.name for f in walk(module, {})[0] if f.is_param}
    avg, base, live = [], [], []
    for slot, other, tensor in zip(average._slots, anchor._slots, plan.data, strict=True):  # local shards
        if slot.mode == "average" and slot.name in parameters:
            avg.append(slot.tensor)
            base.append(other.tensor)
            live.append(tensor)
        else:
            tensor.copy_(slot.tensor)
    if not avg:
        return
    moved = [t.to(device=a.device, dtype=a.dtype) for t, a in zip(live, avg, strict=True)]
    result = torch._foreach_sub(moved, base)
    torch._foreach_mul_(result, float(alpha))
    torch._foreach_add_(result, avg)
    torch._foreach_copy_(live, result)


@contextmanager
def extrapolated(module: nn.Module, average: Shadow, anchor: Shadow, alpha: float) -> Iterator[nn.Module]:
    """Within the block ``module`` holds :func:`write_extrapolated`'s result; its own tensors come back exactly
    on exit, even on error (backed up in the model's dtype, written back in place)."""
    _refuse_swapped(module)
    live = build(module, average._slots, average.aliases, average)[0].data
    target = unwrap(module)
    with torch.no_grad():
        backup = [t.clone() for t in live]
    try:
        write_extrapolated(module, average, anchor, alpha)
        _mark_open(target)  # marked and guarded as in Shadow.swapped
        hook = target.register_state_dict_post_hook(_mark_swapped)
        try:
            yield module
        finally:
            distributed.reshard(module)  # as in Shadow.swapped: FSDP2 must not keep gathered averaged weights
            hook.remove()
            _mark_closed(target)
    finally:
        with torch.no_grad():
            copy_all(live, backup)


@torch.no_grad()
def write_blended(module: nn.Module, average: Shadow, factor: float) -> None:
    """Move ``module`` toward the stored average in place: ``module <- module + factor * (average - module)``.

    ``factor=1`` copies the average into the module (Switch EMA); a smaller factor blends the averaged tensors
    in the shadow's precision (copied tensors, e.g. integer buffers, are left as they are).
    """
    if factor == 1.0:
        average.copy_to(module)
        return
    plan = average._plan_for(module)  # refuses a module swapped in by an open block, as copy_to does
    slots = zip(average._slots, plan.data, strict=True)
    pairs = [(slot.tensor, data) for slot, data in slots if slot.mode == "average"]
    if not pairs:
        return
    stored, live = [s for s, _ in pairs], [d for _, d in pairs]
    moved = [d.to(device=s.device, dtype=s.dtype, copy=True) for s, d in pairs]
    torch._foreach_lerp_(moved, stored, float(factor))
    torch._foreach_copy_(live, moved)
