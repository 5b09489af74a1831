"""nonfinite= under FSDP2 on 2 gloo ranks: a bad value in one rank's shard is judged the same on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import polyak

from .harness import launch


def sharded_job(rank: int, world: int, out: Path) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    skip = polyak.EMA(model, decay=0.9, nonfinite="skip")
    strict = polyak.EMA(model, decay=0.9, nonfinite="raise")
    skip.update()
    strict.update()
    weight = model[0].weight.to_local()  # rows 0-2 on rank 0, rows 3-4 on rank 1
    with torch.no_grad():
        if rank == 0:
            weight[1, 2] = float("inf")
        else:
            weight.mul_(1e30)  # huge but finite on the other rank
    skip.update()
    try:
        strict.update()
        message = ""
    except RuntimeError as error:
        message = str(error)
    return {"skipped": skip.skipped_updates, "message": message, "strict_updates": strict.num_updates}


def test_a_bad_shard_is_refused_or_skipped_on_every_rank(tmp_path):
    ranks = launch(sharded_job, tmp_path)
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert [r["strict_updates"] for r in ranks] == [1, 1]
    assert "model tensor '0.weight' holds inf or NaN" in ranks[0]["message"]
    assert "holds inf or NaN on another rank" in ranks[1]["message"]
