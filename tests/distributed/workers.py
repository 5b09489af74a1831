"""What each rank runs (importable by spawned children), and the models and data the parent's reference shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import polyak
from polyak.distributed import all_reduce_batchnorm_stats, full_state_dict, sync_buffers

from .harness import count_collectives

DECAY = 0.8
STEPS = 6
SAVE_AT = 3  # the checkpoint of the FSDP2 run is taken after this many steps
BATCH = 4  # samples per rank and step
LR, MOMENTUM = 0.1, 0.9


def sharded_net(seed: int = 0) -> nn.Module:
    """Uneven shards across 2 ranks: 5 rows split 3/2, and 1 row split 1/0 (an empty shard on rank 1)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))


def batch(step: int, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The data rank ``rank`` trains on at ``step``; the reference concatenates the ranks'."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, 6, generator=g)
    return x.to(dtype), torch.sin(x.sum(1, keepdim=True)).to(dtype)


def global_batch(step: int, world: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(batch(step, r, dtype) for r in range(world)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def norm_data(rank: int) -> torch.Tensor:
    """Different sample counts per rank, different means: exercises the between-rank variance."""
    g = torch.Generator().manual_seed(77 + rank)
    return torch.randn(7 + 5 * rank, 3, generator=g, dtype=torch.float64) * (1 + rank) + 3 * rank


def bn_loader(rank: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Rank r has 2 + r batches of inputs (unequal counts across ranks)."""
    return [batch(100 + 10 * rank + i, rank, dtype)[0] * (1 + rank) for i in range(2 + rank)]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int) -> None:
    x, y = batch(step, rank)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's data of a state: local shards of DTensors, clones of the rest."""
    return {k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


# ---------------------------------------------------------------------- DDP


def ddp_job(rank: int, world: int, out: Path) -> dict[str, Any]:
    model = bn_net()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    of_wrapper = polyak.EMA(ddp, decay=DECAY)  # made from the DDP wrapper ...
    of_module = polyak.EMA(ddp.module, decay=DECAY)  # ... and from the module inside: the same average
    synced = polyak.EMA(ddp.module, decay=DECAY)  # buffers made identical across ranks before each update
    calls: list[str] = []
    buffers_seen = []
    for step in range(STEPS):
        _train_step(ddp, optimizer, step, rank)
        with count_collectives() as during:
            of_wrapper.update(ddp)
            of_module.update(ddp.module)
        calls += during
        buffers_seen.append({k: v.clone() for k, v in model.named_buffers() if v.is_floating_point()})
        sync_buffers(ddp)
        synced.update()
    with count_collectives() as control:  # the counter does see collectives
        sync_buffers(ddp)

    # all_reduce_batchnorm_stats: each rank holds the exact statistics of its own samples.
    data = norm_data(rank)
    pooled = {}
    for unbiased in (False, True):
        norm = nn.BatchNorm1d(3)
        norm.running_mean.copy_(data.mean(0))
        norm.running_var.copy_(data.var(0, correction=int(unbiased)))
        norm.num_batches_tracked.fill_(rank + 1)
        all_reduce_batchnorm_stats(nn.Sequential(norm), count=len(data), unbiased=unbiased)
        pooled[unbiased] = {k: v.clone() for k, v in norm.state_dict().items()}

    # update_bn pools across ranks by default: as update_bn over all ranks' batches in one process.
    recomputed = bn_net(seed=3)
    polyak.update_bn(bn_loader(rank), recomputed)

    broadcast_model = bn_net(seed=rank)  # different buffers on each rank until broadcast
    broadcast_model[1].running_mean.normal_()
    sync_buffers(broadcast_model, "broadcast")

    return {
        "of_wrapper": _plain(of_wrapper.state_dict()["shadow"]),
        "of_module": _plain(of_module.state_dict()["shadow"]),
        "synced": _plain(synced.state_dict()["shadow"]),
        "buffers_seen": buffers_seen,
        "update_collectives": calls,
        "control_collectives": control,
        "pooled": pooled,
        "broadcast_buffers": {k: v.clone() for k, v in broadcast_model.named_buffers()},
        "update_bn_pooled": {k: v.clone() for k, v in recomputed.named_buffers()},
    }


# ---------------------------------------------------------------------- FSDP2


def _shard(model: nn.Module, mesh: Any) -> nn.Module:
    """The first two layers get their own FSDP2 unit; the root owns the last one (it stays gathered after an
    evaluation forward, until resharded)."""
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: polyak.EMA) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optimizer_state, "ema": ema.state_dict()}


def fsdp_job(rank: int, world: int, out: Path, single: str) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world,))
    model = _shard(sharded_net(), mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    ema = polyak.EMA(model, decay=DECAY)
    result: dict[str, Any] = {
        "placements": {k: str(v.placements) for k, v in ema.state_dict()["shadow"].items()},
        "local_bytes": sum(v.to_local().nbytes for v in ema.state_dict()["shadow"].values()),
        "full_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    calls: list[str] = []
    iterates = []  # the parameters each step produced, gathered: the reference averages these
    for step in range(STEPS):
        _train_step(model, optimizer, step, rank)
        iterates.append(full_state_dict(dict(model.named_parameters())))
        with count_collectives() as during:
            ema.update(model)
        calls += during
        if step + 1 == SAVE_AT:
            dcp.save(_train_state(model, optimizer, ema), checkpoint_id=out / "ckpt")
            result["full_at_save"] = full_state_dict(ema.state_dict()["shadow"])
    result["update_collectives"] = calls
    result["iterates"] = iterates
    with count_collectives() as control:
        result["full"] = full_state_dict(ema.state_dict()["shadow"])
    result["control_collectives"] = control
    result["full_everywhere"] = full_state_dict(ema.state_dict()["shadow"], rank0_only=False, cpu_offload=False)
    result["shards"] = _plain(ema.state_dict()["shadow"])

    # Evaluate with the averaged weights swapped in; the training shards come back.
    x = batch(99, 0)[0]
    before = _plain(dict(model.named_parameters()))
    with torch.no_grad():
        result["trained_out"] = model(x)  # leaves the root's parameters gathered
        with ema.swapped(model):
            result["swapped_out"] = model(x)
        result["still_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        after = _plain(dict(model.named_parameters()))
        result["restored_out"] = model(x)
    result["restored"] = all(torch.equal(before[k], after[k]) for k in before)
    try:
        ema.averaged_model()
    except RuntimeError as error:
        result["averaged_model_error"] = str(error)

    # Resume from the checkpoint into a fresh, differently initialised model: the same run, bit for bit.
    model2 = _shard(sharded_net(seed=1), mesh)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=LR, momentum=MOMENTUM)
    ema2 = polyak.EMA(model2, decay=DECAY)
    state = _train_state(model2, optimizer2, ema2)
    dcp.load(state, checkpoint_id=out / "ckpt")
    set_state_dict(model2, optimizer2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema2.load_state_dict(state["ema"])
    for step in range(SAVE_AT, STEPS):
        _train_step(model2, optimizer2, step, rank)
        ema2.update(model2)
    result["resumed_shards"] = _plain(ema2.state_dict()["shadow"])
    result["resumed_step"] = ema2.step

    # A checkpoint written by one process (no process group) loads resharded, by DCP or as full tensors.
    from_dcp = polyak.EMA(_shard(sharded_net(seed=2), mesh), decay=DECAY)
    state = {"ema": from_dcp.state_dict()}
    dcp.load(state, checkpoint_id=f"{single}/dcp")
    from_dcp.load_state_dict(state["ema"])
    result["single_via_dcp"] = full_state_dict(from_dcp.state_dict()["shadow"])
    from_full = polyak.EMA(_shard(sharded_net(seed=3), mesh), decay=DECAY)
    from_full.load_state_dict(torch.load(f"{single}/full.pt", weights_only=False))
    result["single_via_full"] = full_state_dict(from_full.state_dict()["shadow"])
    result["single_local"] = _plain(from_full.state_dict()["shadow"])

    # An update right after an evaluation forward, while the root's parameters are gathered, reads the shards.
    with torch.no_grad():
        model(x)
        result["gathered_before_update"] = not isinstance(model[4].weight, DTensor)
        ema.update(model)
    trained = _plain(dict(model.named_parameters()))  # sharded again
    result["update_after_eval"] = _plain(ema.state_dict()["shadow"])
    result["update_after_eval_expected"] = {k: v.lerp(trained[k], 1 - DECAY) for k, v in result["shards"].items()}
    # model.to() gives the same DTensor parameters new local tensors (swap_tensors): the average follows them.
    model.to(torch.float64).to(torch.float32)
    _train_step(model, optimizer, STEPS, rank)
    previous = _plain(ema.state_dict()["shadow"])
    ema.update(model)
    trained = _plain(dict(model.named_parameters()))
    result["update_after_to"] = _plain(ema.state_dict()["shadow"])
    result["update_after_to_expected"] = {k: v.lerp(trained[k], 1 - DECAY) for k, v in previous.items()}
    try:
        ema.update(sharded_net())  # the same names and shapes, but not sharded
    except ValueError as error:
        result["plain_model_error"] = str(error)

    # Other DTensor layouts (tensor parallel style): a Shard(1) weight and a replicated bias.
    torch.manual_seed(7)
    layer = nn.Linear(5, 3)
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(1)]))
    layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Replicate()]))
    tp_ema = polyak.EMA(layer, decay=DECAY)
    for k in range(3):
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(0.5).add_(k)
        with count_collectives() as during:
            tp_ema.update(layer)
        result["update_collectives"] += during
    result["tp_placements"] = {k: str(v.placements) for k, v in tp_ema.state_dict()["shadow"].items()}
    result["tp_full"] = full_state_dict(tp_ema.state_dict()["shadow"])

    # nonfinite="skip": a NaN in rank 1's shard only makes every rank skip the update (the flag is all-reduced).
    guarded = polyak.EMA(model, decay=DECAY, nonfinite="skip")
    guarded.update(model)
    _train_step(model, optimizer, STEPS + 1, rank)
    before_skip = _plain(guarded.state_dict()["shadow"])
    if rank == 1:
        with torch.no_grad():
            model[0].weight.to_local().view(-1)[0] = float("nan")
    guarded.update(model)
    after_skip = _plain(guarded.state_dict()["shadow"])
    result["skip_kept_average"] = all(torch.equal(before_skip[k], after_skip[k]) for k in before_skip)
    result["skipped_updates"] = guarded.skipped_updates
    return result
