"""Per-rank memory and collectives of an average under DeepSpeed ZeRO-3: polyak next to gathering every step.

    torchrun --standalone --nproc_per_node=2 benchmarks/zero.py [--width 1024] [--layers 8] [--updates 10]

polyak averages each rank's partition (``p.ds_tensor``): 1/world of the float32 average per rank and no
collective per update. The comparison does what diffusers' ``EMAModel.step`` does under ZeRO-3 (from its code:
``deepspeed.zero.GatheredParameters`` around the update, a full-size shadow on every rank): it gathers the
model every update. DeepSpeed-Chat's ``moving_average`` (from its code) gathers each parameter and its twin in
a second ZeRO-3 model, two gathers per parameter per update, and writes the twin inside
``GatheredParameters(modifier_rank=None)``, which DeepSpeed 0.19.8 refuses with a ``RuntimeError``.
Collectives are counted with a dispatch mode that sees every c10d op. DeepSpeed's JIT build of an op ZeRO never
uses is skipped (about 80 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import polyak


class CountCollectives(TorchDispatchMode):
    """Counts the c10d ops (process-group and functional collectives) dispatched within the block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func.namespace in {"c10d", "_c10d_functional", "c10d_functional"}
        return func(*args, **(kwargs or {}))


class GatherEveryStep:
    """A full float32 EMA on every rank, updated inside a gather of all parameters (as diffusers does)."""

    def __init__(self, deepspeed: Any, module: nn.Module, decay: float) -> None:
        self.deepspeed, self.params, self.decay = deepspeed, list(module.parameters()), decay
        with deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
            self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        with self.deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
            torch._foreach_lerp_(self.shadow, [p.float() for p in self.params], 1 - self.decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--updates", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # `import ... as` gets torch
    import deepspeed

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)), nn.Linear(args.width, 1))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3},  # DeepSpeed's defaults: small parameters are kept whole
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ema = polyak.EMA(engine, decay=0.999)
    gathering = GatherEveryStep(deepspeed, engine.module, decay=0.999)

    ours, theirs = CountCollectives(), CountCollectives()
    seconds = {"polyak": 0.0, "gather": 0.0}
    for _ in range(args.updates):
        loss = engine(torch.randn(4, args.width)).square().mean()
        engine.backward(loss)
        engine.step()
        dist.barrier()
        start = time.perf_counter()
        with ours:
            ema.update(engine)
        seconds["polyak"] += time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        with theirs:
            gathering.update()
        seconds["gather"] += time.perf_counter() - start

    full = sum(p.ds_numel for p in engine.module.parameters()) * 4  # a float32 average of the whole model
    stored = sum(t.nbytes for t in ema.shadow.tensors().values())
    kept = sum(t.nbytes for t in gathering.shadow)
    ms = {k: 1e3 * v / args.updates for k, v in seconds.items()}
    print(
        f"rank {rank}/{world}: polyak stores {stored / 2**20:.2f} MiB ({stored / full:.3f} of the full float32 "
        f"average, {full / 2**20:.2f} MiB), {ours.count / args.updates:.0f} collectives and {ms['polyak']:.2f} ms "
        f"per update; gathering every step stores {kept / 2**20:.2f} MiB ({kept / full:.3f}), "
        f"{theirs.count / args.updates:.0f} collectives and {ms['gather']:.2f} ms per update "
        f"({ms['gather'] / ms['polyak']:.1f}x the time)",
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo threads can abort a process at interpreter exit


if __name__ == "__main__":
    main()
