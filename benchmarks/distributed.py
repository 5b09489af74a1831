"""Per-rank memory of a sharded (FSDP2) average, and collectives per update.

    torchrun --standalone --nproc_per_node=2 benchmarks/distributed.py [--width 1024] [--layers 8]

Every Linear layer is its own FSDP2 unit; the average (float32) lives on the same shards. Collectives are
counted with a dispatch mode that sees every c10d op, while the average is updated; as a control, while
the full average is gathered with polyak.distributed.full_state_dict.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

import polyak
from polyak.distributed import full_state_dict


class CountCollectives(TorchDispatchMode):
    """Counts the c10d ops (process-group and functional collectives) dispatched within the block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func.namespace in {"c10d", "_c10d_functional", "c10d_functional"}
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--updates", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)), nn.Linear(args.width, 1))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    ema = polyak.EMA(model, decay=0.999)

    counter = CountCollectives()
    for _ in range(args.updates):
        model(torch.randn(4, args.width)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with counter:
            ema.update(model)
    control = CountCollectives()
    with control:
        full_state_dict(ema.state_dict()["shadow"])

    full = sum(p.numel() * p.element_size() for p in model.parameters())
    stored = sum(t.to_local().nbytes for t in ema.shadow.tensors().values())
    print(
        f"rank {rank}/{world}: average {stored / 2**20:.2f} MiB on this rank, full average {full / 2**20:.2f} MiB "
        f"({stored / full:.3f} of it); collectives in {args.updates} updates: {counter.count}; "
        f"in one full_state_dict gather (control): {control.count}",
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo threads can abort a process at interpreter exit


if __name__ == "__main__":
    main()
