"""DDP on 2 CPU ranks (gloo): the average of the parameters agrees across ranks and with a float64 reference."""

from __future__ import annotations

import torch
from torch import nn

from polyak import update_bn

from .harness import launch
from .workers import DECAY, LR, MOMENTUM, STEPS, batch, bn_loader, bn_net, ddp_job, norm_data


def _reference(world: int) -> dict[str, torch.Tensor]:
    """The same training in float64 in one process: DDP averages the per-rank gradients, BatchNorm is per rank."""
    model = bn_net().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    average: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        optimizer.zero_grad()
        losses = [nn.functional.mse_loss(model(x), y) for x, y in (batch(step, r, torch.float64) for r in range(world))]
        (sum(losses) / world).backward()
        optimizer.step()
        for name, p in model.named_parameters():
            average[name] = p.detach().clone() if step == 0 else DECAY * average[name] + (1 - DECAY) * p.detach()
    return average


def test_ddp_average_buffers_and_batchnorm_pooling(tmp_path):
    ranks = launch(ddp_job, tmp_path)
    reference = _reference(len(ranks))

    for r in ranks:
        assert r["update_collectives"] == []  # the update is local
        assert r["control_collectives"]  # ... and the counter does see collectives
        for name in r["of_module"]:  # from DDP or from DDP.module: the same average
            assert torch.equal(r["of_wrapper"][name], r["of_module"][name]), name
        for name, expected in reference.items():
            torch.testing.assert_close(r["of_module"][name].double(), expected, rtol=1e-5, atol=1e-6)

    r0, r1 = ranks
    for name in reference:  # parameters: bitwise identical on every rank
        assert torch.equal(r0["of_module"][name], r1["of_module"][name]), name
    # Buffers left per rank differ; synced ones are identical and average the ranks' statistics.
    assert not torch.equal(r0["of_module"]["1.running_mean"], r1["of_module"]["1.running_mean"])
    for name in r0["synced"]:
        assert torch.equal(r0["synced"][name], r1["synced"][name]), name
    for name in ("1.running_mean", "1.running_var"):
        expected = None
        for step in range(STEPS):
            mean = sum(r["buffers_seen"][step][name].double() for r in ranks) / len(ranks)
            expected = mean if step == 0 else DECAY * expected + (1 - DECAY) * mean
        torch.testing.assert_close(r0["synced"][name].double(), expected, rtol=1e-5, atol=1e-6)

    # Pooled BatchNorm statistics equal those of all ranks' samples together, on every rank.
    data = torch.cat([norm_data(rank) for rank in range(len(ranks))])
    for unbiased in (False, True):
        for r in ranks:
            pooled = r["pooled"][unbiased]
            torch.testing.assert_close(pooled["running_mean"].double(), data.mean(0), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(
                pooled["running_var"].double(), data.var(0, correction=int(unbiased)), rtol=1e-6, atol=1e-6
            )
            assert pooled["num_batches_tracked"].item() == 1 + 2

    # update_bn per rank + pooling (between_ranks=False) = update_bn over every rank's batches, in float64.
    model = bn_net(seed=3).double()
    update_bn([x for rank in range(len(ranks)) for x in bn_loader(rank, torch.float64)], model)
    for r in ranks:
        for name, expected in model.named_buffers():
            actual = r["update_bn_pooled"][name]
            torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=1e-5, atol=1e-6, msg=name)

    for name, value in r0["broadcast_buffers"].items():
        assert torch.equal(value, r1["broadcast_buffers"][name]), name
