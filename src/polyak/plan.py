"""The plan: which model tensor pairs with which stored tensor, grouped into kernels, and whether that still holds.

A plan is built once per model and reused while nothing that could change the pairing has happened. That is
decided by events, not by looking at every tensor on every update: a process-wide generation counter
(:data:`GENERATION`) is bumped by every way torch offers to change a module's structure or a tensor's data:

- torch's global registration hooks: a parameter, buffer or submodule set or registered (added, replaced,
  tied, ``load_state_dict(assign=True)``);
- ``Module._apply`` (``to``, ``half``, ``cuda``, ``to_empty``, ...), ``Module.__delattr__`` (``del m.bias``, a
  removed layer) and ``register_parameter`` / ``register_buffer`` with None (``m.bias = None``);
- ``Tensor.data = x``, ``Tensor.requires_grad_`` / ``requires_grad = ...`` and ``torch.utils.swap_tensors``,
  which polyak wraps on first use (each wrapper calls torch's own, then adds one to the counter).

A plan made at the current generation is valid: one comparison per update. After an event the plan re-checks
its model once, a pass at C speed over the module dicts and tensors (:meth:`Plan.unchanged`); when something did
change, :func:`build` pairs the model again and either follows the change (a replaced tensor of the same shape,
a model re-cast or moved while its float32 average stays, a parameter frozen or unfrozen whose stored copy fits,
tied names added or dropped) or refuses it with a ``ValueError`` naming the tensor and the change.

Not watched (private or storage-level): writes into a module's ``_parameters`` / ``_buffers`` dicts, and
``set_`` / ``resize_`` of a tensor's storage.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from . import distributed
from .kernels import CastLerp, all_finite, merge_runs
from .module_tensors import Found, walk

__all__ = ["GENERATION", "Plan", "Slot", "build", "refuse_meta", "watch_changes"]

Policy = Literal["average", "copy", "skip"]

# Bumped by every watched change to any module or tensor in the process (see the module docstring).
GENERATION = [0]


def _bump(*_: Any) -> None:
    GENERATION[0] += 1


def _after(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` (a change that torch has no hook for), then a bump."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        GENERATION[0] += 1
        return result

    return wrapper


def _layout(tensor: Tensor) -> tuple[Any, ...] | None:
    """Where and how a tensor's data lies, to tell a real change from a no-op (None when it cannot be read)."""
    try:
        return tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride(), tensor.device
    except Exception:  # tensors without storage (fake, functional, some subclasses): count as changed
        return None


_WATCHING: list[bool] = []


def watch_changes() -> None:
    """Install the event sources once per process (idempotent): torch's hooks and the thin wrappers.

    Each wrapper calls torch's own first and bumps only on a real change where that is cheap to tell, so that
    no-op calls made every step (``model.to(device)``, ``zero_grad(set_to_none=False)``'s ``requires_grad_``)
    cost no re-check.
    """
    if _WATCHING:
        return
    _WATCHING.append(True)
    hooks = torch.nn.modules.module
    hooks.register_module_parameter_registration_hook(_bump)
    hooks.register_module_buffer_registration_hook(_bump)
    hooks.register_module_module_registration_hook(_bump)
    module: Any = nn.Module
    apply, register_parameter, register_buffer = module._apply, module.register_parameter, module.register_buffer

    @functools.wraps(apply)
    def _apply(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Buffers (and, with overwrite_module_params_on_conversion, parameters) are replaced in their dicts.
        before = [*self._parameters.values(), *self._buffers.values()]
        result = apply(self, *args, **kwargs)
        if any(map(operator.is_not, before, [*self._parameters.values(), *self._buffers.values()])):
            GENERATION[0] += 1
        return result

    @functools.wraps(register_parameter)
    def _register_parameter(self: nn.Module, name: str, param: Any) -> None:
        register_parameter(self, name, param)
        if param is None:  # set to None (``m.bias = None``): torch's hooks see only tensors
            GENERATION[0] += 1

    @functools.wraps(register_buffer)
    def _register_buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        register_buffer(self, name, tensor, persistent)
        if tensor is None:
            GENERATION[0] += 1

    module._apply = _apply
    module.__delattr__ = _after(module.__delattr__)
    module.register_parameter = _register_parameter
    module.register_buffer = _register_buffer

    base: Any = torch._C.TensorBase
    data, grad_flag, requires_grad_ = base.data, base.requires_grad, base.requires_grad_

    def set_data(tensor: Tensor, value: Tensor) -> None:
        before = _layout(tensor)
        data.__set__(tensor, value)
        if before is None or _layout(tensor) != before:
            GENERATION[0] += 1

    def set_requires_grad(tensor: Tensor, value: bool) -> None:
        before = grad_flag.__get__(tensor)
        grad_flag.__set__(tensor, value)
        if grad_flag.__get__(tensor) != before:
            GENERATION[0] += 1

    @functools.wraps(requires_grad_)
    def _requires_grad_(tensor: Tensor, requires_grad: bool = True) -> Tensor:
        before = grad_flag.__get__(tensor)
        result = requires_grad_(tensor, requires_grad)
        if grad_flag.__get__(tensor) != before:
            GENERATION[0] += 1
        return result

    tensor_class: Any = torch.Tensor
    tensor_class.data = property(data.__get__, set_data, doc=data.__doc__)
    tensor_class.requires_grad = property(grad_flag.__get__, set_requires_grad, doc=grad_flag.__doc__)
    tensor_class.requires_grad_ = _requires_grad_
    torch.utils.swap_tensors = _after(torch.utils.swap_tensors)


# ---------------------------------------------------------------------- pairing


@dataclass
class Slot:
    """One stored tensor of the shadow."""

    name: str
    mode: Policy  # "average" or "copy"
    tensor: Tensor  # the shadow's copy (a view into a flat buffer); of a DTensor, this rank's shard
    model_dtype: torch.dtype
    value: Tensor  # what users see: ``tensor``, or a DTensor over it laid out like the model's
    paired_dtype: torch.dtype | None = None  # the model tensor's dtype when first paired: a re-cast is told from it


class Options(Protocol):
    """What the plan asks the shadow: which policy a model tensor gets, and in which dtype an average is kept."""

    def _policy(self, found: Found) -> Policy: ...

    def _storage_dtype(self, tensor: Tensor, mode: Policy) -> torch.dtype: ...


_MISSING = object()


def _signature(tensor: Tensor) -> tuple[Any, ...]:
    return tensor.dtype, tensor.shape, tensor.stride(), tensor.device, tensor.requires_grad


@dataclass
class Plan:
    """Model tensors paired with the shadow's, grouped into kernels, and a snapshot to re-check them by."""

    root: nn.Module
    generation: int
    live: list[Tensor]  # the paired model tensors, in the shadow's storage order
    data: list[Tensor]  # what the kernels read and write: ``live`` detached, DTensors by their local shards
    dtensors: list[Tensor] = field(default_factory=list)  # the DTensors of ``live`` ...
    shards: list[Tensor] = field(default_factory=list)  # ... and their local shards, as paired
    sharded: list[Tensor] = field(default_factory=list)  # model tensors of which each rank holds a share
    homes: list[dict[str, Any]] = field(default_factory=list)  # where ``live`` is held (module dicts) ...
    names: list[str] = field(default_factory=list)  # ... and under which key
    lerps: list[tuple[list[Tensor], list[Tensor]]] = field(default_factory=list)  # (shadows, models), same dtype
    casts: list[CastLerp] = field(default_factory=list)  # other dtype or device: staged in chunks
    copies: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))
    # Every entry of every module dict walked (parameters, buffers, submodules; None and skipped ones too), the
    # distinct dicts and non-persistent buffer sets, and their total size: what an unchanged module still has.
    owners: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    objects: list[Any] = field(default_factory=list)
    dicts: list[dict[str, Any]] = field(default_factory=list)
    sets: list[set[str]] = field(default_factory=list)
    count: int = 0
    tensors: list[Tensor] = field(default_factory=list)  # every tensor among them, paired or not ...
    signatures: list[tuple[Any, ...]] = field(default_factory=list)  # ... its dtype, shape, strides, device, grad flag
    pointers: list[int] = field(default_factory=list)
    guarded: list[CastLerp] | None = None  # every averaged group staged, for nonfinite="skip"; built on demand

    def current(self, module: nn.Module) -> bool:
        """True when no watched change happened since the plan was made (or last re-checked)."""
        if self.root is not module or self.generation != GENERATION[0]:
            return False
        if not self.shards:
            return True
        # Sharded (FSDP2): a forward without backward leaves gathered parameters in the module dicts (set there
        # directly, no event), and a lazy init may re-pad the local shards: check both, at C speed.
        is_ = operator.is_
        return all(map(is_, map(distributed.local_shard, self.dtensors), self.shards)) and all(
            map(is_, map(dict.get, self.homes, self.names), self.live)
        )

    def unchanged(self) -> bool:
        """True when the module still holds exactly what the plan was built from: the same entries (none added,
        removed or replaced), the same tensors with the same data, dtype, shape, strides, device and trainability.
        C-speed passes; run after an event only."""
        now = map(dict.get, self.owners, self.keys, repeat(_MISSING))
        if not all(map(operator.is_, now, self.objects)):
            return False
        if sum(map(len, self.dicts)) + sum(map(len, self.sets)) != self.count:
            return False
        if list(map(_signature, self.tensors)) != self.signatures:
            return False
        return _pointers(self.tensors) == self.pointers

    def staged(self) -> list[CastLerp]:
        """Every averaged group as a staged lerp, so that a skipped update can keep the shadow exactly."""
        if self.guarded is None:
            self.guarded = [CastLerp(shadows, models) for shadows, models in self.lerps] + self.casts
        return self.guarded

    def finite(self) -> Tensor | None:
        """0-d bool tensor: every averaged model value is finite (no host sync); None when nothing is averaged.

        One fused, exact check per group (:func:`polyak.kernels.all_finite`). With a sharded (DTensor, ZeRO-3)
        model each rank sees its own shards only, so the flag is all-reduced across the ranks: every rank
        skips together (one collective per update, in this mode only).
        """
        flag: Tensor | None = None
        groups = [(shadows[0].device, models) for shadows, models in self.lerps]
        groups += [(cast.shadows[0].device, cast.models) for cast in self.casts]
        for device, models in groups:
            ok = all_finite(models).to(device)
            flag = ok if flag is None else flag & ok.to(flag.device)
        if flag is not None and self.sharded:
            flag = distributed.all_ranks_true(flag, self.sharded)
        return flag


def _check_layout(slot: Slot, model_tensor: Tensor) -> None:
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


_REBUILD = "build a new averager for the changed model"


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "bool" if dtype == torch.bool else "integer"


def _check_pair(slot: Slot, f: Found, mode: Policy, options: Options) -> None:
    """Raise ``ValueError`` naming the tensor when the model's tensor ``f`` no longer fits ``slot``."""
    tensor, name = f.tensor, slot.name
    shape = distributed.stored_shape(tensor)  # of a ZeRO-3 parameter: its partition's
    if shape != slot.value.shape:
        raise ValueError(
            f"model tensor {name!r}: the average has shape {tuple(slot.value.shape)}, the model has "
            f"{tuple(shape)} (changed by p.data = ..., a replaced tensor, or another model); {_REBUILD}"
        )
    if mode == "skip":
        why = "frozen (requires_grad=False)" if f.is_param and not tensor.requires_grad else "not persistent"
        raise ValueError(
            f"model tensor {name!r} is now {why}, which this averager's options leave to the model, but the average "
            f"holds it; undo the change or {_REBUILD}"
        )
    stored = slot.tensor.dtype
    if mode == "average":
        if _kind(tensor.dtype) != _kind(stored):
            raise ValueError(
                f"model tensor {name!r} is averaged in {stored} but the model now holds it as {tensor.dtype}; "
                f"{_REBUILD}"
            )
        if slot.mode == "copy" and options._storage_dtype(tensor, "average") != stored:
            raise ValueError(
                f"parameter {name!r} was unfrozen (requires_grad=True): it was copied in {stored}, which cannot "
                f"hold its average ({options._storage_dtype(tensor, 'average')}); build the averager with "
                f"frozen='average', or {_REBUILD}"
            )
    elif slot.paired_dtype not in (None, tensor.dtype) and (  # re-cast since first paired (a chosen cast is not)
        _kind(tensor.dtype) != _kind(stored) or torch.promote_types(tensor.dtype, stored) != stored
    ):
        raise ValueError(
            f"model tensor {name!r} is copied in {stored} but the model now holds it as {tensor.dtype}, which "
            f"that copy cannot hold exactly; {_REBUILD}"
        )
    _check_layout(slot, tensor)


def refuse_meta(found: Sequence[Found], hint: str) -> None:
    """Raise ``ValueError`` naming the first tensor on the meta device (it holds no values to average)."""
    on_meta = next((f.name for f in found if f.tensor.device.type == "meta"), None)
    if on_meta is not None:
        raise ValueError(f"model tensor {on_meta!r} is on the meta device (it holds no values); {hint}")


def build(
    module: nn.Module, slots: Sequence[Slot], aliases: dict[str, str], options: Options
) -> tuple[Plan, dict[str, str]]:
    """Pair ``module``'s tensors with ``slots`` by name and group them into kernels; returns the plan and the
    tied names now (``aliases``: the tied names when the average was made).

    Refused (``ValueError`` naming the tensor, nothing changed): a stored tensor removed, tied to another or
    moved to the meta device, a tensor added or untied, a changed shape, a dtype the average cannot follow,
    a tensor that the options now leave out. Followed: anything else; a parameter frozen or unfrozen switches
    between copied and averaged (the average starts from the value last copied).
    """
    distributed.reshard(module)
    generation = GENERATION[0]  # read first: a change during the walk makes the plan stale at once
    tied: dict[str, str] = {}
    found, modules = walk(module, tied)
    refuse_meta(
        found, "call to_empty() and load or initialise the weights before updating, or build the averager after that"
    )
    by_name = {f.name: f for f in found}
    by_name.update({alias: by_name[name] for alias, name in tied.items()})  # a tensor by any of its names
    owner: dict[int, str] = {}  # found tensor -> the stored name it pairs with
    for slot in slots:
        f = by_name.get(slot.name)
        if f is None:
            raise ValueError(
                f"model has no tensor {slot.name!r} that the average holds: it was removed (del, set to None, a "
                f"layer taken out) or this is not the model the average was made from; restore it, or {_REBUILD}"
            )
        other = owner.setdefault(id(f), slot.name)
        if other != slot.name:
            raise ValueError(
                f"model tensor {slot.name!r} is now tied to {other!r}; the average holds both separately. "
                f"{_REBUILD[0].upper() + _REBUILD[1:]}"
            )
    for f in found:
        if id(f) not in owner and options._policy(f) != "skip":
            untied = next((n for n in (f.name, *(a for a, n in tied.items() if n == f.name)) if n in aliases), None)
            if untied is not None:
                change = f"was tied to {aliases[untied]!r} when the average was made and is now a tensor of its own"
                raise ValueError(f"model tensor {untied!r} is not in the average: it {change}; {_REBUILD}")
            if f.is_param and f.tensor.requires_grad and options._policy(f) == "average":
                change = "was added or unfrozen (requires_grad=True)"
            else:
                change = "was added"
            raise ValueError(f"model tensor {f.name!r} is not in the average: it {change}; {_REBUILD}")
    pairs = [(slot, by_name[slot.name], options._policy(by_name[slot.name])) for slot in slots]
    slot_of = {name: owner[id(f)] for name, f in by_name.items() if id(f) in owner}  # any name -> its slot
    for slot, f, mode in pairs:
        _check_pair(slot, f, mode, options)
    for slot, f, mode in pairs:  # followed: frozen <-> trainable
        slot.mode = mode
        if slot.paired_dtype is None:
            slot.paired_dtype = f.tensor.dtype
    live = [f.tensor for _, f, _ in pairs]
    plan = Plan(module, generation, live, [distributed.local(t).detach() for t in live])
    plan.dtensors = [t for t in live if distributed.is_dtensor(t)]
    plan.shards = [distributed.local(t) for t in plan.dtensors]
    plan.sharded = [t for t in live if distributed.is_sharded(t)]
    plan.homes, plan.names = [f.owner for _, f, _ in pairs], [f.key for _, f, _ in pairs]
    _snapshot(plan, modules)
    _group(plan, slots)
    return plan, {alias: name for alias, name in slot_of.items() if alias != name}


def _pointers(live: list[Tensor]) -> list[int]:
    """Where each tensor's data lives now (a DTensor's: its local shard's)."""
    return [distributed.local(t).data_ptr() for t in live]


def _snapshot(plan: Plan, modules: list[nn.Module]) -> None:
    """Record what :meth:`Plan.unchanged` compares."""
    for m in modules:
        plan.dicts += (m._parameters, m._buffers, m._modules)
        plan.sets.append(m._non_persistent_buffers_set)
    for d in plan.dicts:
        plan.owners += [d] * len(d)
        plan.keys += list(d)
        plan.objects += list(d.values())
    plan.count = len(plan.keys) + sum(map(len, plan.sets))
    plan.tensors = [t for t in plan.objects if isinstance(t, Tensor)]
    plan.signatures = list(map(_signature, plan.tensors))
    plan.pointers = _pointers(plan.tensors)


def _group(plan: Plan, slots: Sequence[Slot]) -> None:
    """One kernel per (shadow device and dtype, model device and dtype)."""
    unused: list[Tensor] = []  # the kernels' list of tensors they read through a flat view: events cover them
    groups: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
    for slot, data in zip(slots, plan.data, strict=True):
        if slot.mode == "copy":
            plan.copies[0].append(slot.tensor)
            plan.copies[1].append(data)
            continue
        key = (slot.tensor.device, slot.tensor.dtype, data.device, data.dtype)
        shadows, models = groups.setdefault(key, ([], []))
        shadows.append(slot.tensor)
        models.append(data)
    for (device, dtype, model_device, model_dtype), (shadows, models) in groups.items():
        if device == model_device and dtype == model_dtype:
            plan.lerps.append(merge_runs(unused, shadows, models))
        else:
            plan.casts.append(CastLerp(shadows, models))
    if plan.copies[0]:
        plan.copies = merge_runs(unused, *plan.copies)
