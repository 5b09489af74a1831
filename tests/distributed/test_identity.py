"""A sharded state on 2 CPU ranks (gloo) knows which part of the whole it holds (issue 23 item 5).

ZeRO-3: a state records ``{"engine", "rank", "world"}`` under ``"shard"``; loaded on another rank or world size it
is refused in one line on that rank, with nothing changed. FSDP2: DTensor states describe themselves; through
torch.distributed.checkpoint they reshard to another world size, and a DTensor state of another mesh handed
straight to ``load_state_dict`` is refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from .harness import launch
from .identity_workers import DECAY, dtensor_job

TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2])


def test_zero3_state_of_another_rank_or_world_is_refused(tmp_path):
    pytest.importorskip("deepspeed")
    from .identity_workers import zero3_job

    r0, r1 = launch(zero3_job, tmp_path)
    assert r0["shard"] == {"engine": "ZeRO-3", "rank": 0, "world": 2}
    assert r1["shard"] == {"engine": "ZeRO-3", "rank": 1, "world": 2}
    assert r0["shapes"] == r1["shapes"]  # rank 0's state fits rank 1 in every shape ...
    assert r0["rank0_state"] == "loaded" and r0["unchanged"]  # (rank 0 reloads what it holds)
    refused = r1["rank0_state"]  # ... and is refused there, naming both parts, with nothing loaded
    assert "\n" not in refused and r1["unchanged"]
    assert "holds the part {'engine': 'ZeRO-3', 'rank': 0, 'world': 2}" in refused
    assert "this rank holds {'engine': 'ZeRO-3', 'rank': 1, 'world': 2}" in refused
    assert "load the state this rank saved" in refused
    for r in (r0, r1):
        assert r["own_state"] == "loaded" and r["own_state_exact"]  # the right rank's state loads, bit for bit
        assert r["own_lazy_state"] == "loaded"  # ... also into a lazy averager, which pairs before checking
        assert "'world': 4" in r["other_world"] and "\n" not in r["other_world"] and r["other_world_unchanged"]
        assert "holds the part" in r["into_unsharded"] and "not sharded" in r["into_unsharded"]


@pytest.mark.skipif(TORCH < (2, 7), reason="torch 2.6's FSDP2 all-gather fails on CPU")
def test_dtensor_state_reshards_through_dcp_and_another_mesh_is_refused(tmp_path):
    r0, r1 = launch(dtensor_job, tmp_path)
    iterates = r0["iterates"]
    expected = {k: DECAY * iterates[0][k].double() + (1 - DECAY) * iterates[1][k].double() for k in iterates[0]}
    for r in (r0, r1):  # 2 ranks -> 1: each rank alone holds the whole average, resharded by DCP
        assert set(r["alone_placements"].values()) == {(1, "(Shard(dim=0),)")}
        assert r["alone_step"] == 2
        for name, value in expected.items():
            torch.testing.assert_close(r["alone"][name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
        refused = r["other_mesh"]  # a state laid out on another mesh, not through DCP: refused, nothing changed
        assert "\n" not in refused and r["other_mesh_unchanged"]
        assert "'0.weight'" in refused and "torch.distributed.checkpoint" in refused
