"""What each rank runs for tests/distributed/test_identity.py (importable by spawned children): a sharded state
knows which part of the whole it holds, and another rank's or another world size's part is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import polyak

DECAY = 0.5


def attempt(load: Callable[[], Any]) -> str:
    """``"loaded"``, or the message of the ``ValueError`` it raised."""
    try:
        load()
    except ValueError as error:
        return str(error)
    return "loaded"


def even_net() -> nn.Module:
    """24, 4, 8 and 2 elements: every ZeRO-3 partition has the same size on both ranks, so a state of the other
    rank fits every shape."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))


def _held(averager: polyak.EMA) -> tuple[dict[str, torch.Tensor], int]:
    """The averager's local tensors (cloned) and its step."""
    local = {k: getattr(v, "_local_tensor", v).clone() for k, v in averager.shadow.tensors().items()}
    return local, averager.step


def _same(a: tuple[dict[str, torch.Tensor], int], b: tuple[dict[str, torch.Tensor], int]) -> bool:
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(v, b[0][k]) for k, v in a[0].items())


def zero3_job(rank: int, world: int, out: Path) -> dict[str, Any]:
    """Rank 0 saves its state (as DDP code does); both ranks load it. Then each rank's own state, into a fresh and
    into a lazy averager, and states edited to another world size or loaded into an unsharded model."""
    from .zero_workers import LR, batch, config, start_deepspeed

    deepspeed = start_deepspeed(rank, world)
    model = even_net()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR), config=config(3, bf16=False)
    )
    ema = polyak.EMA(engine, decay=DECAY)
    lazy = polyak.EMA(engine.module, decay=DECAY, lazy=True)
    for step in range(2):
        engine.backward(engine(batch(step, rank)[0]).pow(2).mean())
        engine.step()
        ema.update()
        lazy.update()
    own, own_lazy = ema.state_dict(), lazy.state_dict()
    result: dict[str, Any] = {
        "shard": own.get("shard"),
        "shapes": {k: tuple(v.shape) for k, v in own["shadow"].items()},
    }
    if rank == 0:
        torch.save(own, out / "rank0.pt")
    torch.save(own, out / f"own{rank}.pt")
    dist.barrier()

    before = _held(ema)
    result["rank0_state"] = attempt(lambda: ema.load_state_dict(torch.load(out / "rank0.pt", weights_only=True)))
    result["unchanged"] = _same(_held(ema), before)
    fresh = polyak.EMA(engine.module, decay=DECAY)
    result["own_state"] = attempt(lambda: fresh.load_state_dict(torch.load(out / f"own{rank}.pt", weights_only=True)))
    result["own_state_exact"] = _same(_held(fresh), before)
    resumed_lazy = polyak.EMA(engine.module, decay=DECAY, lazy=True)
    result["own_lazy_state"] = attempt(lambda: resumed_lazy.load_state_dict(own_lazy))

    other_world = torch.load(out / f"own{rank}.pt", weights_only=True)
    other_world["shard"] = {**other_world["shard"], "world": 4}
    before = _held(fresh)
    result["other_world"] = attempt(lambda: fresh.load_state_dict(other_world))
    result["other_world_unchanged"] = _same(_held(fresh), before)
    unsharded = polyak.EMA(even_net(), decay=DECAY)
    result["into_unsharded"] = attempt(lambda: unsharded.load_state_dict(own))
    return result


def dtensor_job(rank: int, world: int, out: Path) -> dict[str, Any]:
    """An FSDP2 average saved by DCP on 2 ranks loads resharded on 1 rank (each rank alone on a mesh of its own);
    that 1-rank state, handed straight to the 2-rank averager, is refused with nothing changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def sharded(mesh: Any) -> nn.Module:
        model = even_net()
        fully_shard(model, mesh=mesh)
        return model

    pair = init_device_mesh("cpu", (world, 1), mesh_dim_names=("pair", "alone"))
    model = sharded(pair["pair"])
    ema = polyak.EMA(model, decay=DECAY)
    iterates = []  # the parameters after each move, gathered by torch: the reference averages these
    for step in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(step + 1)  # local shards, in place: every rank moves its own part
        iterates.append({k: v.full_tensor() for k, v in model.named_parameters()})
        ema.update()
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=out / "dcp")

    alone = polyak.EMA(sharded(pair["alone"]), decay=DECAY)
    state = {"ema": alone.state_dict()}
    dcp.load(state, checkpoint_id=out / "dcp", process_group=pair["alone"].get_group())
    alone.load_state_dict(state["ema"])
    result: dict[str, Any] = {"iterates": iterates, "alone": _held(alone)[0], "alone_step": alone.step}
    result["alone_placements"] = {
        k: (v.device_mesh.size(), str(v.placements)) for k, v in alone.shadow.tensors().items()
    }

    other = polyak.EMA(sharded(pair["pair"]), decay=DECAY)
    before = _held(other)
    result["other_mesh"] = attempt(lambda: other.load_state_dict(alone.state_dict()))
    result["other_mesh_unchanged"] = _same(_held(other), before)
    return result
