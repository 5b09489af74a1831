"""Flat parameters: layout, single-kernel updates, and the fall-back when the layout is broken."""

from __future__ import annotations

import copy

import pytest
import torch
from models import SmallCNN, TinyTransformer, train_steps
from opcount import OpCounter
from torch import nn

from polyak import EMA, Shadow, flatten_parameters


@pytest.mark.parametrize("factory", [SmallCNN, TinyTransformer])
def test_layout_keeps_objects_values_and_training(factory):
    torch.manual_seed(0)
    model = factory()
    twin = copy.deepcopy(model)
    params = list(model.parameters())
    flats = flatten_parameters(model)
    assert list(model.parameters()) == params  # same objects: an optimizer built before still works
    assert {dtype for _, dtype in flats} == {torch.float32, torch.int64} if factory is SmallCNN else {torch.float32}
    for (name, value), (_, expected) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name
    storage = flats[(torch.device("cpu"), torch.float32)].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p in model.parameters())
    for m in (model, twin):
        train_steps(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), 3)
    for (name, value), (_, expected) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        torch.testing.assert_close(value, expected, msg=name)


def update_ops(shadow: Shadow, model: nn.Module) -> list[str]:
    shadow.update(model, 0.5)  # build the cached plan
    with OpCounter() as counter:
        shadow.update(model, 0.5)
    return counter.ops


def test_flat_model_updates_with_one_kernel_per_group():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(300)])
    flatten_parameters(model)
    shadow = Shadow(model)
    assert update_ops(shadow, model) == ["aten._foreach_lerp_.Scalar"]
    assert shadow._plan is not None and [len(f.pairs[0]) for f in shadow._plan.kernels(False)] == [1]  # one flat
    cnn = SmallCNN()
    flatten_parameters(cnn)
    shadow = Shadow(cnn)
    # one lerp for parameters and float buffers, one copy for the integer counters
    assert update_ops(shadow, cnn) == ["aten._foreach_lerp_.Scalar", "aten._foreach_copy_.default"]
    assert shadow._plan is not None and len(shadow._plan.kernels(False)[0].pairs[0]) == 1
    assert [len(stored) for stored, _ in shadow._plan.copies] == [1]


def test_flat_bf16_model_is_staged_with_one_copy_per_batch():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(300)]).to(torch.bfloat16)
    flatten_parameters(model)
    assert update_ops(Shadow(model), model) == ["aten.copy_.default", "aten.lerp_.Scalar"]


def test_frozen_tensors_split_the_run_but_stay_correct():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].requires_grad_(False)  # copied, not averaged: the averaged run has a gap
    flatten_parameters(model)
    shadow = Shadow(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in shadow.tensors().items()}
    shadow.update(model, 0.25)
    for name, p in model.named_parameters():
        expected = p.detach() if name.startswith("1.") else before[name] + 0.25 * (p.detach() - before[name])
        torch.testing.assert_close(shadow.tensors()[name], expected, msg=name)


@pytest.mark.parametrize(
    "breaks",
    [
        lambda m: m.to(torch.float64),
        lambda m: setattr(m[1].weight, "data", m[1].weight.detach().clone()),
        lambda m: None,  # no change: still flat
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_broken_layout_falls_back_correctly(breaks, dtype, monkeypatch):
    monkeypatch.setattr("polyak.kernels.CHUNK", 16)  # bf16: staged in several batches, some across tensors
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).to(dtype)
    flatten_parameters(model)
    ema = EMA(model, decay=0.5)
    ema.update()
    breaks(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    before = {k: v.clone() for k, v in ema.shadow.tensors().items()}
    ema.update()
    for name, value in ema.shadow.tensors().items():
        torch.testing.assert_close(value, (before[name] + 2.0) / 2, msg=name)


@pytest.mark.parametrize(("dtype", "nonfinite"), [(torch.bfloat16, "propagate"), (torch.float32, "skip")])
def test_flat_model_staged_in_chunks_that_start_inside_a_tensor_matches_float64(dtype, nonfinite, monkeypatch):
    """A flat model staged in chunks of 16 elements (a bf16 model cast, or a guarded float32 one): chunks that
    start inside a tensor and run on over the next ones are read as one range from that point. Every element
    differs, so a range read from the wrong place shows; the average follows a float64 EMA of the model."""
    monkeypatch.setattr("polyak.kernels.CHUNK", 16)  # the second chunk: the first weight's last 4, the bias
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)).to(dtype)  # 20 (16 + 4), 5, 10, 2 elements
    flatten_parameters(model)
    shadow = Shadow(model, nonfinite=nonfinite)
    reference = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(dtype))
        shadow.update(model, 0.25)
        for n, p in model.named_parameters():
            reference[n] += 0.25 * (p.detach().double() - reference[n])
    for name, value in shadow.tensors().items():
        torch.testing.assert_close(value.double(), reference[name], rtol=1e-6, atol=1e-6, msg=name)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="model must be a torch"):
        flatten_parameters([torch.zeros(2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cannot flatten 1\.weight: it is a UninitializedParameter"):
        flatten_parameters(nn.Sequential(nn.Linear(2, 2), nn.LazyLinear(3)))


@pytest.mark.parametrize("offload_stand_in", [False, True])
def test_flat_model_with_nonfinite_skip(offload_stand_in, monkeypatch):
    """A skipped update keeps the average bit for bit through merged runs and the double-buffered schedule."""
    monkeypatch.setattr("polyak.kernels.CHUNK", 16)
    if offload_stand_in:
        monkeypatch.setattr("polyak.kernels._offloaded", lambda shadow, model: True)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    flatten_parameters(model)
    ema = EMA(model, decay=0.5, nonfinite="skip")
    ema.update()
    before = {k: v.clone() for k, v in ema.shadow.tensors().items()}
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    ema.update()
    for name, value in ema.shadow.tensors().items():
        assert torch.equal(value, before[name]), name
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    ema.update()
    for name, value in ema.shadow.tensors().items():
        torch.testing.assert_close(value, (before[name] + 3.0) / 2, msg=name)
