"""Front ends: EMA and SWA, each a rule plus a shadow plus a step counter."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_flag
from .durations import to_steps
from .front_end import FrontEnd, check_schedule, eager_when_compiled
from .io import CheckpointError, load_torch
from .live import Target, adopt, first_tensor, make_target
from .rules import ConstantDecay, EqualWeights, HalfLife, Rule
from .shadow import _NONFINITE, NonFinite, Policy, Rounding, Shadow, write_blended

__all__ = ["EMA", "SWA", "Averager", "load_state"]

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
        nonfinite: what an update does when an averaged model tensor holds inf or NaN: ``"propagate"``
            (default, no check: the average turns non-finite too, visibly), ``"skip"`` (the average keeps
            its values, :attr:`skipped_updates` counts it; decided on the device, no host sync) or
            ``"raise"`` (``RuntimeError`` naming the tensor before anything changes; syncs with the device).
            A skipped update still counts as a step in time; a refused one (``"raise"``) does not count at
            all. Steps that ``GradScaler`` skips never reach an attached averager, so they are no steps.
        buffers: which buffers take part; this and ``frozen``, ``exclude``, ``include_nonpersistent``,
            ``dtype``, ``device`` and ``rounding`` (what is averaged and how it is stored) are
            :class:`~polyak.shadow.Shadow`'s options. By default the average is float32 or wider;
            ``dtype=torch.bfloat16, rounding="stochastic"`` halves that memory without stalling the average.
        target: ``"copy"`` or a module of the model's structure: the average is then a live module,
            ``averager.target``, updated in place (a target network, a teacher); it starts as the model and every
            update blends into it (the first with weight ``1 - decay``). Default: the average is kept apart.
        lazy: allocate nothing for the average before the first update after ``start_step``.
        switch_every: every this many optimizer steps, move the model to the average (Switch EMA,
            arXiv:2402.09240); a multiple of ``update_every``.
        switch_blend: how far the model moves then: ``model + switch_blend * (average - model)``, in (0, 1].
        compensate: with ``update_every=k``, give each update the weight of all k steps (``1 - d**k`` for a
            constant decay; default) so that the horizon in optimizer steps stays the same; ``False`` applies
            the plain per-step weight (``1 - d``, the rule at the current step) once every k steps, as
            ema-pytorch, Lightning's ``EMAWeightAveraging`` and Stable-Baselines3 do. Refused for
            :class:`SWA`, whose equal weights are exact only when compensated.
    """

    _FORMAT = _AVERAGER_FORMAT
    _WHAT = "averager"
    _COUNTERS = (*FrontEnd._COUNTERS, "skipped_updates")

    def __init__(
        self,
        model: nn.Module,
        rule: Rule,
        *,
        update_every: int = 1,
        start_step: int = 0,
        nonfinite: NonFinite = "propagate",
        buffers: Policy = "average",
        frozen: Policy = "copy",
        exclude: Iterable[str] = (),
        include_nonpersistent: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        rounding: Rounding = "nearest",
        target: Target | None = None,
        lazy: bool = False,
        switch_every: int | None = None,
        switch_blend: float = 1.0,
        compensate: bool = True,
    ) -> None:
        check_schedule(model, update_every, "start_step", start_step)
        self.compensate = check_flag("compensate", compensate)
        if not compensate and isinstance(rule, EqualWeights):
            raise ValueError(
                "compensate=False weighs every update by the rule at its step (1/t for equal weights), which is not "
                "an equal average of the updates; SWA is exact for any update_every: leave compensate=True"
            )
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a polyak.rules.Rule, got {type(rule).__name__}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        check_flag("include_nonpersistent", include_nonpersistent)
        self.model = model
        self.rule = rule
        self.update_every = update_every
        self.start_step = start_step
        self.nonfinite: NonFinite = nonfinite
        options: dict[str, Any] = dict(
            buffers=buffers,
            frozen=frozen,
            exclude=tuple(exclude),
            include_nonpersistent=include_nonpersistent,
            rounding=rounding,
        )
        self._init_live(model, options, dtype, device, target, lazy, switch_every, switch_blend)
        self.step = 0  # optimizer steps seen (calls to update)
        self.num_updates = 0  # updates folded into the average
        self.last_update_step = 0  # averaging time (step - start_step) of the last update
        self._skipped: int | Tensor = 0  # updates skipped for non-finite values (a device tensor once counted)
        self._swapped = False

    # ------------------------------------------------------------------ updating

    @eager_when_compiled  # inside a compiled step: one graph break, no recompile per step
    def update(self, model: nn.Module | None = None) -> None:
        """Count one optimizer step; on every ``update_every``-th step, fold ``model`` into the average."""
        self._check_not_swapped("update")
        module = self._model(model)
        weight = self._begin_update(module)
        if weight is not None:
            self._end_update(module, self.shadow.update(module, weight, nonfinite=self.nonfinite))
        self.step += 1

    @property
    def skipped_updates(self) -> int:
        """Updates left out for non-finite values (``nonfinite="skip"``); reading it syncs with the device."""
        return int(self._skipped)

    # ------------------------------------------------------------------ using the average

    def _check_ready(self, action: str) -> None:
        self._check_not_swapped(action)
        if self.num_updates == 0:
            raise RuntimeError(
                f"cannot {action} before the first update: the average holds no training step yet "
                f"(step={self.step}, start_step={self.start_step}, update_every={self.update_every}); "
                "check `averager.num_updates > 0` first"
            )

    @contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights; its own come back on exit, even on error.

        Refused (``RuntimeError``) before the first update and while the model is already swapped (by this or
        any other averager). Inside the block, ``model.state_dict()`` warns and is marked as holding the
        average: check a checkpoint with :func:`polyak.is_swapped_state_dict`.
        """
        self._check_ready("swap")
        self._swapped = True
        try:
            with self.shadow.swapped(self._model(model)) as swapped_model:
                yield swapped_model
        finally:
            self._swapped = False

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into the model, permanently."""
        self._check_ready("copy the average")
        self.shadow.copy_to(self._model(model))

    def averaged_model(self) -> nn.Module:
        """A new module (a deep copy of the model) holding the averaged weights, for evaluation or export."""
        self._check_ready("build the averaged model")
        return self.shadow.clone_module(self.model)

    # ------------------------------------------------------------------ checkpoints

    def _config(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "rule": self.rule.config(),
            "update_every": self.update_every,
            "start_step": self.start_step,
            "policy": self._policy(),
            "target": None if self.target is None else "module",  # states without the key load as None
        } | ({} if self.compensate else {"compensate": False})  # states without the key were compensated

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: counters, configuration (checked on load), tensors.

        Allowed inside ``swapped()``: a swap backs the model up and leaves the average itself untouched, so
        a checkpoint taken during evaluation holds the same average as one taken outside.
        """
        shadow = self._shadow
        if shadow is not None:
            shadow.check(self.model)  # a model changed since the last update: refused here too
        stochastic = shadow is not None and shadow.rounding != "nearest"
        rounding = {"rounding_state": shadow.rounding_state()} if stochastic else {}  # type: ignore[union-attr]
        return self._state(shadow=None if shadow is None else shadow.state_dict(), **rounding)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; raises before changing anything if it does not fit."""
        counters = self._checked_counters(state)
        # None: a lazy averager saved before its start; anything else must be a shadow's state
        saved = None if "shadow" in state and state["shadow"] is None else self._entry(state, "shadow", dict)
        shadow = self._shadow  # a stochastically rounding average: its random streams too, all or nothing
        streams = shadow.rounding_state() if shadow is not None and shadow.rounding != "nearest" else None
        if streams is not None:
            shadow.load_rounding_state(state.get("rounding_state"))  # type: ignore[union-attr]  # checked there
        try:
            self._load_shadow(saved, counters["num_updates"])
        except BaseException:
            if streams is not None:
                shadow.load_rounding_state(streams)  # type: ignore[union-attr]
            raise
        if streams is None and self._shadow is not None and self._shadow.rounding != "nearest":  # allocated now
            self._shadow.load_rounding_state(state.get("rounding_state"))
        self._set_counters(counters)
        self._skipped = counters["skipped_updates"]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rule={self.rule!r}, update_every={self.update_every}, "
            f"start_step={self.start_step}, step={self.step}, num_updates={self.num_updates}, "
            f"tensors={0 if self._shadow is None else len(self._shadow.names)})"
        )

    # ------------------------------------------------------------------ live target, lazy start, Switch EMA

    def _init_live(
        self,
        model: nn.Module,
        options: dict[str, Any],
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        target: Target | None,
        lazy: bool,
        switch_every: int | None,
        switch_blend: float,
    ) -> None:
        """Build the storage of the average.

        - ``target=None`` (default): the average lives in the shadow only; evaluate it with :meth:`swapped`.
        - ``target="copy"`` or ``target=module``: the average *is* a live module, ``target`` (a deep copy of
          the model, cast to ``dtype`` / moved to ``device`` if given, or the user's module of the same
          structure and dtypes). Its parameters hold the average after every update, never require grad, and
          its train/eval mode is its own. The target starts as the model's weights at the start of averaging
          (construction, or the step before ``start_step``) and every update blends into it, as the target
          networks of DQN/SAC/TD3 and the teachers of BYOL/DINO/Mean Teacher do: the first update's weight is
          ``1 - decay`` (``tau``), not a copy. Converting it later (``.to()``, ``.double()``) is followed; replacing
          its submodules is not.
        - ``lazy=True``: no memory for the average until the first update after ``start_step``.
        - ``switch_every=N`` (a multiple of ``update_every``): every N optimizer steps after the update, move the
          model to the average, ``model <- model + switch_blend * (average - model)`` (Switch EMA, Li et al.
          2024, arXiv:2402.09240: ``switch_blend=1`` copies). The optimizer's state is left as it is.
        """
        if not isinstance(lazy, bool):
            raise TypeError(f"lazy must be a bool, got {type(lazy).__name__}")
        if switch_every is not None and not (
            type(switch_every) is int and switch_every >= 1 and switch_every % self.update_every == 0
        ):
            raise ValueError(
                f"switch_every must be None or a positive multiple of update_every={self.update_every} (optimizer "
                f"steps), got {switch_every!r}"
            )
        number = isinstance(switch_blend, (int, float)) and not isinstance(switch_blend, bool)
        blend = float(switch_blend) if number else math.nan
        if not 0.0 < blend <= 1.0:
            raise ValueError(f"switch_blend must be a number in (0, 1] (1 copies the average), got {switch_blend!r}")
        self.switch_every, self.switch_blend = switch_every, blend
        self.lazy = lazy
        self.target: nn.Module | None = None
        self._target_first: Tensor | None = None
        self._shadow: Shadow | None = None
        self._options = {**options, "dtype": dtype, "device": device}
        if target is not None:
            if lazy:
                raise ValueError("lazy=True allocates the average late; a target module exists from the start")
            self.target = make_target(model, target, dtype=dtype, device=device)
            self._shadow = adopt(model, self.target, **options)
            self._target_first = first_tensor(self.target)
            self._target_memory = self._target_pointer()
        elif not lazy:
            self._shadow = Shadow(model, **self._options)

    @property
    def shadow(self) -> Shadow:
        """The averaged tensors (see :class:`~polyak.shadow.Shadow`); with a target, stored in its tensors."""
        if self._shadow is None:
            raise RuntimeError(
                f"no average yet: lazy=True allocates it at the first update after start_step={self.start_step} "
                f"(now at step {self.step}); check `averager.num_updates > 0` first"
            )
        return self._shadow

    def _begin_update(self, module: nn.Module) -> float | None:
        """The weight of this step's update, or None when this step does not update the average."""
        t = self.step + 1 - self.start_step
        if self.target is not None and self._target_pointer() != self._target_memory:
            self._readopt(module)
        if t == 0 and self.target is not None:  # the step before averaging starts: the target starts here
            self.shadow.copy_from(module)
        if t < 1 or t % self.update_every:
            return None
        if self._shadow is None:
            self._shadow = Shadow(module, **self._options)
        delta = t - self.last_update_step
        if not self.compensate and (delta < t or self.target is not None):  # one step's weight, every k steps
            return 1.0 - self.rule.decay_at(t)
        if self.target is not None:  # blends from the start (the initial copy is the iterate at time 0)
            return 1.0 - self.rule.decay_over(t, delta)
        return self.rule.weight(t, delta)

    def _target_pointer(self) -> int:
        """Where the target's first tensor lives now: one check per update notices a converted target."""
        return 0 if self._target_first is None else self._target_first.data_ptr()

    def _readopt(self, module: nn.Module) -> None:
        """The target was converted (``.to()``, ``.half()``): store the average in its new tensors, which hold it."""
        options = {k: v for k, v in self._options.items() if k not in ("dtype", "device")}
        self._shadow = adopt(module, self.target, copy=False, **options)  # type: ignore[arg-type]  # a target is set
        self._target_memory = self._target_pointer()

    def _end_update(self, module: nn.Module, applied: Tensor | None) -> None:
        """Count the update :meth:`_begin_update` asked for; switch the model to the average when due."""
        if applied is not None:
            self._skipped = self._skipped + ~applied
        self.last_update_step = t = self.step + 1 - self.start_step
        self.num_updates += 1
        if self.switch_every is not None and t % self.switch_every == 0:
            write_blended(module, self.shadow, self.switch_blend)

    def _policy(self) -> dict[str, Any]:
        """The shadow's saved options, also before a lazy averager has allocated it."""
        if self._shadow is not None:
            return self._shadow.policy()
        options = self._options
        dtype = options["dtype"]
        return {
            "buffers": options["buffers"],
            "frozen": options["frozen"],
            "exclude": list(options["exclude"]),
            "include_nonpersistent": bool(options["include_nonpersistent"]),
            "dtype": str(dtype) if dtype is not None else None,
        } | ({"rounding": options["rounding"]} if options["rounding"] != "nearest" else {})

    def _load_shadow(self, saved: Any, num_updates: int) -> None:
        """Load the saved average (None: a lazy averager saved before its first update)."""
        if saved is None:
            if num_updates:
                raise ValueError(f"saved averager has num_updates={num_updates} but no average; the state is damaged")
            if self.lazy and self.target is None:
                self._shadow = None  # back before the start: free the memory
            return
        if self._shadow is None and num_updates == 0:
            return  # lazy and still before the start: nothing to keep
        shadow = self._shadow if self._shadow is not None else Shadow(self.model, **self._options)
        shadow.load_state_dict(saved)  # checked there, before anything changes
        self._shadow = shadow


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
    value = float(tau) if isinstance(tau, (int, float)) and not isinstance(tau, bool) else math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"tau must be in (0, 1] (the weight of the online model per optimizer step; tau=1 copies), got {tau!r}"
        )
    return value


class SWA(Averager):
    """Stochastic weight averaging: the uniform average of the iterates (Izmailov et al. 2018).

    Typically with ``start_step`` (where the SWA phase begins) and ``update_every`` (e.g. one epoch of
    steps). Recompute BatchNorm statistics afterwards with :func:`polyak.swa_utils.update_bn`.
    Keyword arguments: see :class:`Averager`.
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, EqualWeights(), **options)
