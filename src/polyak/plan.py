"""The plan: which model tensor pairs with which stored tensor, grouped into kernels, and whether that still holds.

A plan is built once per model and reused while nothing that could change the pairing happened: its model's
:class:`~polyak.watch.Watcher` (events on that model only) says so, at the cost of one attribute read per update.
After an event the plan re-checks its model once, a pass at C speed over the module dicts and tensors
(:meth:`Plan.unchanged`); when something did change, :func:`build` pairs the model again and either follows the
change (a replaced tensor of the same shape, a model re-cast or moved while its float32 average stays, a
parameter frozen or unfrozen whose stored copy fits, tied names added or dropped) or refuses it with a
``ValueError`` naming the tensor and the change. Tensors of a ``volatile`` engine (FSDP2 swaps gathered
parameters into module dicts with no event) are checked by identity on every update.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch import Tensor, nn

from .kernels import Fold, all_finite, copy_all, merge_runs
from .module_tensors import Found, walk
from .options import Options, Policy
from .storage import Engine, engine_of, release
from .watch import Watcher

__all__ = ["Plan", "Slot", "build"]


@dataclass
class Slot:
    """One selected model tensor and its K stored tensors (this rank's shard of a sharded one)."""

    name: str
    mode: Policy  # "average" or "copy"
    engine: str  # the storage adapter the tensor had when stored
    stored: list[Tensor]  # per average: a view into a flat buffer (or an adopted module's own tensor)
    values: list[Tensor]  # what users see of each: ``stored``, or a DTensor over it laid out like the model's
    model_dtype: torch.dtype
    paired_dtype: torch.dtype | None = None  # the model tensor's dtype when first paired: a re-cast is told from it


_MISSING = object()


def _signature(tensor: Tensor) -> tuple[Any, ...]:
    return tensor.dtype, tensor.shape, tensor.stride(), tensor.device, tensor.requires_grad


@dataclass
class Plan:
    """Model tensors paired with the stored ones, grouped into kernels, and a snapshot to re-check them by."""

    root: nn.Module
    watcher: Watcher | None
    live: list[Tensor]  # the paired model tensors, in storage order
    data: list[Tensor]  # what the kernels read and write: ``live`` detached, by their local data
    groups: list[tuple[list[list[Tensor]], list[Tensor], torch.Generator | None]] = field(default_factory=list)
    folds: dict[bool, list[Fold]] = field(default_factory=dict)  # the kernels of ``groups``, by guard
    copies: list[tuple[list[Tensor], list[Tensor]]] = field(default_factory=list)  # per average: (stored, source)
    sharded: dict[Engine, list[Tensor]] = field(default_factory=dict)  # model tensors each rank holds a share of
    volatile: list[tuple[Engine, Tensor, Tensor, dict[str, Any], str]] = field(default_factory=list)
    # Every entry of every module dict walked (parameters, buffers, submodules; None and skipped ones too), the
    # distinct dicts and non-persistent buffer sets, and their total size: what an unchanged module still has.
    owners: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    objects: list[Any] = field(default_factory=list)
    dicts: list[dict[str, Any]] = field(default_factory=list)
    sets: list[set[str]] = field(default_factory=list)
    persistence: list[frozenset[str]] = field(default_factory=list)  # the sets' contents: which names are left out
    count: int = 0
    tensors: list[Tensor] = field(default_factory=list)  # every tensor among them, paired or not ...
    signatures: list[tuple[Any, ...]] = field(default_factory=list)  # ... dtype, shape, strides, device, grad flag
    pointers: list[int] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)

    def current(self, module: nn.Module) -> bool:
        """True when ``module`` is this plan's and no change was seen since it was made (or last re-checked)."""
        if self.root is not module or (self.watcher is not None and self.watcher.dirty):
            return False
        if not self.volatile:
            return True
        # FSDP2: a forward without backward leaves gathered parameters in the module dicts (set there directly, no
        # event), and a lazy init may re-pad the local shards: check both, at C speed.
        return all(engine.local(t) is shard and home.get(key) is t for engine, t, shard, home, key in self.volatile)

    def unchanged(self) -> bool:
        """True when the module still holds exactly what the plan was built from: the same entries (none added,
        removed or replaced), the same tensors with the same data, dtype, shape, strides, device and trainability.
        C-speed passes; run after an event only."""
        now = map(dict.get, self.owners, self.keys, repeat(_MISSING))
        if not all(map(operator.is_, now, self.objects)):
            return False
        if sum(map(len, self.dicts)) + sum(map(len, self.sets)) != self.count:
            return False
        if list(map(frozenset, self.sets)) != self.persistence:  # persistence moved from one buffer to another
            return False
        if list(map(_signature, self.tensors)) != self.signatures:
            return False
        return _pointers(self.tensors) == self.pointers

    def watch(self) -> None:
        """(Re-)register what the watcher follows: the modules walked, their tensors, and engine anchors."""
        if self.watcher is not None:
            anchors = [a for t in self.live for a in engine_of(t).anchors(t)]
            self.watcher.watch(self.modules, [*self.tensors, *anchors])

    def kernels(self, guard: bool) -> list[Fold]:
        """One :class:`~polyak.kernels.Fold` per group; ``guard``: able to skip on the device (made on demand)."""
        folds = self.folds.get(guard)
        if folds is None:
            folds = self.folds[guard] = [Fold(a, m, generator=g, guard=guard) for a, m, g in self.groups]
        return folds

    def finite(self) -> Tensor | None:
        """0-d bool tensor: every averaged model value is finite (no host sync); None when nothing is averaged.

        One fused, exact check per kernel group. Under a sharded engine each rank sees its own shards, so the
        flag is and-ed across the ranks (one collective per update, in this mode only): every rank skips together.
        """
        flag: Tensor | None = None
        for averages, models, _ in self.groups:
            ok = all_finite(models).to(averages[0][0].device)
            flag = ok if flag is None else flag & ok.to(flag.device)
        if flag is not None:
            for engine, tensors in self.sharded.items():
                flag = engine.agree(flag, tensors)
        return flag

    def copy(self) -> None:
        """Copy the model into every copied stored tensor (into the first, then from it: one read of the model)."""
        for stored, source in self.copies:
            copy_all(stored, source)


_REBUILD = "build a new averager for the changed model"


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "bool" if dtype == torch.bool else "integer"


def _check_pair(slot: Slot, f: Found, mode: Policy, options: Options, follow: bool) -> None:
    """Raise ``ValueError`` naming the tensor when the model's tensor ``f`` no longer fits ``slot`` (``follow``:
    the model read from; else a module only written into, which may hold a copied tensor in any dtype)."""
    tensor, name = f.tensor, slot.name
    engine = engine_of(tensor)
    if engine.name != slot.engine:
        hint = (
            "pass the sharded model the average was made from"
            if engine.name == "plain"
            else "make the averager from the model as it is trained (after sharding it); a full state loads into it"
        )
        raise ValueError(
            f"tensor {name!r}: the average holds a {slot.engine} tensor, the model a {engine.name} one; {hint}"
        )
    shape, held = engine.stored_shape(tensor), slot.values[0].shape
    if shape != held:
        raise ValueError(
            f"model tensor {name!r}: the average has shape {tuple(held)}, the model has {tuple(shape)} (changed by "
            f"p.data = ..., a replaced tensor, or another model); {_REBUILD}"
        )
    if mode == "skip":
        why = "frozen (requires_grad=False)" if f.is_param and not tensor.requires_grad else "not persistent"
        raise ValueError(
            f"model tensor {name!r} is now {why}, which this averager's options leave to the model, but the average "
            f"holds it; undo the change or {_REBUILD}"
        )
    stored = slot.stored[0].dtype
    recast = follow and slot.paired_dtype not in (None, tensor.dtype)  # the model re-cast since first paired
    if mode == "average":
        if _kind(tensor.dtype) != _kind(stored):
            raise ValueError(
                f"model tensor {name!r} is averaged in {stored} but the model now holds it as {tensor.dtype}; "
                f"{_REBUILD}"
            )
        if slot.mode == "copy" and options.storage_dtype(tensor, "average") != stored:
            raise ValueError(
                f"parameter {name!r} was unfrozen (requires_grad=True): it was copied in {stored}, which cannot "
                f"hold its average ({options.storage_dtype(tensor, 'average')}); build the averager with "
                f"frozen='average', or {_REBUILD}"
            )
    elif recast and (_kind(tensor.dtype) != _kind(stored) or torch.promote_types(tensor.dtype, stored) != stored):
        raise ValueError(
            f"model tensor {name!r} is copied in {stored} but the model now holds it as {tensor.dtype}, which "
            f"that copy cannot hold exactly; {_REBUILD}"
        )
    engine.check_pair(name, slot.values[0], tensor)


def _match(found: list[Found], tied: dict[str, str], slots: Sequence[Slot]) -> tuple[dict[str, Found], dict[int, str]]:
    """Each model tensor by any of its names, and the stored name each paired one goes with; refuses removed and
    newly tied tensors."""
    by_name = {f.name: f for f in found}
    by_name.update({alias: by_name[name] for alias, name in tied.items()})
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
    return by_name, owner


def build(
    module: nn.Module,
    slots: Sequence[Slot],
    aliases: dict[str, str],
    options: Options,
    kernels: Callable[[Plan, Sequence[Slot]], None],
    watcher: Watcher | None = None,
    *,
    follow: bool = True,
) -> tuple[Plan, dict[str, str]]:
    """Pair ``module``'s tensors with ``slots`` by name, group them into kernels (``kernels(plan, slots)``) and
    return the plan and the tied names now (``aliases``: the tied names when the average was made).

    ``follow=False`` pairs a module that only receives the averages (a copy of the model, a live target whose
    parameters do not require grad): each slot keeps its mode, and the module's other tensors are left alone.

    Refused (``ValueError`` naming the tensor, nothing changed): a stored tensor removed, tied to another or
    moved to the meta device, a tensor added or untied, a changed shape, a dtype the average cannot follow,
    a tensor that the options now leave out. Followed: anything else; a parameter frozen or unfrozen switches
    between copied and averaged (the average starts from the value last copied).
    """
    release(module)  # FSDP2 / ZeRO-3 may hold gathered parameters after a forward without backward
    tied: dict[str, str] = {}
    found, modules = walk(module, tied)
    options.check_model(found)
    by_name, owner = _match(found, tied, slots)
    for f in found if follow else ():
        if id(f) not in owner and options.mode(f) != "skip":
            untied = next((n for n in (f.name, *(a for a, n in tied.items() if n == f.name)) if n in aliases), None)
            if untied is not None:
                change = f"was tied to {aliases[untied]!r} when the average was made and is now a tensor of its own"
                raise ValueError(f"model tensor {untied!r} is not in the average: it {change}; {_REBUILD}")
            unfrozen = f.is_param and f.tensor.requires_grad and options.mode(f) == "average"
            change = "was added or unfrozen (requires_grad=True)" if unfrozen else "was added"
            raise ValueError(f"model tensor {f.name!r} is not in the average: it {change}; {_REBUILD}")
    pairs = [(slot, f, options.mode(f) if follow else slot.mode) for slot in slots for f in (by_name[slot.name],)]
    for slot, f, mode in pairs:
        _check_pair(slot, f, mode, options, follow)
    for slot, f, mode in pairs if follow else ():  # followed: frozen <-> trainable
        slot.mode = mode
        if slot.paired_dtype is None:
            slot.paired_dtype = f.tensor.dtype
    live = [f.tensor for _, f, _ in pairs]
    engines = [engine_of(t) for t in live]
    plan = Plan(module, watcher, live, [e.local(t).detach() for e, t in zip(engines, live, strict=True)])
    for engine, tensor, (_, f, _) in zip(engines, live, pairs, strict=True):
        if engine.sharded:
            plan.sharded.setdefault(engine, []).append(tensor)
        if engine.volatile:
            plan.volatile.append((engine, tensor, engine.local(tensor), f.owner, f.key))
    _snapshot(plan, modules)
    kernels(plan, slots)
    plan.watch()
    slot_of = {name: owner[id(f)] for name, f in by_name.items() if id(f) in owner}  # any name -> its slot
    return plan, {alias: name for alias, name in slot_of.items() if alias != name}


def group(plan: Plan, slots: Sequence[Slot], generators: dict[str, torch.Generator]) -> None:
    """The kernel groups of ``plan``: one per (average device and dtype, model device and dtype), stochastic
    rounding drawing from the average device's stream; copies merged into flat runs."""
    count = len(slots[0].stored) if slots else 0
    groups: dict[tuple[Any, ...], tuple[list[list[Tensor]], list[Tensor]]] = {}
    copies: tuple[list[list[Tensor]], list[Tensor]] = ([[] for _ in range(count)], [])
    for slot, data in zip(slots, plan.data, strict=True):
        first = slot.stored[0]
        if slot.mode == "copy":
            for k in range(count):
                copies[0][k].append(slot.stored[k])
            copies[1].append(data)
            continue
        key = (first.device, first.dtype, data.device, data.dtype)
        averages, models = groups.setdefault(key, ([[] for _ in range(count)], []))
        for k in range(count):
            averages[k].append(slot.stored[k])
        models.append(data)
    for (device, *_), (averages, models) in groups.items():
        plan.groups.append((averages, models, generators.get(str(device))))
    if copies[1]:
        plan.copies.append(merge_runs(copies[0][0], copies[1]))
        plan.copies += [merge_runs(stored, copies[0][0]) for stored in copies[0][1:]]


def _pointers(tensors: list[Tensor]) -> list[int]:
    """Where each tensor's data lives now (a sharded one's: its local data's)."""
    return [engine_of(t).local(t).data_ptr() for t in tensors]


def _snapshot(plan: Plan, modules: list[nn.Module]) -> None:
    """Record what :meth:`Plan.unchanged` compares."""
    plan.modules = modules
    for m in modules:
        plan.dicts += (m._parameters, m._buffers, m._modules)
        plan.sets.append(m._non_persistent_buffers_set)
    for d in plan.dicts:
        plan.owners += [d] * len(d)
        plan.keys += list(d)
        plan.objects += list(d.values())
    plan.count = len(plan.keys) + sum(map(len, plan.sets))
    plan.persistence = list(map(frozenset, plan.sets))
    plan.tensors = [t for t in plan.objects if isinstance(t, Tensor)]
    plan.signatures = list(map(_signature, plan.tensors))
    plan.pointers = _pointers(plan.tensors)
