"""update_bn(weighting="sample") on 2 gloo ranks with unequal batch sizes and counts: the pooled statistics are
those of every rank's samples together, as one process computes them in float64."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyak import update_bn

from .harness import launch

SIZES = {0: [3, 7], 1: [9, 2, 5]}  # batch sizes per rank: unequal counts and sizes


def net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3), nn.BatchNorm1d(3)).to(dtype)


def batches(rank: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(n, 4, generator=generator) * (1 + rank) + rank).to(dtype) for n in SIZES[rank]]


def sample_weighted_job(rank: int, world: int, out: Path) -> dict[str, Any]:
    model = net()
    update_bn(batches(rank), model, weighting="sample")  # pools across ranks by default
    return {name: value.clone() for name, value in model.named_buffers()}


def test_sample_weighting_pools_every_ranks_samples(tmp_path):
    ranks = launch(sample_weighted_job, tmp_path)
    everything = [x for rank in SIZES for x in batches(rank, torch.float64)]
    reference = net(torch.float64)
    update_bn(everything, reference, weighting="sample")
    dataset_mean = torch.cat(everything).mean(0)  # the first layer sees its input only through Linear(4, 5)
    first = reference[0](torch.cat(everything)).mean(0)
    torch.testing.assert_close(reference[1].running_mean, first, rtol=1e-10, atol=1e-10)
    assert dataset_mean.shape == (4,)
    for r in ranks:
        for name, expected in reference.named_buffers():
            if expected.is_floating_point():
                torch.testing.assert_close(r[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank ends with the same statistics
