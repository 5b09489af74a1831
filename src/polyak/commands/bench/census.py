"""What an update does besides taking time: ATen operations, host syncs and new allocations, counted at the
dispatcher, and the memory an implementation keeps alive, found by scanning the live tensors."""

from __future__ import annotations

import gc
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Census", "live_storages"]


class Census(TorchDispatchMode):
    """Counts ATen operations, host syncs and newly allocated tensor bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.allocated = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if "_local_scalar_dense" in str(func):
            self.syncs += 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                inputs.add(t.untyped_storage().data_ptr())
                self.allocated += t.untyped_storage().nbytes()
        return out


def live_storages() -> dict[int, int]:
    """Data pointer -> bytes of every storage that a live Python tensor refers to."""
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), Tensor) and obj.device.type != "meta":  # type() avoids lazy proxies
            try:
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a fake tensor left by torch.compile's tracing: it holds no memory
                continue
    return found
