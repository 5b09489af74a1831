"""Launching real 2-rank gloo jobs from pytest, reliably, and counting collectives.

- spawn (never fork: a parent that used OpenMP deadlocks forked children);
- rendezvous through a fresh file in the test's tmp_path (no port to collide or cross-talk), gloo on loopback;
- a timeout on the process group and on the whole launch; a failing rank fails the test at once;
- each worker ends with ``os._exit(0)`` after teardown: gloo threads otherwise abort the process at exit
  now and then (SIGABRT, "terminate called without an active exception").
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

WORLD = 2
GROUP_TIMEOUT = timedelta(seconds=90)  # gloo's default is 30 minutes


def entry(rank: int, fn: Callable[..., dict[str, Any]], world: int, out: str, spec: dict[str, Any]) -> None:
    """The spawned process: join the group, run ``fn``, save what it returns, leave without interpreter teardown."""
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    if Path("/sys/class/net/lo").exists():  # keep gloo on 127.0.0.1 even where the hostname resolves elsewhere
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world, timeout=GROUP_TIMEOUT
    )
    result = fn(rank, world, Path(out), **spec)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, f"{out}/rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn: Callable[..., dict[str, Any]], out: Path, timeout: float = 180.0, **spec: Any) -> list[dict[str, Any]]:
    """Run ``fn(rank, world, out, **spec)`` on 2 ranks; return each rank's result (raise if any rank fails)."""
    out.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        entry, args=(fn, WORLD, str(out), spec), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):  # raises as soon as one rank fails, after stopping the others
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def failing_job(rank: int, world: int, out: Path) -> dict[str, Any]:
    """Rank 1 raises while rank 0 waits for it in a collective."""
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    dist.barrier()
    return {}


# ---------------------------------------------------------------------- counting collectives

_PYTHON_COLLECTIVES = {
    "torch.distributed.distributed_c10d": (
        "all_reduce all_reduce_coalesced all_gather all_gather_into_tensor all_gather_object all_gather_coalesced "
        "broadcast broadcast_object_list reduce reduce_scatter reduce_scatter_tensor all_to_all all_to_all_single "
        "scatter gather barrier send recv isend irecv batch_isend_irecv"
    ),
    "torch.distributed._functional_collectives": (
        "all_reduce all_reduce_coalesced all_gather_tensor all_gather_tensor_autograd all_gather_into_tensor_coalesced "
        "reduce_scatter_tensor reduce_scatter_tensor_coalesced all_to_all_single broadcast permute_tensor"
    ),
}
_OP_NAMESPACES = {"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"}


class _OpCounter(TorchDispatchMode):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace in _OP_NAMESPACES:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def count_collectives() -> Iterator[list[str]]:
    """Record every collective started within the block: Python entry points and dispatched c10d ops."""
    calls: list[str] = []
    patched: list[tuple[Any, str, Any]] = []

    def counting(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(*args, **kwargs)

        return wrapper

    for module_name, names in _PYTHON_COLLECTIVES.items():
        module = sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])
        for name in names.split():
            original = getattr(module, name, None)
            if original is None:
                continue
            for holder in {module, dist} if module_name.endswith("c10d") else {module}:
                if getattr(holder, name, None) is original:
                    patched.append((holder, name, original))
                    setattr(holder, name, counting(f"{module_name}.{name}", original))
    try:
        with _OpCounter(calls):
            yield calls
    finally:
        for holder, name, original in patched:
            setattr(holder, name, original)
