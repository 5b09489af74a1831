"""A drop-in for ``torch.optim.swa_utils``, built on the shadow engine, minus its known defects.

Change one import line and keep the rest::

    from polyak.swa_utils import SWALR, AveragedModel, ExponentialMovingAverage, update_bn

Same constructors, ``forward``, ``update_parameters``, ``n_averaged`` and ``state_dict()`` keys (``module.*``
and ``n_averaged``), so checkpoints load in both directions. Results agree with torch within float32 rounding,
except where torch is wrong; those differences are deliberate and listed in :class:`AveragedModel`.
``SWALR`` is torch's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR

from .bn import update_bn
from .checks import check_flag
from .front_end import eager_when_compiled
from .module_tensors import copy_module
from .options import Options
from .rules import ConstantDecay, EqualWeights, Rule
from .shadow import Shadow

__all__ = [
    "SWALR",
    "AveragedModel",
    "ExponentialMovingAverage",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
    "update_bn",
]

TensorList = list[Tensor] | tuple[Tensor, ...]
AvgFn = Callable[[Tensor, Tensor, Any], Tensor]
MultiAvgFn = Callable[[TensorList, TensorList, Any], None]


class _Averaging:
    """An averaging function in torch's calling convention that also carries the polyak rule it computes.

    Called as torch calls it, ``fn(averaged, current, num_averaged)``. :class:`AveragedModel` does not call it:
    it reads ``rule`` and runs the shadow's kernel. Integer tensors are copied, not pushed through float math.
    """

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def _weight(self, num_averaged: int | Tensor) -> Any:
        if isinstance(self.rule, ConstantDecay):
            return 1.0 - self.rule.decay
        return 1.0 / (num_averaged + 1)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.rule!r}>"


class _PerTensor(_Averaging):
    """``fn(averaged, current, num_averaged)`` returns the new average of one tensor."""

    @torch.no_grad()
    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: int | Tensor) -> Tensor:
        if not (averaged.is_floating_point() or averaged.is_complex()):
            return current.clone()
        weight = self._weight(num_averaged)
        return torch.lerp(averaged, current, weight.to(averaged.dtype) if isinstance(weight, Tensor) else weight)


class _Multi(_Averaging):
    """``fn(averaged, current, num_averaged)`` updates lists of tensors (one device and dtype) in place."""

    @torch.no_grad()
    def __call__(self, averaged: TensorList, current: TensorList, num_averaged: int | Tensor) -> None:
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            torch._foreach_lerp_(averaged, current, self._weight(num_averaged))
        else:
            torch._foreach_copy_(averaged, current)


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    """In-place EMA over lists of tensors: ``avg <- decay * avg + (1 - decay) * model`` (``decay`` per update).

    Recognised by :class:`AveragedModel` as :class:`~polyak.rules.ConstantDecay` and run by the shadow's kernel;
    also works with torch's ``AveragedModel``. ``decay`` must be in [0, 1).
    """
    return _Multi(ConstantDecay(decay))


def get_ema_avg_fn(decay: float = 0.999) -> AvgFn:
    """Per-tensor EMA, returning the new average; see :func:`get_ema_multi_avg_fn`."""
    return _PerTensor(ConstantDecay(decay))


def get_swa_multi_avg_fn() -> MultiAvgFn:
    """In-place equal-weight average over lists of tensors: ``avg <- avg + (model - avg) / (n + 1)``."""
    return _Multi(EqualWeights())


def get_swa_avg_fn() -> AvgFn:
    """Per-tensor equal-weight average, returning the new average; see :func:`get_swa_multi_avg_fn`."""
    return _PerTensor(EqualWeights())


def _version(tensor: Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter: always re-read them
        return None


def _drop_compile_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load torch's checkpoint of an averaged ``torch.compile`` model: ``module._orig_mod.x`` -> ``module.x``."""
    compiled = f"{prefix}module._orig_mod."
    for key in [k for k in state if k.startswith(compiled)]:
        state[f"{prefix}module.{key[len(compiled) :]}"] = state.pop(key)


class AveragedModel(nn.Module):
    """A copy of ``model`` whose weights are the average of the models passed to :meth:`update_parameters`.

    The signature, ``forward``, ``n_averaged`` and ``state_dict()`` are those of
    ``torch.optim.swa_utils.AveragedModel``. The first update copies; later ones use ``avg_fn`` (per tensor),
    ``multi_avg_fn`` (in place, per list of same device and dtype), or by default the equal-weight average
    ``1 / (n_averaged + 1)``. Both functions are called with torch's convention ``(averaged, model,
    n_averaged)``, ``n_averaged`` a tensor. The default, and the functions from this module's ``get_*_fn``
    helpers, run as one shadow kernel per device and dtype instead of calling a function; any other function
    is the user's own update and is called as torch calls it.

    Args:
        model: the model to average (DDP / ``torch.compile`` wrappers are looked through).
        device: where the averaged copy lives (default: beside the model).
        avg_fn: a per-tensor update function (see above); give at most one of ``avg_fn`` and ``multi_avg_fn``.
        multi_avg_fn: an update function over lists of tensors (see above).
        use_buffers: average the floating buffers (BatchNorm statistics) too; otherwise buffers are copied from
            the model at each update (default, as torch).
        dtype: floating dtype of the averaged copy (default: the model's, as torch). ``torch.float32`` for a
            bf16/fp16 model gives an average that does not stall; the copy then computes in float32, so feed it
            float32 inputs or run it under autocast.

    Deliberate differences from torch:

    * integer and bool buffers (``num_batches_tracked``) are copied, never pushed through float math (torch
      truncates them with ``use_buffers=True``);
    * with ``use_buffers=True``, buffers registered with ``persistent=False`` (masks, caches: not part of the
      state) keep the value they had when the model was copied (torch averages them, which turns a ``-inf``
      attention mask into NaN);
    * tensors are paired by name: a model whose structure differs from the averaged copy raises ``ValueError``
      naming the tensor (torch zips by position and silently truncates);
    * ``dtype=torch.float32`` averages a bf16/fp16 model in float32 (torch's foreach path raises a dtype error
      on an upcast copy, and its bf16 copy stalls); user functions then get the model tensors as float32;
    * no host synchronisation per update: the count is a Python int, mirrored into the ``n_averaged`` buffer
      (torch reads the buffer twice per update). A write to the buffer (``load_state_dict``, torchvision's
      ``n_averaged.fill_(0)`` during warm-up) is noticed through the tensor's version counter and read once;
    * a DDP or ``torch.compile`` wrapper is looked through: the copy is the plain model, so its keys have no
      ``_orig_mod.`` (torch's checkpoints of a compiled model still load);
    * models that ``copy.deepcopy`` refuses because they keep computed tensors as attributes (the old
      ``torch.nn.utils.weight_norm``) are copied; where no copy is possible the error points to ``polyak.EMA``;
    * ``avg_fn`` and ``multi_avg_fn`` together raise ``ValueError`` (torch: ``AssertionError``), and a decay
      of exactly 1 in the EMA helpers raises ``ValueError`` (it would never update).

    The averaged values are the tensors of ``self.module``: converting it (``.to(device)``, ``.double()``) moves
    the average with it, as in torch.
    """

    n_averaged: Tensor

    def __init__(
        self,
        model: nn.Module,
        device: int | str | torch.device | None = None,
        avg_fn: AvgFn | None = None,
        multi_avg_fn: MultiAvgFn | None = None,
        use_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError("give at most one of avg_fn and multi_avg_fn, got both")
        check_flag("use_buffers", use_buffers)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.module = copy_module(model)
        if device is not None:
            self.module.to(device=device)
        if (
            dtype is not None
        ):  # not Module.to(dtype): it would cast complex tensors to real, dropping their imaginary part
            wanted = {True: dtype.to_complex(), False: dtype}
            self.module._apply(lambda t: t.to(wanted[t.is_complex()]) if t.is_floating_point() or t.is_complex() else t)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self._count = 0
        self._count_seen: tuple[Tensor, int | None] = (self.n_averaged, _version(self.n_averaged))
        self._count_copies: dict[torch.device, Tensor] = {}
        self._shadow: Shadow | None = None
        self.register_load_state_dict_pre_hook(_drop_compile_prefix)
        low = sorted({str(p.dtype) for p in self.module.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
        if low and dtype is None:
            warnings.warn(
                f"averaging parameters in {', '.join(low)}: increments below half a unit in the last place are "
                "lost, so the average stalls (e.g. an EMA with decay 0.999). Pass dtype=torch.float32 to average "
                "in float32.",
                UserWarning,
                stacklevel=2,
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The averaged copy's forward."""
        return self.module(*args, **kwargs)

    def _storage(self) -> Shadow:
        """The shadow whose storage is ``self.module``'s tensors (it follows their conversions), made anew when
        ``self.module`` itself was replaced."""
        shadow = self._shadow
        if shadow is None or shadow.target is not self.module:
            options = Options(
                buffers="average" if self.use_buffers else "copy",
                frozen="average",  # as torch: a parameter unfrozen later is averaged from then on
                include_nonpersistent=not self.use_buffers,  # copied as torch, but never averaged
            )
            shadow = self._shadow = Shadow(self.module, options, adopt=True)
        return shadow

    def _n(self) -> int:
        """Models averaged so far, re-read from the buffer only when something other than us wrote it."""
        tensor, version = self._count_seen
        if tensor is not self.n_averaged or version is None or _version(self.n_averaged) != version:
            self._count = int(self.n_averaged)
        return self._count

    def _count_on(self, device: torch.device, n: int) -> Tensor:
        """``n_averaged`` as a tensor on ``device`` for a user's function: the buffer itself, or a copy filled
        on that device (``n_averaged.to(device)`` would be a blocking host-to-device copy)."""
        if self.n_averaged.device == device:
            return self.n_averaged
        copy = self._count_copies.get(device)
        if copy is None:
            copy = self._count_copies[device] = torch.empty((), dtype=torch.long, device=device)
        return copy.fill_(n)

    @eager_when_compiled  # inside a compiled step: one graph break, no recompile per step
    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Fold ``model`` into the average: a copy on the first call, then the averaging function."""
        shadow = self._storage()
        n = self._n()
        multi, each = self.multi_avg_fn, self.avg_fn
        function = multi if multi is not None else each
        rule = EqualWeights() if function is None else getattr(function, "rule", None)
        if n == 0 or isinstance(rule, Rule):
            shadow.update(model, rule.weight(n + 1) if isinstance(rule, Rule) else 1.0)
        elif multi is not None:
            shadow.apply(model, lambda avg, new: multi(avg, new, self._count_on(avg[0].device, n)))
        elif each is not None:

            def per_tensor(averages: list[Tensor], models: list[Tensor]) -> None:
                for average, new in zip(averages, models, strict=True):
                    average.copy_(each(average, new, self._count_on(average.device, n)))

            shadow.apply(model, per_tensor)
        self._count = n + 1
        self.n_averaged.fill_(self._count)
        self._count_seen = (self.n_averaged, _version(self.n_averaged))

    def __getstate__(self) -> dict[str, Any]:
        # The shadow caches a pairing with the training model: neither is pickled nor deep-copied.
        state = dict(super().__getstate__())
        state.update(_shadow=None, _count_copies={})
        return state


class ExponentialMovingAverage(AveragedModel):
    """torchvision's recipe class: an EMA of parameters and buffers, ``avg <- decay * avg + (1 - decay) * model``.

    ``decay`` is per call of :meth:`update_parameters`; ``device`` defaults to ``"cpu"`` as in the recipe.
    Integer buffers are copied (see :class:`AveragedModel`).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        device: int | str | torch.device | None = "cpu",
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(model, device, get_ema_avg_fn(decay), use_buffers=True, dtype=dtype)
