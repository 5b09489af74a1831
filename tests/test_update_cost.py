"""What one update costs, counted at the ATen dispatcher: no host syncs, no allocations, few kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from models import FrozenBackbone, SmallCNN, TinyTransformer
from torch import nn

from polyak import EMA, flatten_parameters
from polyak.commands.bench import Census


def census_of_updates(ema: EMA, calls: int = 1) -> Census:
    ema.update()  # the first update copies and builds the plan
    ema.update()
    with Census() as census:
        for _ in range(calls):
            ema.update()
    return census


def bf16(model: nn.Module) -> nn.Module:
    return model.to(torch.bfloat16)


def flat(model: nn.Module) -> nn.Module:
    flatten_parameters(model)
    return model


@pytest.mark.parametrize("factory", [SmallCNN, TinyTransformer, FrozenBackbone])
@pytest.mark.parametrize("variant", [lambda m: m, bf16, flat], ids=["fp32", "bf16", "flat"])
def test_no_sync_no_allocation(factory, variant):
    model = variant(factory())
    census = census_of_updates(EMA(model, decay=0.99))
    assert census.syncs == 0
    assert census.allocated == 0
    assert 0 < census.ops <= 3


def test_cpu_shadow_and_tensor_weight():
    model = SmallCNN()
    assert census_of_updates(EMA(model, decay=0.99, device="cpu")).allocated == 0
    shadow, reference = EMA(model, decay=0.99).shadow, EMA(model, decay=0.99).shadow
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    weight = torch.tensor(0.25)  # a 0-d weight on the shadow's device: still no sync
    with Census() as census:
        shadow.update(model, weight)
        shadow.update(model, weight)
    assert census.syncs == 0 and census.allocated == 0
    reference.update(model, 0.25)
    reference.update(model, 0.25)
    for name, value in shadow.tensors().items():
        assert torch.equal(value, reference.tensors()[name]), name


def test_update_every_costs_one_update_per_k_calls():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(50)])
    every = census_of_updates(EMA(model, decay=0.99, update_every=4), calls=8)
    once = census_of_updates(EMA(copy.deepcopy(model), decay=0.99))
    assert every.ops == 2 * once.ops


def test_offload_double_buffering_on_cpu(monkeypatch):
    """The overlapped offload schedule (copy batch b+1, then lerp batch b), run with a CPU stand-in for the GPU."""
    monkeypatch.setattr("polyak.kernels.CHUNK", 64)
    monkeypatch.setattr("polyak.kernels._offloaded", lambda shadow, model: True)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 3), nn.Linear(3, 1)).to(torch.bfloat16)
    ema, reference = EMA(model, decay=0.5), EMA(copy.deepcopy(model), decay=0.5, dtype=torch.float64)
    fold = ema.shadow._plan.kernels(False)[0]
    assert len(fold.scratches) == 2 and len(fold.batches) > 4
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.model.parameters(), strict=True):
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
                q.copy_(p)
        ema.update()
        reference.update()
    for name, value in ema.shadow.tensors().items():
        torch.testing.assert_close(value.double(), reference.shadow.tensors()[name], msg=name)
