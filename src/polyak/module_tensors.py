"""A module's tensors by qualified name, looking through the wrappers that training adds.

DDP / DataParallel / DeepSpeed engine / ``torch.compile`` roots are unwrapped and wrapper segments (``_orig_mod``,
``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``) dropped from names, so an average made from a
wrapped model pairs with the bare one and the other way round.
"""

from __future__ import annotations

import bisect
import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .storage import engine_of
from .storage.zero3 import is_engine, is_partitioned

__all__ = ["Found", "canonical_name", "copy_module", "shared_memory", "unwrap", "walk"]

# Attribute names that wrappers insert into qualified names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def unwrap(module: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / DeepSpeed engine / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and not is_engine(module):
            inner = getattr(module, "_orig_mod", None) if type(module).__name__ == "OptimizedModule" else None
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def canonical_name(name: str) -> str:
    """``name`` with wrapper segments (``_orig_mod``, ``_fsdp_wrapped_module``, ...) removed."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


@dataclass
class Found:
    """One tensor of a module, where it lives, and what it is."""

    name: str
    owner: dict[str, Any]  # the module's _parameters or _buffers dict
    key: str
    tensor: Tensor
    is_param: bool
    persistent: bool


def walk(root: nn.Module, aliases: dict[str, str] | None = None) -> tuple[list[Found], list[nn.Module]]:
    """Every distinct tensor of ``root`` (tied tensors once, first name wins), and every module visited.

    If given, ``aliases`` receives the other names of tied tensors, mapped to the name that was kept.
    """
    found: list[Found] = []
    modules: list[nn.Module] = []
    seen_tensors: dict[int, str] = {}
    seen_modules: set[int] = set()
    stack: list[tuple[nn.Module, str]] = [(unwrap(root), "")]
    while stack:
        module, prefix = stack.pop()
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        modules.append(module)
        for owner, is_param in ((module._parameters, True), (module._buffers, False)):
            for key, tensor in owner.items():
                if tensor is None:
                    continue
                name = canonical_name(prefix + key)
                if id(tensor) in seen_tensors:
                    if aliases is not None:
                        aliases[name] = seen_tensors[id(tensor)]
                    continue
                seen_tensors[id(tensor)] = name
                persistent = is_param or key not in module._non_persistent_buffers_set
                found.append(Found(name, owner, key, tensor, is_param, persistent))
        children = [(key, child) for key, child in module._modules.items() if child is not None]
        stack.extend((child, prefix + key + ".") for key, child in reversed(children))
    return found, modules


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (unwrapped from DDP / ``torch.compile``).

    Tensors that a module keeps as plain attributes and computes in its forward (the old hook-based
    ``torch.nn.utils.weight_norm`` stores ``weight`` so) are copied detached, which ``copy.deepcopy`` alone
    refuses; the module's hooks recompute them. Raises ``RuntimeError`` when the module cannot be copied.
    """
    inner = unwrap(module)
    if any(is_partitioned(p) for p in inner.parameters()):
        raise RuntimeError(
            f"cannot copy the model: {type(inner).__name__} is partitioned by DeepSpeed ZeRO-3 (its parameters are "
            "placeholders; a copy would not be gathered in forward). Use polyak.EMA / polyak.SWA, which average the "
            "partitions in place (evaluate with `with ema.swapped(model): ...`; export with "
            "polyak.distributed.full_state_dict(ema.state_dict()['shadow'], model=model))."
        )
    memo: dict[int, Any] = {
        id(value): value.detach().clone()
        for child in inner.modules()
        for value in vars(child).values()
        if isinstance(value, Tensor) and value.grad_fn is not None
    }
    try:
        return copy.deepcopy(inner, memo)
    except Exception as error:  # deepcopy raises anything: RuntimeError, AssertionError (FSDP), TypeError
        raise RuntimeError(
            f"cannot copy the model: copy.deepcopy({type(inner).__name__}) failed ({error}). "
            "Use polyak.EMA / polyak.SWA, which keep only the averaged tensors and need no copy of the model "
            "(evaluate with `with ema.swapped(model): ...` or export with `ema.copy_to(model)`)."
        ) from error


def _extent(tensor: Tensor) -> tuple[str, int, int] | None:
    """The device and the byte addresses ``[start, stop)`` that ``tensor``'s elements (this rank's, if sharded) may
    occupy; None for a tensor without elements or readable memory (meta, fake)."""
    try:
        local = engine_of(tensor).local(tensor)
        if local.numel() == 0 or local.device.type == "meta":
            return None
        span = 1 + sum((size - 1) * stride for size, stride in zip(local.shape, local.stride(), strict=True))
        return str(local.device), local.data_ptr(), local.data_ptr() + span * local.element_size()
    except (RuntimeError, NotImplementedError):
        return None


def shared_memory(ours: Iterable[tuple[str, Tensor]], theirs: Iterable[tuple[str, Tensor]]) -> tuple[str, str] | None:
    """The names of the first tensor of ``ours`` (name, tensor pairs) whose memory overlaps one of ``theirs``, and
    of that one; None when all are apart.

    Compared by address ranges on each device, so a tensor reused, tied, viewed, sliced or ``as_strided``, and
    memory wrapped twice (``torch.from_numpy``, ``frombuffer``, DLPack) are all found; views that interleave
    without touching (``a[::2]``, ``a[1::2]``) count as overlapping.
    """
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for name, tensor in theirs:
        extent = _extent(tensor)
        if extent is not None:
            spans.setdefault(extent[0], []).append((extent[1], extent[2], name))
    starts: dict[str, list[int]] = {}
    reach: dict[str, list[tuple[int, str]]] = {}  # per device, over spans sorted by start: the furthest end so far
    for device, found in spans.items():
        found.sort()
        starts[device] = [start for start, _, _ in found]
        reach[device] = list(itertools.accumulate(((stop, name) for _, stop, name in found), max))
    for name, tensor in ours:
        extent = _extent(tensor)
        if extent is None or extent[0] not in spans:
            continue
        device, start, stop = extent
        before = bisect.bisect_left(starts[device], stop)  # spans that begin before this one ends ...
        if before and reach[device][before - 1][0] > start:  # ... the furthest of them ends after it begins
            return name, reach[device][before - 1][1]
    return None
