"""The ZeRO-3 data adapter on one process, with parameters laid out as DeepSpeed lays them out (world size 1):
the shadow averages the partition without its padding, and refuses partitions it cannot read.

The real thing, 2 ranks under DeepSpeed, is tests/distributed/test_zero.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak
import polyak.storage.zero3  # the tests patch it; the storage registry imports it only on first use

partition_parameters = pytest.importorskip("deepspeed.runtime.zero.partition_parameters")
Status = partition_parameters.ZeroParamStatus


def _partitioned(full: torch.Tensor, padding: int = 0, **extra: object) -> nn.Parameter:
    """A placeholder parameter whose data is ``ds_tensor`` (``full`` flattened, then ``padding`` junk values)."""
    p = nn.Parameter(torch.empty(0))
    p.ds_numel, p.ds_shape, p.ds_id, p.ds_persist = full.numel(), full.shape, 0, False
    p.ds_status = Status.NOT_AVAILABLE
    p.ds_tensor = torch.cat([full.reshape(-1), torch.full((padding,), float("nan"))])
    for key, value in extra.items():
        setattr(p.ds_tensor, key, value)
    return p


def _model(**extra: object) -> nn.Module:
    model = nn.Linear(3, 2)
    model.weight = _partitioned(torch.arange(6.0).reshape(2, 3), **extra)
    return model


def test_average_of_partition_skips_padding_and_updates_in_place(monkeypatch):
    # As rank 1 of 2: 6 elements split 3/3; a bias of 3 elements split 2/1, so rank 1 holds 1 value and 1 of padding.
    monkeypatch.setattr(polyak.storage.zero3.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(polyak.storage.zero3.dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(polyak.storage.zero3.dist, "get_world_size", lambda group=None: 2)
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].weight = _partitioned(torch.arange(3.0, 6.0))
    model[0].weight.ds_numel, model[0].weight.ds_shape = 6, (2, 3)
    model[0].bias = _partitioned(torch.tensor([7.0]), padding=1)
    model[0].bias.ds_numel, model[0].bias.ds_shape = 3, (3,)
    ema = polyak.EMA(model, decay=0.5)
    assert {k: tuple(v.shape) for k, v in ema.shadow.tensors().items()} == {"0.weight": (3,), "0.bias": (1,)}
    data = [model[0].weight.ds_tensor, model[0].bias.ds_tensor[:1]]
    torch._foreach_add_(data, 2.0)
    ema.update(model)  # the first update copies
    torch._foreach_add_(data, 2.0)
    ema.update(model)
    assert torch.equal(ema.shadow.tensors()["0.weight"], torch.arange(3.0, 6.0) + 3)
    assert torch.equal(ema.shadow.tensors()["0.bias"], torch.tensor([10.0]))
    with ema.swapped(model):
        assert torch.equal(model[0].bias.ds_tensor[:1], torch.tensor([10.0]))
    assert torch.equal(model[0].bias.ds_tensor[:1], torch.tensor([11.0]))
    assert model[0].bias.ds_tensor[1:].isnan().all()  # the padding is never read nor written


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"final_location": "OffloadDeviceEnum.nvme"}, "NVMe"),
        ({"ds_quant_scale": torch.ones(1)}, "quantized"),
    ],
)
def test_unreadable_partitions_are_refused(extra, message):
    with pytest.raises(RuntimeError, match=message):
        polyak.EMA(_model(**extra), decay=0.9)


def test_partition_of_the_wrong_size_or_in_flight_is_refused():
    model = _model()
    model.weight.ds_tensor = torch.zeros(4)  # 6 elements on one rank need a partition of 6
    with pytest.raises(RuntimeError, match=r"partition of shape \(4,\), expected \(6,\)"):
        polyak.EMA(model, decay=0.9)
    model = _model()
    model.weight.ds_status = Status.INFLIGHT
    with pytest.raises(RuntimeError, match="being gathered"):
        polyak.EMA(model, decay=0.9)


def test_state_of_another_partitioning_does_not_load():
    ema = polyak.EMA(_model(), decay=0.9)
    other = _model()
    other.weight = _partitioned(torch.zeros(2, 2))
    state = polyak.EMA(nn.Linear(3, 2), decay=0.9).state_dict()  # whole tensors, not this partition
    with pytest.raises(ValueError, match="has shape"):
        ema.load_state_dict(state)
    with pytest.raises(ValueError, match="shape"):
        ema.update(other)


def test_copies_of_a_partitioned_model_are_refused():
    model = _model()
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        polyak.swa_utils.AveragedModel(model)
    ema = polyak.EMA(model, decay=0.9)
    ema.update(model)
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        ema.averaged_model()
