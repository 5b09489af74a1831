"""Recording the ATen operations a block of code runs (to count kernels and host syncs without timing)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

SYNC = "aten._local_scalar_dense"  # what .item(), bool(), int() of a tensor run: a host sync on a GPU


class OpCounter(TorchDispatchMode):
    """Records the name of every tensor operation that runs inside the block, in ``ops``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
