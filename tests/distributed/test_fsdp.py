"""FSDP2 on 2 CPU ranks: the average stays sharded, updates without collectives, checkpoints and reshards."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import polyak

from .harness import launch
from .workers import DECAY, SAVE_AT, STEPS, batch, fsdp_job, sharded_net

# DCP in the parent process (no process group) says it assumes a single process: that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _reference(iterates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The float64 EMA of the parameters the ranks' training actually produced (gathered after each step).

    Built from the iterates rather than from a float64 re-run of the training, so that it holds on every torch
    version: on torch 2.8, FSDP2 on CPU sums the gradients across ranks instead of averaging them.
    """
    average: dict[str, torch.Tensor] = {}
    for step, params in enumerate(iterates):
        for name, p in params.items():
            p = p.double()
            average[name] = p.clone() if step == 0 else DECAY * average[name] + (1 - DECAY) * p
    return average


def _close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)


def _equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7),
    reason="torch 2.6's FSDP2 all-gather fails on CPU ('Stream' object has no attribute 'record_event')",
)
def test_fsdp2_sharded_average(tmp_path):
    # A checkpoint from a single process, to be loaded by the 2 ranks.
    single = polyak.EMA(sharded_net(seed=5), decay=DECAY)
    with torch.no_grad():
        for p in single.model.parameters():
            p.mul_(-2)
    single.update()
    (tmp_path / "single").mkdir()
    dcp.save({"ema": single.state_dict()}, checkpoint_id=tmp_path / "single" / "dcp")
    torch.save(single.state_dict(), tmp_path / "single" / "full.pt")

    ranks = launch(fsdp_job, tmp_path / "run", single=str(tmp_path / "single"))
    r0, r1 = ranks
    assert r1["iterates"] == [{}] * STEPS  # gathered on rank 0 only
    reference = _reference(r0["iterates"])

    for r in ranks:
        assert set(r["placements"].values()) == {"(Shard(dim=0),)"}
        assert r["update_collectives"] == []  # no collective per update
        assert r["control_collectives"]  # ... though the counter sees the gather
        assert 0 < r["local_bytes"] < r["full_bytes"]
        assert r["restored"] and r["still_sharded"]
        assert torch.equal(r["restored_out"], r["trained_out"])
        assert "swapped(model)" in r["averaged_model_error"] and "full_state_dict" in r["averaged_model_error"]
        assert "'0.weight'" in r["plain_model_error"] and "DTensor" in r["plain_model_error"]
        assert r["gathered_before_update"]
        for case in ("update_after_eval", "update_after_to"):
            for name, value in r[f"{case}_expected"].items():
                torch.testing.assert_close(r[case][name], value, rtol=1e-6, atol=1e-7, msg=f"{case}: {name}")
        _equal(r["resumed_shards"], r["shards"])  # resumed from DCP: bit for bit
        assert r["resumed_step"] == STEPS
        assert r["skip_kept_average"] and r["skipped_updates"] == 1  # NaN on rank 1 only: both ranks skip
    assert r0["local_bytes"] + r1["local_bytes"] == r0["full_bytes"]  # each rank stores its share only
    assert r1["shards"]["4.weight"].shape == (0, 16)  # an empty shard

    # The gathered average (rank 0 only) against the float64 reference.
    assert r1["full"] == {} and r1["full_at_save"] == {}
    _close(r0["full"], reference)
    for r in ranks:
        _equal(r["full_everywhere"], r0["full"])
    _close(r0["full_at_save"], _reference(r0["iterates"][:SAVE_AT]))
    for name, full in r0["full"].items():  # the shards are the rows of the full tensor
        assert torch.equal(torch.cat([r0["shards"][name], r1["shards"][name]]), full), name

    # Evaluation with the average swapped in matches the reference model holding the reference average.
    model = sharded_net().double()
    model.load_state_dict(reference)
    with torch.no_grad():
        expected = model(batch(99, 0, torch.float64)[0])
    for r in ranks:
        torch.testing.assert_close(r["swapped_out"].double(), expected, rtol=1e-5, atol=1e-6)

    # 1 -> 2 ranks: a single-process checkpoint, by DCP or as full tensors, reshards on load.
    single_tensors = single.shadow.tensors()
    _equal(r0["single_via_dcp"], single_tensors)
    _equal(r0["single_via_full"], single_tensors)
    for name, full in single_tensors.items():
        assert torch.equal(torch.cat([r0["single_local"][name], r1["single_local"][name]]), full), name

    # Shard(1) and Replicate() DTensors: the gathered average against float64 arithmetic on the full tensors.
    assert r0["tp_placements"] == {"weight": "(Shard(dim=1),)", "bias": "(Replicate(),)"}
    torch.manual_seed(7)
    layer = nn.Linear(5, 3).double()
    tp_expected: dict[str, torch.Tensor] = {}
    for k in range(3):
        for name, p in layer.named_parameters():
            p.data = p.data * 0.5 + k
            tp_expected[name] = p.data.clone() if k == 0 else DECAY * tp_expected[name] + (1 - DECAY) * p.data
    _close(r0["tp_full"], tp_expected)

    # 2 -> 1: the sharded checkpoint loads into a single process without a process group.
    plain = polyak.EMA(sharded_net(seed=4), decay=DECAY)
    state = {"ema": plain.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path / "run" / "ckpt")
    plain.load_state_dict(state["ema"])
    _equal(plain.shadow.tensors(), r0["full_at_save"])
    assert plain.step == SAVE_AT
