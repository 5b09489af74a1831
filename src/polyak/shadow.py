"""The shadow: storage of the averaged tensors, paired by name with a module's, and their updates.

This is the only place in polyak where tensors are averaged (with the kernels of :mod:`polyak.kernels`).
A :class:`Shadow` selects which tensors of a module take part (found by :mod:`polyak.module_tensors`),
stores them (never below float32 unless asked), and applies

    shadow <- shadow + w * (theta - shadow)

with one kernel per group of tensors that share a device and dtype. It pairs tensors by qualified name,
not by position, and knows nothing about which rule produced ``w``.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import distributed
from .kernels import CastLerp, all_finite, copy_all, foreach_lerp, merge_runs
from .module_tensors import Found, copy_module, unwrap, walk

__all__ = [
    "NonFinite",
    "Policy",
    "Shadow",
    "check_same_layout",
    "extrapolated",
    "is_swapped_state_dict",
    "update_many",
    "write_extrapolated",
]

Policy = Literal["average", "copy", "skip"]
_POLICIES = ("average", "copy", "skip")
NonFinite = Literal["propagate", "skip", "raise"]
_NONFINITE = ("propagate", "skip", "raise")

# Modules that hold swapped-in averaged weights right now (any Shadow's), and the state-dict marker key.
_SWAPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_SWAP_MARK = "polyak_swapped"


@dataclass
class _Slot:
    """One stored tensor of the shadow."""

    name: str
    mode: Policy  # "average" or "copy"
    tensor: Tensor  # the shadow's copy (a view into a flat buffer); of a DTensor, this rank's shard
    model_dtype: torch.dtype
    value: Tensor  # what users see: ``tensor``, or a DTensor over it laid out like the model's


def _check_layout(slot: _Slot, model_tensor: Tensor) -> None:
    """Raise unless ``model_tensor`` is sharded (a DTensor) exactly when, and as, the stored tensor is."""
    stored, given = slot.value is not slot.tensor, distributed.is_dtensor(model_tensor)
    if stored != given:
        hint = (
            "pass the sharded model the average was made from"
            if stored
            else "make the averager from the model as it is trained (after fully_shard); a full state loads "
            "into it with load_state_dict"
        )
        raise ValueError(
            f"tensor {slot.name!r}: the average holds a {'DTensor' if stored else 'plain tensor'}, the model a "
            f"{'DTensor' if given else 'plain tensor'}; {hint}"
        )
    if stored and not distributed.same_layout(slot.value, model_tensor):
        layout = "{0.placements} on {0.device_mesh}"
        raise ValueError(
            f"tensor {slot.name!r}: the average is laid out as {layout.format(slot.value)}, the model as "
            f"{layout.format(model_tensor)}; shard the model as when the average was made"
        )


@dataclass
class _Plan:
    """Model tensors paired with the shadow's, grouped into kernels; valid while the module is unchanged."""

    root: nn.Module
    owners: list[dict[str, Any]]
    keys: list[str]
    live: list[Tensor]  # model tensors, in the shadow's storage order
    links: list[tuple[dict[str, Any], str, nn.Module]]
    data: list[Tensor]  # what the kernels read and write: ``live``, with DTensors replaced by their local shards
    dtensors: list[Tensor] = field(default_factory=list)  # the DTensors of ``live`` ...
    shards: list[Tensor] = field(default_factory=list)  # ... and their local shards, as paired
    lerps: list[tuple[list[Tensor], list[Tensor]]] = field(default_factory=list)  # (shadows, models), same dtype
    casts: list[CastLerp] = field(default_factory=list)  # other dtype or device: staged in chunks
    copies: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))
    # Model tensors read through a flat view of their storage (merged runs, tiled cast batches), and their
    # data pointers when the plan was built.
    watched: list[Tensor] = field(default_factory=list)
    pointers: list[int] = field(default_factory=list)
    guarded: list[CastLerp] | None = None  # every averaged group staged, for nonfinite="skip"; built on demand

    def staged(self) -> list[CastLerp]:
        """Every averaged group as a staged lerp, so that a skipped update can keep the shadow exactly."""
        if self.guarded is None:
            staged = [CastLerp(shadows, models) for shadows, models in self.lerps]
            for cast in staged:  # a cast may read a flat model range: watch it like the plan's own
                self.watched.extend(cast.watched)
            self.pointers = [t.data_ptr() for t in self.watched]
            self.guarded = staged + self.casts
        return self.guarded

    def finite(self) -> Tensor | None:
        """0-d bool tensor: every averaged model value is finite (no host sync); None when nothing is averaged.

        One fused, exact check per group (:func:`polyak.kernels.all_finite`). With a sharded (DTensor)
        model each rank sees its own shards only, so the flag is all-reduced across the mesh: every rank
        skips together (one collective per update, in this mode only).
        """
        flag: Tensor | None = None
        groups = [(shadows[0].device, models) for shadows, models in self.lerps]
        groups += [(cast.shadows[0].device, cast.models) for cast in self.casts]
        for device, models in groups:
            ok = all_finite(models).to(device)
            flag = ok if flag is None else flag & ok.to(flag.device)
        if flag is not None and self.dtensors:
            flag = distributed.all_ranks_true(flag, self.dtensors)
        return flag

    def is_current(self) -> bool:
        """True when every model tensor and submodule is still the object the plan was built from.

        Tensors read through a merged run must also still own the same memory: ``model.to(...)`` and
        ``p.data = ...`` keep the object but replace its storage.
        """
        getitem, is_ = operator.getitem, operator.is_
        if not all(map(is_, map(getitem, self.owners, self.keys), self.live)):
            return False
        if not all(map(is_, map(distributed.local_shard, self.dtensors), self.shards)):
            return False  # a DTensor got new local storage (e.g. FSDP2's lazy init re-pads its shards)
        if self.watched and list(map(Tensor.data_ptr, self.watched)) != self.pointers:
            return False
        dicts, names, children = zip(*self.links, strict=True) if self.links else ((), (), ())
        return all(map(is_, map(getitem, dicts, names), children))


def _mark_swapped(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    """State-dict hook while swapped: mark the module's metadata entry (kept by ``torch.save``) and warn."""
    local_metadata[_SWAP_MARK] = True
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
    ) -> None:
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

        distributed.reshard(module)  # FSDP2 keeps some parameters gathered after an evaluation forward
        aliases: dict[str, str] = {}
        found, _ = walk(module, aliases)
        chosen = [(f, mode) for f in found if (mode := self._policy(f)) != "skip"]
        if adopt:
            detached = [(f, mode, f.tensor.detach()) for f, mode in chosen]
            self._slots = [_Slot(f.name, mode, distributed.local(t), f.tensor.dtype, t) for f, mode, t in detached]
        else:
            self._slots = self._allocate(chosen)
        self._by_name = {slot.name: slot for slot in self._slots}
        # other names of tied tensors (e.g. lm_head.weight for embed.weight), so exports load with strict=True
        self.aliases = {alias: name for alias, name in aliases.items() if name in self._by_name}
        self._plan: _Plan | None = None
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

    def _allocate(self, chosen: Sequence[tuple[Found, Policy]]) -> list[_Slot]:
        """One flat buffer per (device, dtype, mode, model dtype); slots are views, in storage order."""
        groups: dict[tuple[Any, ...], list[tuple[Found, Policy]]] = {}
        for f, mode in chosen:
            device = self.device if self.device is not None else f.tensor.device
            key = (str(device), self._storage_dtype(f.tensor, mode), mode, f.tensor.dtype, str(f.tensor.device))
            groups.setdefault(key, []).append((f, mode))
        slots: list[_Slot] = []
        for (device, dtype, mode, model_dtype, _), members in groups.items():
            shards = [distributed.local(f.tensor) for f, _ in members]  # a DTensor stores its local shard only
            flat = torch.empty(sum(t.numel() for t in shards), dtype=dtype, device=device)
            offset = 0
            for (f, _), shard in zip(members, shards, strict=True):
                n = shard.numel()
                view = flat[offset : offset + n].view(shard.shape)
                value = distributed.sharded_like(view, f.tensor) if shard is not f.tensor else view
                slots.append(_Slot(f.name, mode, view, model_dtype, value))
                offset += n
        return slots

    # ------------------------------------------------------------------ pairing with a module

    def _plan_for(self, module: nn.Module) -> _Plan:
        """The cached pairing with ``module``, rebuilt (and checked) when the module changed."""
        if _SWAPPED and unwrap(module) in _SWAPPED:
            raise RuntimeError(
                f"the {type(unwrap(module)).__name__} holds averaged weights swapped in by a `swapped()` block that "
                "is still open; leave that block before updating, copying or swapping again"
            )
        plan = self._plan
        if plan is not None and plan.root is module:
            if plan.is_current():
                return plan
            if plan.dtensors:  # FSDP2 may hold gathered parameters after a forward without backward
                distributed.reshard(module)
                if plan.is_current():
                    return plan
        plan = self._plan = self._build_plan(module)
        return plan

    def _build_plan(self, module: nn.Module) -> _Plan:
        distributed.reshard(module)
        found, links = walk(module)
        by_name = {f.name: f for f in found}
        missing = [slot.name for slot in self._slots if slot.name not in by_name]
        if missing:
            raise ValueError(
                f"model has no tensor {missing[0]!r} that the average holds ({len(missing)} missing in all); "
                "the model's structure differs from the one the average was made from"
            )
        extra = [f.name for f in found if f.name not in self._by_name and self._policy(f) != "skip"]
        if extra:
            raise ValueError(
                f"model tensor {extra[0]!r} is not in the average ({len(extra)} extra in all); "
                "the model's structure differs from the one the average was made from"
            )
        pairs = [(slot, by_name[slot.name]) for slot in self._slots]
        for slot, f in pairs:
            if f.tensor.shape != slot.value.shape:
                raise ValueError(
                    f"tensor {slot.name!r}: the average has shape {tuple(slot.value.shape)}, "
                    f"the model has {tuple(f.tensor.shape)}"
                )
            if slot.mode == "average" and not (f.tensor.is_floating_point() or f.tensor.is_complex()):
                raise ValueError(f"tensor {slot.name!r} is averaged but the model holds it as {f.tensor.dtype}")
            _check_layout(slot, f.tensor)
        plan = _Plan(
            module,
            [f.owner for _, f in pairs],
            [f.key for _, f in pairs],
            [f.tensor for _, f in pairs],
            links,
            [distributed.local(f.tensor) for _, f in pairs],
        )
        plan.dtensors = [f.tensor for _, f in pairs if distributed.is_dtensor(f.tensor)]
        plan.shards = [distributed.local(t) for t in plan.dtensors]
        # One kernel per (shadow device and dtype, model device and dtype): each flat buffer is one such group.
        groups: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
        for (slot, _), data in zip(pairs, plan.data, strict=True):
            if slot.mode == "copy":
                plan.copies[0].append(slot.tensor)
                plan.copies[1].append(data)
                continue
            key = (slot.tensor.device, slot.tensor.dtype, data.device, data.dtype)
            groups.setdefault(key, ([], []))
            groups[key][0].append(slot.tensor)
            groups[key][1].append(data)
        for (device, dtype, model_device, model_dtype), (shadows, models) in groups.items():
            if device == model_device and dtype == model_dtype:
                plan.lerps.append(merge_runs(plan.watched, shadows, models))
            else:
                plan.casts.append(CastLerp(shadows, models))
                plan.watched.extend(plan.casts[-1].watched)
        if plan.copies[0]:
            plan.copies = merge_runs(plan.watched, *plan.copies)
        plan.pointers = [t.data_ptr() for t in plan.watched]
        return plan

    # ------------------------------------------------------------------ the update

    @torch.no_grad()
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
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        plan = self._plan_for(module)
        if nonfinite == "skip":
            keep = plan.finite()
            if keep is not None:
                for staged in plan.staged():
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
        for shadows, models in plan.lerps:
            foreach_lerp(shadows, models, weight)
        for cast in plan.casts:
            cast.run(weight)
        if plan.copies[0]:
            torch._foreach_copy_(*plan.copies)
        return None

    def _raise_nonfinite(self, plan: _Plan) -> None:
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

    def _copy_all(self, plan: _Plan) -> None:
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
        target = unwrap(module)
        live = list(plan.data)
        with torch.no_grad():
            backup = [t.clone() for t in live]
        _SWAPPED.add(target)
        hook = target.register_state_dict_post_hook(_mark_swapped)
        try:
            with torch.no_grad():
                copy_all(live, [slot.tensor for slot in self._slots])
            yield module
        finally:
            distributed.reshard(module)  # else FSDP2 would keep evaluating/training with the averaged weights
            hook.remove()
            _SWAPPED.discard(target)
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
        }

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
        if sharded:
            raise RuntimeError(
                f"cannot build an averaged model: the average is sharded across ranks ({sharded[0]!r} is a "
                "DTensor) and a sharded (FSDP2) model cannot be deep-copied. Use swapped(model) to evaluate with "
                "the averaged weights, or polyak.distributed.full_state_dict(averager.state_dict()['shadow']) to "
                "gather them on rank 0 for an unsharded model."
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
    if _SWAPPED and unwrap(module) in _SWAPPED:
        raise RuntimeError(
            f"the {type(unwrap(module)).__name__} holds averaged weights swapped in by a `swapped()` block that "
            "is still open; leave that block before copying or swapping again"
        )


@torch.no_grad()
def write_extrapolated(module: nn.Module, average: Shadow, anchor: Shadow, alpha: float) -> None:
    """Write ``average + alpha * (module - anchor)`` into ``module``, in place (BEMA's output).

    Averaged tensors are combined in the shadow's precision (one temporary of their size) and cast to the
    model's dtype; copied tensors (integer buffers, frozen parameters) get ``average``'s value.
    """
    _refuse_swapped(module)
    check_same_layout(average, anchor)
    plan = average._build_plan(module)  # not cached: the module may be a temporary copy
    avg, base, live = [], [], []
    for slot, other, tensor in zip(average._slots, anchor._slots, plan.data, strict=True):  # local shards
        if slot.mode == "average":
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
    live = average._build_plan(module).data
    target = unwrap(module)
    with torch.no_grad():
        backup = [t.clone() for t in live]
    try:
        write_extrapolated(module, average, anchor, alpha)
        _SWAPPED.add(target)  # marked and guarded as in Shadow.swapped
        hook = target.register_state_dict_post_hook(_mark_swapped)
        try:
            yield module
        finally:
            distributed.reshard(module)  # as in Shadow.swapped: FSDP2 must not keep gathered averaged weights
            hook.remove()
            _SWAPPED.discard(target)
    finally:
        with torch.no_grad():
            copy_all(live, backup)
