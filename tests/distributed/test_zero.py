"""DeepSpeed ZeRO on 2 CPU ranks (gloo): the average of ZeRO-3 partitions, without a gather, equals the float64
EMA of the gathered parameters; swaps, copies, per-rank states and the full export; ZeRO-2 and FSDP1."""

from __future__ import annotations

import pytest
import torch

from .harness import launch

pytest.importorskip("deepspeed")

from .zero_workers import DECAY, STEPS, zero_job


def _reference(seen: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The float64 EMA of the gathered parameters recorded after each step (the first update copies)."""
    average: dict[str, torch.Tensor] = {}
    for step, params in enumerate(seen):
        for name, p in params.items():
            p = p.double()
            average[name] = p if step == 0 else DECAY * average[name] + (1 - DECAY) * p
    return average


def _check_run(ranks: list[dict], bf16: bool) -> dict[str, torch.Tensor]:
    r0, r1 = ranks
    assert len(r0["seen"]) == STEPS
    reference = _reference(r0["seen"])
    for r in ranks:
        assert r["update_collectives"] == []  # an update reads local partitions only
        assert r["control_collectives"]  # ... and the counter does see the gathers
        assert set(r["average_dtypes"].values()) == {"torch.float32"}  # never below float32, bf16 model included
        for name in r["ema_partitions"]:  # from the engine or from engine.module: the same average
            assert torch.equal(r["ema_partitions"][name], r["of_module_partitions"][name]), name
            assert torch.equal(r["ema_partitions"][name], r["resumed_partitions"][name]), name  # resumed exactly
        assert all(r["restored"].values()), r["restored"]  # training partitions back bit for bit
    for step in range(STEPS):  # the recorded gathered parameters are the same on both ranks
        for name in reference:
            assert torch.equal(r0["seen"][step][name], r1["seen"][step][name])

    # The full average, gathered from the partitions on rank 0, is the float64 reference.
    full = r0["full"]
    assert r1["full"] == {}
    assert set(full) == set(reference)
    for name, expected in reference.items():
        assert full[name].dtype == torch.float32
        torch.testing.assert_close(full[name].double(), expected, rtol=1e-5, atol=1e-6)

    # Inside swapped() the gathered parameters hold the average (in the model's dtype); the forward uses it.
    model_dtype = torch.bfloat16 if bf16 else torch.float32
    for r in ranks:
        for name in reference:
            assert torch.equal(r["swapped_params"][name], full[name].to(model_dtype)), name
            assert torch.equal(r["copied_params"][name], full[name].to(model_dtype)), name
            if "copied_after_repartition" in r:
                assert torch.equal(r["copied_after_repartition"][name], full[name].to(model_dtype)), name
        assert not torch.equal(r["swapped_out"], r["trained_out"])
        assert torch.equal(r["restored_out"], r["trained_out"])
    return reference


def _swapped_forward_matches(r: dict, reference: dict[str, torch.Tensor], bf16: bool) -> None:
    """The evaluation output inside swapped() is the network run with the reference average."""
    from .zero_workers import batch, net

    model = net()
    dtype = torch.bfloat16 if bf16 else torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in reference.items()})
    expected = model.to(dtype)(batch(99, 0)[0].to(dtype)).float()
    torch.testing.assert_close(r["swapped_out"], expected, rtol=2e-2 if bf16 else 1e-5, atol=1e-2 if bf16 else 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_zero3_average_of_partitions(tmp_path, bf16):
    ranks = launch(zero_job, tmp_path, stage=3, bf16=bf16)
    r0, r1 = ranks
    assert r0["persist"] == {"0.weight": False, "0.bias": True, "2.weight": False, "2.bias": False,
                             "4.weight": False, "4.bias": True}  # fmt: skip
    assert "being gathered" in r0["inflight_error"]
    reference = _check_run(ranks, bf16)
    _swapped_forward_matches(r0, reference, bf16)
    # Each rank stores its partition, the valid elements only (not the padding of the last one), also of the
    # parameters DeepSpeed keeps whole: it keeps their partitions current and re-partitions them at times.
    for name, expected in reference.items():
        local = [r["ema_partitions"][name] for r in ranks]
        assert sum(t.numel() for t in local) == expected.numel()
        torch.testing.assert_close(torch.cat(local).double(), expected.flatten(), rtol=1e-5, atol=1e-6)
    assert r0["local_bytes"] + r1["local_bytes"] == r0["full_bytes"]
    for r in ranks:  # a partitioned model cannot be deep-copied: a clear error, not a copy of placeholders
        assert "cannot build an averaged model" in r["averaged_model_error"]
    for r in ranks:  # a NaN in rank 1's partition only: both ranks skip, after one all-reduce
        assert r["skipped_updates"] == 1
        assert len(r["skip_collectives"]) >= 1 and all("allreduce" in c.replace("_", "") for c in r["skip_collectives"])
    for r in ranks:  # the first update copies: the average holds the moved partition's values (no padding)
        average, partition = r["moved"]
        assert torch.equal(average, partition[: average.numel()].float())
    for r in ranks:  # a state is per rank: the other rank's partitions do not load
        assert "holds the part" in r["other_rank_state"], r["other_rank_state"]


def test_zero2_whole_parameters_and_fsdp1_refused(tmp_path):
    ranks = launch(zero_job, tmp_path, stage=2, bf16=False)
    reference = _check_run(ranks, bf16=False)
    _swapped_forward_matches(ranks[0], reference, bf16=False)
    for r in ranks:  # whole parameters: every rank holds the whole average
        for name, expected in reference.items():
            assert r["ema_partitions"][name].shape == expected.shape
        assert "FSDP1" in r["fsdp1_error"] and "fully_shard" in r["fsdp1_error"]


@pytest.mark.slow
def test_transformers_trainer_under_zero3(tmp_path):
    transformers = pytest.importorskip("transformers")
    from polyak.integrations.transformers import AVERAGED_DIR

    from .zero_workers import TRAINER_STEPS, Tokens, trainer_job

    r0, r1 = launch(trainer_job, tmp_path, timeout=300)
    first, resumed = r0["first"], r0["resumed"]
    seen = [first["seen"][step] for step in range(1, TRAINER_STEPS + 1)]
    reference = _reference(seen)
    at_two = _reference(seen[:2])
    # The callback's average, gathered from the partitions, is the float64 EMA of the gathered parameters.
    assert set(first["full"]) >= set(reference)
    for name, expected in reference.items():
        torch.testing.assert_close(first["full"][name].double(), expected, rtol=1e-5, atol=1e-6)
    # checkpoint-N/averaged/ is a consolidated model that from_pretrained loads; it holds the average at N.
    for step, expected_state in ((2, at_two), (TRAINER_STEPS, reference)):
        loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf" / f"checkpoint-{step}" / AVERAGED_DIR)
        for name, p in loaded.named_parameters():
            torch.testing.assert_close(p.double(), expected_state[name], rtol=1e-5, atol=1e-6)
        if step == 2:  # eval_loss_ema at step 2 is the average's loss: the loaded model's, by the Trainer's count
            args = transformers.TrainingArguments(str(tmp_path / "eval"), use_cpu=True, report_to="none")
            loss = transformers.Trainer(model=loaded, args=args).evaluate(Tokens(4, seed=1))["eval_loss"]
            torch.testing.assert_close(first["eval_loss"][2], loss, rtol=1e-5, atol=1e-6)
    # Resumed from checkpoint-2 on the same world size: the same training and the same average, bit for bit.
    for step in (3, 4):
        for name in reference:
            assert torch.equal(resumed["seen"][step][name], first["seen"][step][name]), (step, name)
    for name in first["full"]:
        assert torch.equal(resumed["full"][name], first["full"][name]), name
    assert r1["first"]["full"] == {}
