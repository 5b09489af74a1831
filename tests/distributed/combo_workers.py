"""What each rank runs for the FSDP2 part of the combination tester (importable by spawned children)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from combo_engine import ComboNet, set_iterate
from combo_fronts import DTYPES, FRONTS
from combo_run import drive
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def sharded_model(case: dict[str, Any], mesh: Any) -> nn.Module:
    """The tester's model, the Linear in an FSDP2 unit of its own and the rest (BatchNorm, frozen, signal) in the
    root's: every parameter a DTensor, sharded unevenly on dim 0 (frozen: 2 and 1 rows)."""
    model = ComboNet().to(DTYPES[case["model_dtype"]])
    set_iterate(model, 0)
    fully_shard(model.lin, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters()), "FSDP2 left a parameter whole"
    return model


def combinations_job(rank: int, world: int, out: Path, cases: list, calls: int) -> dict[str, Any]:
    """Drive every (front end, case) on the sharded model; rank 0's records (gathered tensors) come back."""
    mesh = init_device_mesh("cpu", (world,))
    records = []
    for front, case in cases:
        torch.manual_seed(0)
        record = drive(FRONTS[front], case, make=lambda c: sharded_model(c, mesh), sharded=True, calls=calls)
        records.append(record if rank == 0 else {})
    return {"records": records}
