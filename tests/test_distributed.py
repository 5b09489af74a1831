"""polyak.distributed in a single process: argument checks and the no-process-group behaviour.

The multi-process behaviour (DDP, FSDP2, checkpoints) is tested with real ranks in tests/distributed/.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak
from polyak.distributed import all_reduce_batchnorm_stats, full_state_dict, sync_buffers


def test_helpers_that_need_ranks_say_so_without_a_process_group():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    with pytest.raises(RuntimeError, match="init_process_group"):
        sync_buffers(model)
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_batchnorm_stats(model)


def test_bad_arguments_are_named():
    model = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="op must be 'mean' or 'broadcast', got 'sum'"):
        sync_buffers(model, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"count must be .* > 0; got 0"):
        all_reduce_batchnorm_stats(model, count=0)
    with pytest.raises(ValueError, match="> 1 with unbiased=True; got 1"):
        all_reduce_batchnorm_stats(model, count=1, unbiased=True)
    with pytest.raises(ValueError, match="unbiased=True applies to between_ranks=True only"):
        all_reduce_batchnorm_stats(model, count=5, unbiased=True, between_ranks=False)
    with pytest.raises(TypeError, match="state must be a dict"):
        full_state_dict([torch.zeros(2)])  # type: ignore[arg-type]


def test_full_state_dict_in_one_process_is_the_state_on_the_cpu():
    ema = polyak.EMA(nn.Linear(3, 2), decay=0.9)
    ema.update()
    state = ema.state_dict()
    full = full_state_dict(state)
    assert full.keys() == state.keys() and full["step"] == 1
    for name, tensor in state["shadow"].items():
        assert torch.equal(full["shadow"][name], tensor) and full["shadow"][name].device.type == "cpu"
    assert polyak.distributed is not None  # reachable as polyak.distributed
