"""What every front end shares: the step counter, the one update, evaluation and export, and the declared state.

A front end (``EMA``, ``SWA``, ``MultiEMA``, ``BEMA``, ``PostHocEMA``) says, for optimizer step ``t`` since
averaging began, the weights of its K averages (:meth:`FrontEnd._weights`), and how its averages become a model's
weights (:meth:`FrontEnd._mix`). Everything else is written here once: the update through the shadow's one
path, lazy allocation, the swap guard, ``swapped`` / ``copy_to`` / ``averaged_model``, and saving, checking and
loading the state that the front end declares (:class:`~polyak.state.Spec`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .checks import check_int
from .kernels import Mix
from .options import Options
from .shadow import Shadow
from .state import Spec, checked_counters

__all__ = ["FrontEnd", "check_schedule", "eager_when_compiled"]

_F = TypeVar("_F", bound=Callable[..., Any])
_MISSING = object()


def eager_when_compiled(update: _F) -> _F:
    """Run ``update`` eagerly when dynamo traces it (one graph break), so a compiled step does not recompile.

    Traced, an update's Python counters would be guarded on and recompiled for at every step until dynamo's
    limit. Outside tracing the check costs ~0.15 us (``torch.compiler.disable`` alone: ~1.5 us per call).
    """
    eager = torch.compiler.disable(update)

    @functools.wraps(update)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            return eager(*args, **kwargs)
        return update(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_schedule(model: Any, update_every: Any, start_name: str, start: Any) -> tuple[int, int]:
    """``update_every`` (an int >= 1) and the start (an int >= 0), checked; ``model`` must be a module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    every = check_int("update_every", update_every, low=1, hint="give the optimizer steps between updates, e.g. 1")
    return every, check_int(start_name, start, low=0, hint="give the optimizer steps before averaging begins, e.g. 0")


class FrontEnd:
    """Base of the front ends: counts optimizer steps and folds the model into its averages when due.

    A subclass sets ``SPEC``, calls :meth:`_init_averages` from its constructor, and defines :meth:`_weights` and
    :meth:`_config` (the settings a saved state must match).
    """

    SPEC: ClassVar[Spec]
    model: nn.Module
    options: Options
    update_every: int
    count: int
    step: int
    num_updates: int
    last_update_step: int
    _swapped: bool = False
    _warned_early = False

    def _init_averages(
        self, model: nn.Module, options: Options, count: int, *, target: nn.Module | None = None
    ) -> None:
        """Set up the counters and the storage of ``count`` averages (allocated now, or at the first update)."""
        self.model, self.options, self.count, self._target = model, options, count, target
        self._begin = int(getattr(self, self.SPEC.start))  # optimizer steps before averaging begins
        self.step = self.num_updates = self.last_update_step = 0
        self._skipped: int | Tensor = 0
        self._shadow: Shadow | None = None if options.lazy else self._new_shadow(model, copy=True)

    def _new_shadow(self, module: nn.Module, copy: bool) -> Shadow:
        return Shadow(module, self.options, count=self.count, target=self._target, copy=copy)

    @property
    def shadow(self) -> Shadow:
        """The averaged tensors (see :class:`~polyak.shadow.Shadow`)."""
        if self._shadow is None:
            raise RuntimeError(
                f"no average yet: lazy=True allocates it at the first update after {self.SPEC.start}="
                f"{self._start()} (now at step {self.step}); check `averager.num_updates > 0` first"
            )
        return self._shadow

    def _start(self) -> int:
        return self._begin

    # ------------------------------------------------------------------ what a subclass says

    def _weights(self, t: int) -> tuple[Sequence[float | Tensor], bool] | None:
        """The weights of the K averages at optimizer step ``t`` since averaging began (``t`` <= 0 before), and
        whether this counts as an update; None when nothing happens at this step."""
        raise NotImplementedError

    def _after_update(self, module: nn.Module, t: int) -> None:
        """Called after each counted update (Switch EMA, snapshots)."""

    def _mix(self, index: int) -> tuple[Mix, Mix | None]:
        """How average ``index`` becomes a model's weights: the mix of its parameters and of its buffers."""
        return Mix.copy(index, self.count), None

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the update

    def _model(self, model: nn.Module | None) -> nn.Module:
        return self.model if model is None else model

    def _check_not_swapped(self, action: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"cannot {action} while the averaged weights are swapped into the model; "
                "leave the `with ....swapped(model):` block first"
            )

    @eager_when_compiled  # inside a compiled step: one graph break, no recompile per step
    def update(self, model: nn.Module | None = None) -> None:
        """Count one optimizer step; when due, fold the model into the averages (one read of it)."""
        if self._swapped:
            self._check_not_swapped("update")
        module = self.model if model is None else model
        t = self.step + 1 - self._begin
        planned = self._weights(t)
        if planned is not None:
            weights, counts = planned
            fresh = self._shadow is None
            if fresh:
                self._shadow = self._new_shadow(module, copy=False)
            try:
                applied = self._shadow.update(module, weights)  # type: ignore[union-attr]  # allocated above
            except BaseException:
                if fresh:  # a refused first update (nonfinite="raise") leaves a lazy averager as it was
                    self._shadow = None
                raise
            if counts:
                if applied is not None:
                    self._skipped = self._skipped + ~applied
                self.last_update_step = t
                self.num_updates += 1
                try:
                    self._after_update(module, t)
                finally:  # a snapshot refused or failed (a folder of another run, a full disk): the update counts
                    self.step += 1
                return
        self.step += 1  # counted once the update went through (a refused one, nonfinite="raise", is no step)

    @property
    def skipped_updates(self) -> int:
        """Updates left out for inf or NaN in the model (``nonfinite="skip"``); reading it syncs with the device."""
        return int(self._skipped)

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> RemovableHandle:
        """Call :meth:`update` after every ``optimizer.step()``; returns the hook handle.

        Steps that do not run (e.g. skipped by ``GradScaler`` for inf/NaN gradients) are not counted.
        """
        return optimizer.register_step_post_hook(lambda *_: self.update(model))

    def check(self, model: nn.Module | None = None) -> None:
        """Look at the model again now: follow a change the average can follow, refuse (``ValueError``) one it
        cannot. Needed only with ``watch=False``; otherwise changes are noticed by themselves."""
        if self._shadow is not None:
            self._shadow.check(self._model(model))

    # ------------------------------------------------------------------ into a model

    def _ready(self, action: str) -> Shadow | None:
        """The shadow to read, after refusing an open swap; before the first update, warn once and give the
        model as built (None: a lazy average holds nothing yet, so the model as it is)."""
        self._check_not_swapped(action)
        if self.num_updates == 0 and not self._warned_early:
            self._warned_early = True
            warnings.warn(
                f"{type(self).__name__} has no update yet (step {self.step}): {action} gives the model as built, "
                "not an average",
                UserWarning,
                stacklevel=3,
            )
        return self._shadow

    @contextmanager
    def swapped(self, model: nn.Module | None = None, index: int = 0) -> Iterator[nn.Module]:
        """Within the block the model holds the average (number ``index``); its own weights come back exactly on
        exit, even on error. Before the first update it holds the model as built (one warning)."""
        shadow = self._ready("swap")
        module = self._model(model)
        if shadow is None:
            yield module
            return
        mix, buffers = self._mix(index) if self.num_updates else (Mix.copy(0, self.count), None)
        self._swapped = True
        try:
            with shadow.swapped(module, mix, buffers=buffers) as swapped_model:
                yield swapped_model
        finally:
            self._swapped = False

    def copy_to(self, model: nn.Module | None = None, index: int = 0) -> None:
        """Write the average (number ``index``) into the model, permanently."""
        shadow = self._ready("copy the average")
        if shadow is not None:
            mix, buffers = self._mix(index) if self.num_updates else (Mix.copy(0, self.count), None)
            shadow.write(self._model(model), mix, buffers=buffers)

    def averaged_model(self, index: int = 0, *, dtype: torch.dtype | None = None) -> nn.Module:
        """A new module holding the average (number ``index``), for evaluation or export: a deep copy of the model
        in eval mode whose parameters do not require grad, in the model's dtype unless ``dtype`` says otherwise
        (floating tensors only). Before the first update, the model as built (one warning)."""
        shadow = self._ready("build the averaged model")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        if shadow is None:
            shadow = self._new_shadow(self.model, copy=True)
        mix, buffers = self._mix(index) if self.num_updates else (Mix.copy(0, self.count), None)
        duplicate = shadow.clone_module(self.model, mix, buffers=buffers, dtype=dtype)
        duplicate.eval()
        duplicate.requires_grad_(False)
        return duplicate

    # ------------------------------------------------------------------ the declared state, written once

    def _averages(self) -> list[dict[str, Tensor] | None]:
        shadow = self._shadow
        return [None if shadow is None else shadow.state_dict(k) for k in range(self.count)]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: settings (checked on load), counters, the averages, their random
        streams. Allowed inside ``swapped()``: a swap leaves the averages themselves untouched."""
        shadow = self._shadow
        if shadow is not None:
            shadow.check(self.model)  # a model changed since the last update: refused here too
        counters = {"step": self.step, "num_updates": self.num_updates, "last_update_step": self.last_update_step}
        state = {"format": self.SPEC.format, **self._config(), **counters, "skipped_updates": self.skipped_updates}
        state |= self.SPEC.layout.pack(self._averages())
        if shadow is not None:
            if shadow.options.rounding != "nearest":
                state["rounding_state"] = shadow.streams.state()
            if not shadow.started:
                state["started"] = False
            shard = shadow.identity()
            if shard is not None:
                state["shard"] = shard
        return state | self._extra_state()

    def _extra_state(self) -> dict[str, Any]:
        """Entries a front end adds to its state (checked by :meth:`_check_extra`)."""
        return {}

    def _check_extra(self, state: dict[str, Any]) -> Callable[[], None]:
        """Check a front end's own entries of ``state``; return what applies them (after everything is checked)."""
        return lambda: None

    def _upgrade(self, state: Any) -> Any:
        """A state of an older format, in the current one (default: as it is)."""
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; raises before changing anything if it does not fit."""
        self._check_not_swapped("load a state")
        spec, what = self.SPEC, self.SPEC.what
        state = self._upgrade(state)
        if not isinstance(state, dict) or state.get("format") != spec.format:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a polyak {what} state (format {found!r}, expected {spec.format!r})")
        for key, value in self._config().items():
            saved = state.get(key, spec.defaults.get(key, _MISSING))
            if saved != value:
                shown = "nothing" if saved is _MISSING else f"{key}={saved!r}"
                raise ValueError(
                    f"saved {what} has {shown} but this one has {key}={value!r}; build the {what} with the same "
                    "settings before loading"
                )
        counters = checked_counters(state, what, spec.start, self._start(), self.update_every)
        averages = spec.layout.unpack(state, self.count, what)
        apply_extra = self._check_extra(state)
        if any(a is None for a in averages):
            if any(a is not None for a in averages) or counters["num_updates"]:
                raise ValueError(
                    f"saved {what} has num_updates={counters['num_updates']} but no average; it is damaged"
                )
            shadow = None if self.options.lazy else self._shadow
        else:
            shadow = self._shadow if self._shadow is not None else self._new_shadow(self.model, copy=False)
            shadow.check(self.model)  # paired with the model (new lazy storage is not yet): its part is known
            _check_shard(state.get("shard"), shadow.identity(), what)  # first: another rank's shapes may differ
            for saved in averages:
                shadow.check_state_dict(saved)
        if shadow is not None and shadow.options.rounding != "nearest":
            shadow.streams.load(state.get("rounding_state"))  # checked there: all or nothing
        if shadow is not None and averages[0] is not None:
            for k, saved in enumerate(averages):
                shadow.load_state_dict(saved, k)  # type: ignore[arg-type]  # checked above
            shadow.started = state.get("started", True) is not False
        self._shadow = shadow
        for key in ("step", "num_updates", "last_update_step"):
            setattr(self, key, counters[key])
        self._skipped = counters["skipped_updates"]
        apply_extra()


def _check_shard(saved: Any, mine: dict[str, Any] | None, what: str) -> None:
    """Refuse a partitioned state saved by another rank or world size: it would load another rank's elements.
    (A state without the entry is a full one, or older than it: its tensors' shapes are checked.)"""
    if saved is not None and saved != mine:
        held = f"this rank holds {mine!r}" if mine is not None else f"this {what}'s model is not sharded"
        raise ValueError(
            f"saved {what} holds the part {saved!r} of a sharded model, but {held}; load the "
            "state this rank saved (one file per rank, same world size), or export the full average with "
            "polyak.distributed.full_state_dict and build the averager from an unsharded model"
        )
