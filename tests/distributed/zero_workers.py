"""What each rank runs under DeepSpeed ZeRO (importable by spawned children).

DeepSpeed runs on CPU over the harness's gloo group. Its JIT build of a shared-memory op that ZeRO never uses
(about 80 s on 2 cores) is skipped; see /work/shared/research/scale.md.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import polyak
from polyak.distributed import full_state_dict

from .harness import count_collectives

DECAY = 0.8
STEPS = 6
SAVE_AT = 3  # the averager's state is saved after this many steps, and a fresh averager resumes from it
BATCH = 4  # samples per rank and step
LR = 0.05
PERSIST = 5  # stage3_param_persistence_threshold: the biases of 5 and 3 elements stay whole, the rest partitioned


def start_deepspeed(rank: int, world: int) -> Any:
    """Import DeepSpeed for a rank of the harness's process group, without its unused JIT build."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # `import ... as` gets torch
    import deepspeed

    return deepspeed


def net(seed: int = 0) -> nn.Module:
    """Sizes that do not split evenly over 2 ranks: 30, 5, 80, 16, 48 and 3 elements."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, 6, generator=g)
    return x, torch.sin(x[:, :3])


def config(stage: int, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = PERSIST
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "steps_per_print": 10**6,
        **({"bf16": {"enabled": True}} if bf16 else {}),
    }


def _gathered(deepspeed: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters (a collective under ZeRO-3), cloned."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {name: p.detach().clone() for name, p in module.named_parameters()}


def _partitions(module: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's local data: its whole ZeRO-3 partition (padding included), or the tensor."""
    return {n: getattr(p, "ds_tensor", p).detach().clone() for n, p in module.named_parameters()}


def _step(engine: Any, step: int, rank: int, dtype: torch.dtype) -> None:
    x, y = batch(step, rank)
    loss = nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
    engine.backward(loss)
    engine.step()


def zero_job(rank: int, world: int, out: Path, stage: int, bf16: bool) -> dict[str, Any]:
    deepspeed = start_deepspeed(rank, world)
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config(stage, bf16))
    dtype = torch.bfloat16 if bf16 else torch.float32
    module = engine.module
    result: dict[str, Any] = {}

    if stage == 3:  # a parameter caught mid-gather is refused at construction, by name of the engine
        p = next(module.parameters())
        status, p.ds_status = p.ds_status, type(p.ds_status).INFLIGHT
        try:
            polyak.EMA(module, decay=DECAY)
        except RuntimeError as error:
            result["inflight_error"] = str(error)
        p.ds_status = status

    ema = polyak.EMA(engine, decay=DECAY)  # from the engine ...
    of_module = polyak.EMA(module, decay=DECAY)  # ... and from engine.module: the same average
    result["persist"] = {n: bool(getattr(p, "ds_persist", False)) for n, p in module.named_parameters()}
    result["average_dtypes"] = {n: str(t.dtype) for n, t in ema.shadow.tensors().items()}
    result["local_bytes"] = sum(t.nbytes for t in ema.shadow.tensors().values())
    result["full_bytes"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters()) * 4

    calls: list[str] = []
    seen = []
    for step in range(STEPS):
        _step(engine, step, rank, dtype)
        with count_collectives() as during:
            ema.update(engine)
            of_module.update(module)
        calls += during
        seen.append(_gathered(deepspeed, module))
        if step + 1 == SAVE_AT:
            torch.save(ema.state_dict(), out / f"ema{rank}.pt")
            resumed = polyak.EMA(module, decay=DECAY)  # a fresh averager, restored from this rank's file
            resumed.load_state_dict(polyak.load_state(out / f"ema{rank}.pt"))
        elif step + 1 > SAVE_AT:
            resumed.update(module)
    with count_collectives() as control:  # the counter sees DeepSpeed's gathers (ZeRO-2 has none to do)
        _gathered(deepspeed, module)
        if stage < 3:
            torch.distributed.all_reduce(torch.zeros(1))
    result.update(update_collectives=calls, control_collectives=control, seen=seen)
    result["ema_partitions"] = {k: v.clone() for k, v in ema.shadow.tensors().items()}
    result["of_module_partitions"] = {k: v.clone() for k, v in of_module.shadow.tensors().items()}
    result["resumed_partitions"] = {k: v.clone() for k, v in resumed.shadow.tensors().items()}
    other = torch.load(out / f"ema{1 - rank}.pt", weights_only=True)  # the other rank's partitions do not fit
    try:
        polyak.EMA(module, decay=DECAY).load_state_dict(other)
        result["other_rank_state"] = "loaded"
    except ValueError as error:
        result["other_rank_state"] = str(error)
    result["full"] = full_state_dict(ema.state_dict()["shadow"], model=engine)

    # Evaluate with the average swapped in. The evaluation forward before it leaves the parameters gathered.
    x = batch(99, 0)[0].to(dtype)
    engine.eval()
    with torch.no_grad():
        result["trained_out"] = engine(x).float()
        before = _partitions(module)
        with ema.swapped(engine):
            result["swapped_out"] = engine(x).float()
            result["swapped_params"] = _gathered(deepspeed, module)
        result["restored_out"] = engine(x).float()
    after = _partitions(module)
    result["restored"] = {n: torch.equal(before[n], after[n]) for n in before}
    try:
        ema.averaged_model()
    except RuntimeError as error:
        result["averaged_model_error"] = str(error)

    # copy_to: the model holds the average for good; whole (persistent) parameters pass it to their partitions.
    ema.copy_to(engine)
    result["copied_params"] = _gathered(deepspeed, module)
    if stage == 3:
        persistent = [p for p in module.parameters() if p.ds_persist]
        persistent[0].partition(param_list=persistent)  # as DeepSpeed does around a checkpoint ...
        result["copied_after_repartition"] = _gathered(deepspeed, module)  # ... gathered from the partitions

    if stage == 2:  # FSDP1's flat parameters are refused at construction
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = FullyShardedDataParallel(net(), device_id=torch.device("cpu"), use_orig_params=True)
        try:
            polyak.EMA(fsdp1, decay=DECAY)
        except RuntimeError as error:
            result["fsdp1_error"] = str(error)
    return result
