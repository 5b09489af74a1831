"""The shadow: storage of K averages of one model's tensors, paired by name, and the one update path.

A :class:`Shadow` selects which tensors of a module take part (:class:`~polyak.options.Options`), stores K
averaged copies of each (never below float32 unless asked), and runs every change to them through
:meth:`Shadow.update`: the plan (:mod:`polyak.plan`) pairs the model's tensors with the stored ones, the options'
hooks decide what happens with inf or NaN, and the kernels (:mod:`polyak.kernels`) read each model tensor once
and write all K averages, ``average_k <- average_k + w_k (model - average_k)``. A copy is the weight 1.0, a kept
average the weight 0.0. Writing averages back into a model (copy, swap, blend, extrapolation) is
:meth:`Shadow.write` with a :class:`~polyak.kernels.Mix`. It knows nothing about which rule made the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .allocation import allocate, fits, in_target
from .kernels import Mix, all_finite, copy_all, mix_into
from .module_tensors import Found, copy_module, shared_memory, walk
from .options import NONFINITE, NonFinite, Options, Policy
from .plan import Plan, Slot, build, group
from .storage import engine_of, release
from .storage.zero3 import is_partitioned
from .streams import Streams
from .swap import OPEN, refuse_swapped, swap_marked
from .watch import Watcher

__all__ = ["Shadow"]

Weights = float | Tensor | Sequence[float | Tensor]


class Shadow:
    """K averaged copies of a module's tensors, paired by qualified name.

    Args:
        module: the model; wrappers (DDP, DataParallel, ``torch.compile``) are looked through. Of a sharded
            (FSDP2, ZeRO-3) tensor only this rank's share is stored.
        options: how the averages are kept (:class:`~polyak.options.Options`); or give its fields as keywords
            (``buffers=``, ``frozen=``, ``dtype=``, ...).
        count: how many averages (K), updated together by :meth:`update`.
        target: store the average in this module's own tensors where they have the storage dtype and device
            (a live target network), else keep it apart and copy it into ``target`` after every update.
        copy: start every average as the model's values (default); False leaves them as allocated (or, with
            ``target``, as the target holds them).
        adopt: store nothing of its own: ``module``'s tensors are the storage (``target=module, copy=False``).
    """

    def __init__(
        self,
        module: nn.Module,
        options: Options | None = None,
        *,
        count: int = 1,
        target: nn.Module | None = None,
        copy: bool = True,
        adopt: bool = False,
        **fields: Any,
    ) -> None:
        if options is not None and fields:
            raise TypeError(f"give Shadow either options or their fields as keywords, not both ({sorted(fields)})")
        self.options = options if options is not None else Options(**fields)
        if adopt:
            if self.options.dtype is not None or self.options.device is not None:
                raise ValueError("Shadow(adopt=True) stores the module's own tensors: leave dtype and device as None")
            target, copy = module, False
        self._adopting = adopt  # the module's own tensors, whatever their dtype (swa_utils' AveragedModel)
        self.count = count
        release(module)  # FSDP2 keeps some parameters gathered after an evaluation forward
        aliases: dict[str, str] = {}
        found, _ = walk(module, aliases)
        self.options.check_model(found)
        chosen = [(f, mode) for f in found if (mode := self.options.mode(f)) != "skip"]
        self.target = target
        adopted = target is not None and self._fits(chosen, target)
        self._slots = in_target(chosen, target) if adopted else allocate(chosen, self.options, self.count)  # type: ignore[arg-type]
        self.mirror = None if adopted else target  # a live target kept apart: written after every update
        # A live target's changes are followed: an adopted one is bound again (``.to()``), a mirror paired again.
        self._target_watcher = Watcher() if target is not None and self.options.watch else None
        if adopted and self._target_watcher is not None:
            self._target_watcher.watch(*_contents(target))  # type: ignore[arg-type]  # adopted: a target
        self._by_name = {slot.name: slot for slot in self._slots}
        # other names of tied tensors (e.g. lm_head.weight for embed.weight), so exports load with strict=True
        self.aliases = {alias: name for alias, name in aliases.items() if name in self._by_name}
        self._watcher = Watcher() if self.options.watch else None
        self._plan: Plan | None = None
        self._mirror_plan: Plan | None = None
        self.rechecks = 0  # times the model was examined again after an event (0 while only other models change)
        averaged = {str(s.stored[0].device) for s in self._slots if s.mode == "average"}
        self.streams = Streams(averaged if self.options.rounding == "stochastic" else ())
        self.started = adopted  # an average holds values once it copied the model (or adopted a target's)
        if copy:
            self.update(module, (1.0,) * count)

    # ------------------------------------------------------------------ selection and storage

    def _fits(self, chosen: Sequence[tuple[Found, Policy]], target: nn.Module) -> bool:
        return self._adopting or fits(chosen, target, self.options, self.count)

    def _rebind(self) -> None:
        """The adopted target was converted or its tensors replaced (``.to()``, ``.half()``): store the average in
        its new tensors, which hold it, or apart from them (copied from them) where they no longer have the
        storage dtype, e.g. a target turned to float16; the target is then written after every update."""
        target = self.target
        assert target is not None
        theirs = {f.name: f for f in walk(target)[0]}
        lost = next((slot.name for slot in self._slots if slot.name not in theirs), None)
        if lost is not None:
            raise ValueError(f"the live target lost its tensor {lost!r}; build a new averager for the changed target")
        chosen = [(theirs[slot.name], slot.mode) for slot in self._slots]
        if self._fits(chosen, target):
            self._slots = in_target(chosen, target)
            self._target_watcher.watch(*_contents(target))  # type: ignore[union-attr]  # watched: adopted
        else:
            self._slots = allocate(chosen, self.options, self.count)
            copy_all(
                [s.stored[0] for s in self._slots], [engine_of(f.tensor).local(f.tensor.detach()) for f, _ in chosen]
            )
            self.mirror = target  # its watcher now serves the mirror's plan
        self._by_name = {slot.name: slot for slot in self._slots}
        self._plan = self._mirror_plan = None

    # ------------------------------------------------------------------ pairing with a module

    def _kernels(self, plan: Plan, slots: Sequence[Slot]) -> None:
        group(plan, slots, self.streams)

    def _plan_for(self, module: nn.Module) -> Plan:
        """The cached pairing with ``module``; re-checked after an event (see :mod:`polyak.plan`)."""
        plan = self._plan
        if plan is not None and not OPEN[0] and plan.current(module):
            return plan
        refuse_swapped(module)
        return self.check(module)

    def check(self, module: nn.Module) -> Plan:
        """Pair with ``module`` again if it may have changed; raise ``ValueError`` naming a change that the
        average cannot follow (see :func:`polyak.plan.build`). With ``watch=False``, call it after changing the
        model. Cheap when nothing changed."""
        plan = self._plan
        if plan is not None and plan.root is module:
            if plan.current(module) and self._watcher is not None:  # unwatched: a call here is the only news
                return plan
            self.rechecks += 1
            if plan.sharded:  # FSDP2 / ZeRO-3 may hold gathered parameters after a forward without backward
                release(module)
            if plan.unchanged():
                plan.watch()
                if plan.current(module):
                    return plan
        elif plan is not None:
            self.rechecks += 1
        plan, aliases = build(module, self._slots, self.aliases, self.options, self._kernels, self._watcher)
        self._plan = None  # refused below: paired again at the next call
        self._keep_apart(module)
        self._plan, self.aliases = plan, aliases
        return plan

    def _keep_apart(self, module: nn.Module) -> None:
        """Raise ``ValueError`` naming the tensors when the model shares memory with the averages or the live
        target (a tensor moved, tied or loaded with ``assign=True`` between them): an update would then stop
        averaging, or write the average over the model."""
        ours = [(f"the average's {slot.name!r}", t) for slot in self._slots for t in slot.stored]
        ours += [(f"the live target's {f.name!r}", f.tensor) for f in walk(self.target)[0]] if self.target else []
        shared = shared_memory(((f.name, f.tensor) for f in walk(module)[0]), ours)
        if shared is not None:
            raise ValueError(
                f"model tensor {shared[0]!r} shares its memory with {shared[1]} (moved, tied or loaded with "
                "assign=True between them); an update would stop averaging or overwrite the model. Give each its "
                "own tensors (copy.deepcopy, .clone()), or build a new averager"
            )

    # ------------------------------------------------------------------ the update

    def update(self, module: nn.Module, weights: Weights, *, nonfinite: NonFinite | None = None) -> Tensor | None:
        """``average_k <- average_k + weights[k] * (model - average_k)`` for averaged tensors; copy the copied ones.

        ``weights``: one per average, each a Python float in [0, 1] (1.0 copies, 0.0 leaves that average as it
        is) or a 0-d tensor on the average's device (no host sync either way); a single number for one average.
        Every tensor the kernels touch is detached: no autograd graph, inside or outside ``torch.no_grad()``.
        ``nonfinite`` (default: the options') says what happens when an averaged model tensor holds inf or NaN:

        - ``"propagate"``: nothing is checked; the non-finite values enter the averages.
        - ``"skip"``: the averages keep their values bit for bit (copied tensors are still copied), decided on
          the device; returns the 0-d bool flag, True when applied (None when nothing is averaged). An average
          not yet holding a finite copy of the model (a skipped first update, a lazy start) copies at the next
          finite update instead: it syncs once per update until then.
        - ``"raise"``: ``RuntimeError`` naming the first non-finite tensor, before anything changes (syncs).
        """
        if self.mirror is None and self._target_watcher is not None and self._target_watcher.dirty:
            self._rebind()
        plan = self._plan
        if plan is None or OPEN[0] or not plan.current(module):  # first call, an event, a swap open
            plan = self._plan_for(module)
        mirror = self._mirror() if self.mirror is not None else None  # paired before anything changes
        mode = self.options.nonfinite if nonfinite is None else nonfinite
        if type(weights) is not tuple or len(weights) != self.count:  # a front end's tuple is taken as it is
            weights = self._weights(weights)
        if mode == "propagate" and self.started:  # the common case, in as few steps as possible
            for fold in plan.kernels(False):
                fold.run(weights)
            plan.copy()
            if self.mirror is not None:
                self.write(self.mirror, Mix.copy(0, 1), plan=self._mirror())
            return None
        if mode not in NONFINITE:
            raise ValueError(f"nonfinite: expected one of {', '.join(map(repr, NONFINITE))}, got {nonfinite!r}")
        keep = None if mode == "propagate" else plan.finite()
        if mode == "raise":
            if keep is not None and not bool(keep):
                self._raise_nonfinite(plan)
            keep = None
        if not self.started:  # a lazy start, or a guarded average whose first copies were all skipped
            weights = (1.0,) * self.count
        for fold in plan.kernels(keep is not None):
            fold.run(weights, keep)
        plan.copy()
        if mirror is not None:
            self.write(self.mirror, Mix.copy(0, 1), plan=mirror)  # type: ignore[arg-type]  # a mirror is set
        if not self.started:
            self.started = keep is None or bool(keep)  # a guarded average syncs here until it holds a finite copy
        return keep

    def _weights(self, weights: Weights) -> tuple[float | Tensor, ...]:
        given = (weights,) if isinstance(weights, (float, int, Tensor)) else tuple(weights)
        if len(given) != self.count:
            raise ValueError(f"expected {self.count} weight(s), one per average, got {len(given)}")
        return tuple(w if isinstance(w, Tensor) else float(w) for w in given)

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
    def apply(self, module: nn.Module, function: Callable[[list[Tensor], list[Tensor]], Any]) -> None:
        """Run a caller's own update, ``function(averages, models)`` in place on each group of averaged tensors (one
        call per device and dtype; model tensors of another dtype or device come as converted copies), instead of
        polyak's kernels; copied tensors are copied. For :class:`~polyak.swa_utils.AveragedModel`'s ``avg_fn``."""
        plan = self._plan_for(module)
        for averages, models, _ in plan.groups:
            stored = averages[0]
            converted = [m.to(s.device, s.dtype) for s, m in zip(stored, models, strict=True)]
            function(stored, converted)
        plan.copy()

    # ------------------------------------------------------------------ into a module

    def _mirror(self) -> Plan:
        """The pairing with the live target kept apart, made again after it changed (and checked against the
        model's tensors then)."""
        plan = self._mirror_plan
        if plan is None or not plan.current(self.mirror):  # type: ignore[arg-type]  # a mirror is set
            watcher, self._mirror_plan = self._target_watcher, None  # refused below: paired again at the next call
            plan, _ = build(self.mirror, self._slots, self.aliases, self.options, _no_kernels, watcher, follow=False)  # type: ignore[arg-type]
            if self._plan is not None:
                self._keep_apart(self._plan.root)
            self._mirror_plan = plan
        return plan

    @torch.no_grad()
    def write(self, module: nn.Module, mix: Mix, *, buffers: Mix | None = None, plan: Plan | None = None) -> None:
        """Write ``mix`` of ``module`` and the averages into ``module``, in place: averaged parameters get ``mix``,
        averaged buffers ``buffers`` (default ``mix``), and copied tensors (integer buffers, frozen parameters) the
        first average's copy, unless the buffers' mix keeps a share of the model (a blend leaves them as they are)."""
        plan = plan if plan is not None else self._plan_for(module)
        release(module)  # a gathered ZeRO-3 / FSDP2 parameter would hide the shard written below
        parameters = {f.name for f in walk(module)[0] if f.is_param}
        chosen: dict[bool, list[tuple[Slot, Tensor]]] = {True: [], False: []}
        copies: list[tuple[Slot, Tensor]] = []
        for slot, data in zip(self._slots, plan.data, strict=True):
            if slot.mode == "copy":
                copies.append((slot, data))
            else:
                chosen[slot.name in parameters or buffers is None].append((slot, data))
        for pairs, m in ((chosen[True], mix), (chosen[False], buffers)):
            if pairs and m is not None:
                averages = [[slot.stored[k] for slot, _ in pairs] for k in range(self.count)]
                mix_into([data for _, data in pairs], averages, m)
        if (buffers if buffers is not None else mix).model == 0.0:  # copied tensors follow the buffers
            copy_all([data for _, data in copies], [slot.stored[0] for slot, _ in copies])
        release(module)

    def copy_to(self, module: nn.Module, index: int = 0) -> None:
        """Write average number ``index`` into ``module`` in place (cast to the model's dtype)."""
        self.write(module, Mix.copy(index, self.count))

    @contextmanager
    def swapped(self, module: nn.Module, mix: Mix | int = 0, *, buffers: Mix | None = None) -> Iterator[nn.Module]:
        """Within the block, ``module`` holds average number ``mix`` (or a :class:`~polyak.kernels.Mix`); its own
        tensors are restored on exit, even on error.

        The module's tensors are backed up (one copy in the model's dtype) and written back in place, so compiled
        graphs and optimizers that hold the parameter objects keep working. While swapped, the module refuses a
        second swap and updates or copies from any shadow (``RuntimeError``), and its ``state_dict()`` warns and
        is marked (see :mod:`polyak.swap`). Sharded (FSDP2) parameters swap their local shards.
        """
        if isinstance(mix, int):
            mix = Mix.copy(mix, self.count)
        plan = self._plan_for(module)
        release(module)  # a gathered ZeRO-3 parameter would hide the partition written below
        live = list(plan.data)
        with torch.no_grad():
            backup = [t.clone() for t in live]
        try:
            with swap_marked(module):
                self.write(module, mix, buffers=buffers, plan=plan)
                yield module
        finally:
            release(module)  # else FSDP2 would keep evaluating/training with the averaged weights
            with torch.no_grad():
                copy_all(live, backup)

    def clone_module(
        self, module: nn.Module, mix: Mix | int = 0, *, buffers: Mix | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """A deep copy of ``module`` (unwrapped) holding average number ``mix`` (or a mix, computed from the model),
        its floating tensors cast to ``dtype`` if given (complex ones keep their imaginary part)."""
        sharded = [slot.name for slot in self._slots if slot.engine != "plain"]
        sharded += [f.name for f in walk(module)[0] if is_partitioned(f.tensor)]
        if sharded:
            raise RuntimeError(
                f"cannot build an averaged model: the average is sharded across ranks ({sharded[0]!r} is a "
                "DTensor or a ZeRO-3 partition) and a sharded (FSDP2, ZeRO-3) model cannot be deep-copied. Use "
                "swapped(model) to evaluate with the averaged weights, or polyak.distributed.full_state_dict("
                "averager.state_dict()['shadow'], model=model) to gather them on rank 0 for an unsharded model."
            )
        duplicate = copy_module(module)
        if dtype is not None:
            wanted = {True: dtype.to_complex(), False: dtype}
            duplicate._apply(lambda t: t.to(wanted[t.is_complex()]) if t.is_floating_point() or t.is_complex() else t)
        plan, _ = build(duplicate, self._slots, self.aliases, self.options, _no_kernels, None, follow=False)
        self.write(duplicate, Mix.copy(mix, self.count) if isinstance(mix, int) else mix, buffers=buffers, plan=plan)
        return duplicate

    # ------------------------------------------------------------------ inspection and state

    @property
    def names(self) -> list[str]:
        """Qualified names of the stored tensors, in storage order."""
        return [slot.name for slot in self._slots]

    def tensors(self, index: int = 0) -> dict[str, Tensor]:
        """Average number ``index`` by qualified name (references, not copies; DTensors where the model has them)."""
        return {slot.name: slot.values[index] for slot in self._slots}

    def modes(self) -> dict[str, Policy]:
        """``"average"`` or ``"copy"`` for each stored tensor."""
        return {slot.name: slot.mode for slot in self._slots}

    def identity(self) -> dict[str, Any] | None:
        """Which part of the whole this rank's stored tensors are, where the tensors do not say it themselves
        (ZeRO-3 partitions: rank and world size); None for an unsharded model or DTensors."""
        plan = self._plan
        for tensor in plan.live if plan is not None else ():
            identity = engine_of(tensor).identity(tensor)
            if identity is not None:
                return identity
        return None

    def state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """Average number ``index`` by name (references into the storage), tied names included: a tied tensor
        appears under each of its names (one tensor object, saved once by ``torch.save``), so the state loads
        into the model with ``strict=True``; loading reads it from its first name."""
        tensors = self.tensors(index)
        return tensors | {alias: tensors[name] for alias, name in self.aliases.items()}

    def check_state_dict(self, state: Any) -> None:
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
            if value.shape != slot.values[0].shape or value.dtype != slot.stored[0].dtype:
                raise ValueError(
                    f"saved tensor {name!r} has shape {tuple(value.shape)} and dtype {value.dtype}; this average "
                    f"holds shape {tuple(slot.values[0].shape)} and dtype {slot.stored[0].dtype}"
                )
            engine_of(slot.values[0]).check_saved(name, value, slot.values[0])

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], index: int = 0) -> None:
        """Copy a saved average into average number ``index`` in place, after checking all of it."""
        self.check_state_dict(state)
        for name, slot in self._by_name.items():
            value, held = state[name], slot.values[index]
            if held is not slot.stored[index]:  # a sharded average: a full tensor gives this rank's part
                plan = self._plan
                tensor = plan.live[self._slots.index(slot)] if plan is not None else held
                value = engine_of(held).scatter(value, held, tensor)
            held.copy_(value)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy`` of an averager) leaves the cached pairings and the watchers behind: its
        plans would hold views of the original model's tensors. It pairs and watches anew on first use."""
        return self.__dict__ | {"_plan": None, "_mirror_plan": None, "_watcher": None, "_target_watcher": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.options.watch:
            self._watcher = Watcher()
            if self.target is not None:
                self._target_watcher = Watcher()
                if self.mirror is None:  # adopted: follow the target's conversions
                    self._target_watcher.watch(*_contents(self.target))

    def close(self) -> None:
        """Stop watching the model for changes (also done when the shadow is garbage-collected)."""
        if self._watcher is not None:
            self._watcher.close()


def _contents(module: nn.Module) -> tuple[list[nn.Module], list[Tensor]]:
    """A module's submodules and tensors, for a watcher."""
    found, modules = walk(module)
    return modules, [f.tensor for f in found]


def _no_kernels(plan: Plan, slots: Sequence[Slot]) -> None:
    """A plan that only writes into a module (a copy, a live target) needs no update kernels."""
