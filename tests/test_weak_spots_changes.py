"""Conversions that change a model tensor without replacing the Parameter a plan holds: each must be seen.

``torch.utils.swap_tensors`` on a model tensor (either argument), a dtype change that keeps the storage
(``p.data = p.data.view(dtype)``), a conversion that only replaces buffers (``bn.double()``), a buffer made
non-persistent. Each is made between updates of a real model trained by SGD; the average must then equal a
float64 EMA re-derived from the model's ``state_dict()`` by name (or the change must be refused by name).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak

DECAY = 0.5


class Reference:
    """A float64 EMA of ``model.state_dict()`` by name: the first update copies; integer tensors are copied."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def update(self, model: nn.Module) -> None:
        for name, tensor in model.state_dict().items():
            now = tensor.detach().double() if tensor.is_floating_point() else tensor.detach().clone()
            old = self.values.get(name)
            if old is None or not tensor.is_floating_point():
                self.values[name] = now.clone()
            else:
                self.values[name] = DECAY * old + (1 - DECAY) * now

    def check(self, ema: polyak.EMA, tol: float = 1e-6) -> None:
        got = ema.shadow.tensors()
        assert got, "nothing averaged"
        for name, value in got.items():
            torch.testing.assert_close(value.double(), self.values[name].double(), rtol=tol, atol=tol, msg=name)


def sgd_step(model: nn.Module, seed: int) -> None:
    """One real SGD step on a random regression batch (moves every parameter)."""
    g = torch.Generator().manual_seed(seed)
    first = next(p for p in model.parameters())
    x = torch.randn(5, 3, generator=g).to(first.dtype)
    loss = model(x).float().pow(2).mean()
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def run(model: nn.Module, change, steps: int = 3) -> polyak.EMA:
    """Two updates, the change, then ``steps`` more; the average checked against the reference after each."""
    ema, reference = polyak.EMA(model, decay=DECAY), Reference()
    for i in range(2):
        sgd_step(model, i)
        ema.update()
        reference.update(model)
    change(model)
    for i in range(2, 2 + steps):
        sgd_step(model, i)
        ema.update()
        reference.update(model)
        reference.check(ema)
    return ema


@pytest.mark.parametrize("model_first", [True, False], ids=["model-tensor-first", "model-tensor-second"])
def test_swap_tensors_on_a_model_parameter_is_followed(model_first):
    """``swap_tensors`` exchanges what two tensor objects hold: the Parameter keeps its identity, not its data."""

    def swap(model: nn.Module) -> None:
        param = model[2].weight
        other = nn.Parameter(torch.randn(param.shape) * 3)
        torch.utils.swap_tensors(*((param, other) if model_first else (other, param)))

    run(mlp(), swap)


def test_swap_mode_conversion_of_a_model_without_buffers_is_followed():
    """With swap_module_params_on_conversion, ``half()`` swaps each Parameter (no buffer is replaced to tell)."""

    def half(model: nn.Module) -> None:
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            model.half()
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)

    ema = run(mlp(), half)
    assert ema.shadow.tensors()["0.weight"].dtype == torch.float32


def test_dtype_view_of_the_same_storage_is_followed():
    """``p.data = p.data.view(torch.float16)`` of a bfloat16 weight keeps pointer, shape and strides: only the
    dtype tells the change, and the average must follow the float16 values from then on."""

    def reinterpret(model: nn.Module) -> None:
        weight = model[0].weight
        before = weight.data_ptr()
        weight.data = weight.data.view(torch.float16)
        assert weight.data_ptr() == before and weight.dtype == torch.float16

    model = mlp(torch.bfloat16)
    ema, reference = polyak.EMA(model, decay=DECAY), Reference()
    ema.update()
    reference.update(model)
    reinterpret(model)
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    ema.update()
    reference.update(model)
    reference.check(ema, tol=1e-3)
    assert torch.isfinite(ema.shadow.tensors()["0.weight"]).all()


def test_conversion_that_replaces_only_buffers_is_followed():
    """``bn.double()`` of a BatchNorm without affine parameters replaces its buffers and nothing else."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, affine=False)
    ema, reference = polyak.EMA(bn, decay=DECAY), Reference()
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        if i == 2:
            bn.double()
        bn(torch.randn(8, 3, generator=g, dtype=bn.running_mean.dtype) * (i + 1))
        ema.update()
        reference.update(bn)
        reference.check(ema)
    assert bn.running_mean.dtype == torch.float64


def test_a_buffer_made_non_persistent_is_refused_by_name():
    """Re-registering a buffer with ``persistent=False`` keeps the tensor and changes only its persistence: the
    default options leave non-persistent buffers out, so the average that holds it refuses the change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = polyak.EMA(model, decay=DECAY)
    ema.update()
    bn = model[1]
    bn.register_buffer("running_mean", bn.running_mean, persistent=False)
    with pytest.raises(ValueError, match=r"'1\.running_mean' is now not persistent"):
        ema.update()
    bn.register_buffer("running_mean", bn.running_mean, persistent=True)  # undone: it goes on
    ema.update()
    assert ema.num_updates == 2


def test_a_buffer_made_non_persistent_is_followed_when_included():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = polyak.EMA(model, decay=DECAY, include_nonpersistent=True)
    ema.update()
    model[1].register_buffer("running_mean", model[1].running_mean, persistent=False)
    ema.update()
    assert "1.running_mean" in ema.shadow.tensors()


class Masked(nn.Module):
    """A linear layer with two buffers: ``scale`` (persistent, averaged) and ``mask`` (non-persistent, skipped)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("mask", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale + self.mask


def test_persistence_swapped_between_two_buffers_is_refused():
    """``scale`` made non-persistent and ``mask`` persistent: as many non-persistent buffers as before, but the
    average holds one that is now left out, and lacks one that is now in."""
    model = Masked()
    ema = polyak.EMA(model, decay=DECAY)
    ema.update()
    assert set(ema.shadow.tensors()) == {"linear.weight", "linear.bias", "scale"}
    model.register_buffer("mask", model.mask, persistent=True)
    model.register_buffer("scale", model.scale, persistent=False)
    with pytest.raises(ValueError, match=r"'scale' is now not persistent|'mask' is not in the average"):
        ema.update()


def test_an_event_that_changes_nothing_keeps_the_plan_of_a_model_with_non_persistent_buffers():
    model = Masked()
    ema = polyak.EMA(model, decay=DECAY)
    ema.update()
    plan = ema.shadow._plan
    model.linear.weight.requires_grad_(False)  # two events that cancel out
    model.linear.weight.requires_grad_(True)
    ema.update()
    assert ema.shadow._plan is plan and ema.shadow.rechecks == 1
