"""Options: how an average is kept. One immutable value, checked completely when an averager is built.

Every front end takes the same options and hands them down unchanged to the storage (:mod:`polyak.shadow`),
the plan and the kernels, so every front end has every option, and a mistake is refused at construction
(lazy or not), never at the first update hours later.

- what takes part: ``buffers``, ``frozen``, ``exclude``, ``include_nonpersistent``;
- how it is stored: ``dtype``, ``rounding``, ``device`` (an offloaded average), ``lazy`` (allocated late);
- what an update does with inf or NaN in the model: ``nonfinite``;
- how a changed model is noticed: ``watch``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import Tensor

from .checks import check_flag
from .module_tensors import Found

__all__ = ["NONFINITE", "POLICIES", "ROUNDINGS", "NonFinite", "Options", "Policy", "Rounding"]

Policy = Literal["average", "copy", "skip"]
POLICIES: tuple[Policy, ...] = ("average", "copy", "skip")
NonFinite = Literal["propagate", "skip", "raise"]
NONFINITE: tuple[NonFinite, ...] = ("propagate", "skip", "raise")
Rounding = Literal["nearest", "stochastic"]
ROUNDINGS: tuple[Rounding, ...] = ("nearest", "stochastic")


def _choice(name: str, value: Any, choices: tuple[str, ...], hint: str) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}; {hint}")
    return value


def _device(value: Any) -> torch.device | None:
    if value is None or isinstance(value, torch.device):
        return value
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return torch.device(value)
        except RuntimeError as error:
            message = f"device: expected a torch device such as 'cpu' or 'cuda:0', got {value!r} ({error})"
            raise ValueError(message) from None
    raise TypeError(f"device: expected a torch.device, a string such as 'cpu', or None; got {value!r}")


@dataclass(frozen=True)
class Options:
    """How an average is kept; every field is checked when the value is built.

    Args:
        buffers: floating buffers (BatchNorm statistics) are ``"average"``-d (default), ``"copy"``-ed from the
            model at each update, or ``"skip"``-ped (left to the model). Integer and bool buffers are copied.
        frozen: parameters with ``requires_grad=False`` are ``"copy"``-ed (default), ``"average"``-d or
            ``"skip"``-ped (no memory for them, e.g. the frozen base of a LoRA model).
        exclude: glob patterns (``fnmatch``) of qualified names left to the model, e.g. ``("*.running_*",)``.
        include_nonpersistent: also keep buffers registered with ``persistent=False`` (default: skipped).
        dtype: storage dtype of averaged tensors. Default: the model's promoted to at least float32, so a bf16
            model gets a float32 average; a lower precision is an explicit opt-in.
        device: where the average lives (default: beside each model tensor); ``"cpu"`` offloads it.
        rounding: how a ``dtype=torch.bfloat16`` average is written: ``"nearest"`` (stalls once increments fall
            under half a bf16 spacing) or ``"stochastic"`` (unbiased; its random stream is saved in the state).
        nonfinite: an update whose averaged model tensors hold inf or NaN: ``"propagate"`` (no check),
            ``"skip"`` (the averages keep their values, decided on the device) or ``"raise"`` (an error naming
            the tensor, before anything changes). The first update and a lazy start are guarded alike.
        lazy: allocate nothing for the average before its first update.
        watch: notice a changed model (``.to()``, ``p.data = ...``, a replaced layer) by events on that model
            (default); ``False`` installs nothing into torch, and the user calls ``averager.check()`` after
            changing the model.
    """

    buffers: Policy = "average"
    frozen: Policy = "copy"
    exclude: tuple[str, ...] = ()
    include_nonpersistent: bool = False
    dtype: torch.dtype | None = None
    device: torch.device | None = field(default=None)
    rounding: Rounding = "nearest"
    nonfinite: NonFinite = "propagate"
    lazy: bool = False
    watch: bool = True

    def __post_init__(self) -> None:
        hint = "see polyak.Options"
        _choice("buffers", self.buffers, POLICIES, hint)
        _choice("frozen", self.frozen, POLICIES, hint)
        _choice("rounding", self.rounding, ROUNDINGS, hint)
        _choice("nonfinite", self.nonfinite, NONFINITE, 'e.g. nonfinite="skip" to leave out a NaN step')
        exclude = self.exclude
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
            raise TypeError(f"exclude: expected a sequence of glob patterns such as ['*.running_*'], got {exclude!r}")
        patterns = tuple(exclude)
        wrong = next((p for p in patterns if not isinstance(p, str)), None)
        if wrong is not None:
            raise TypeError(f"exclude: expected glob patterns (str), got {wrong!r} in {list(patterns)!r}")
        object.__setattr__(self, "exclude", patterns)
        for name in ("include_nonpersistent", "lazy", "watch"):
            check_flag(name, getattr(self, name))
        dtype = self.dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype (e.g. torch.float32) or None, got {dtype!r}")
        object.__setattr__(self, "device", _device(self.device))
        if self.rounding == "stochastic" and dtype != torch.bfloat16:
            raise ValueError(
                f'rounding="stochastic" is for a bfloat16 average; got dtype={dtype}. Pass dtype=torch.bfloat16, '
                'or keep rounding="nearest" (a float32 average stalls only for increments under 6e-8 of a weight; '
                "use dtype=torch.float64 there)"
            )

    # ------------------------------------------------------------------ selection and precision

    def mode(self, found: Found) -> Policy:
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

    def storage_dtype(self, tensor: Tensor, mode: Policy) -> torch.dtype:
        """The dtype a stored tensor is kept in: copies as the model's, averages at least float32 unless asked."""
        if mode == "copy":
            return tensor.dtype
        if self.dtype is not None:  # the precision asked for; complex tensors keep their imaginary part
            return self.dtype.to_complex() if tensor.is_complex() else self.dtype
        return torch.promote_types(tensor.dtype, torch.float32)

    def check_model(self, found: list[Found]) -> None:
        """Refuse, naming the tensor, what these options cannot do with this model (run at construction)."""
        on_meta = next((f.name for f in found if f.tensor.device.type == "meta"), None)
        if on_meta is not None:
            raise ValueError(
                f"model tensor {on_meta!r} is on the meta device (it holds no values); build the averager after "
                "to_empty() and loading or initialising the weights"
            )
        if self.rounding == "stochastic":
            complex_ = next((f.name for f in found if f.tensor.is_complex() and self.mode(f) == "average"), None)
            if complex_ is not None:
                raise ValueError(f'rounding="stochastic" averages real tensors; {complex_!r} is complex: exclude it')

    def saved(self) -> dict[str, Any]:
        """The options a saved state must match (the ``policy`` entry; its keys are those of format /1)."""
        return {
            "buffers": self.buffers,
            "frozen": self.frozen,
            "exclude": list(self.exclude),
            "include_nonpersistent": self.include_nonpersistent,
            "dtype": str(self.dtype) if self.dtype is not None else None,
        } | ({"rounding": self.rounding} if self.rounding != "nearest" else {})
