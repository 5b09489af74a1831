"""GPU paths: no host sync per update, and the pinned, overlapped CPU offload. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from models import SmallCNN
from torch import nn

from polyak import EMA, flatten_parameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, device="cuda", generator=generator).to(p.dtype))


def float64_average(
    model: nn.Module, average: dict[str, torch.Tensor] | None, weight: float
) -> dict[str, torch.Tensor]:
    live = {k: v.detach().double().cpu() for k, v in model.named_parameters()}
    if average is None:
        return live
    return {k: v + weight * (live[k] - v) for k, v in average.items()}


@pytest.mark.parametrize("variant", ["fp32", "bf16", "flat", "offload"])
def test_cuda_update_matches_float64_without_host_sync(variant, monkeypatch):
    monkeypatch.setattr("polyak.kernels.CHUNK", 1000)  # several staged batches
    model = SmallCNN().cuda()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    if variant == "flat":
        flatten_parameters(model)
    ema = EMA(model, decay=0.5, device="cpu" if variant == "offload" else None)
    ema.update()
    reference = float64_average(model, None, 1.0)
    torch.cuda.synchronize()
    for step in range(3):
        perturb(model, step)
        if variant == "offload":  # the CPU must wait for the copies it lerps: that wait is the point
            ema.update()
        else:
            torch.cuda.set_sync_debug_mode("error")
            try:
                ema.update()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        reference = float64_average(model, reference, 0.5)
    tensors = ema.shadow.tensors()
    for name, value in reference.items():
        assert tensors[name].device.type == ("cpu" if variant == "offload" else "cuda")
        torch.testing.assert_close(tensors[name].double().cpu(), value, rtol=1e-5, atol=1e-5, msg=name)


def test_offload_stages_in_pinned_host_memory():
    model = nn.Linear(64, 64).cuda()
    ema = EMA(model, decay=0.9, device="cpu")
    before = torch.cuda.memory_allocated()
    ema.update()
    ema.update()
    assert torch.cuda.memory_allocated() == before  # nothing staged on the GPU
    cast = ema.shadow._plan.casts[0]
    assert all(s.is_pinned() for s in cast.scratches) and len(cast.events) == 2


@pytest.mark.parametrize("variant", ["fp32", "bf16"])
def test_update_captured_in_a_cuda_graph_replays_like_float64(variant, monkeypatch):
    """One update captured once, replayed after every step: the average follows a float64 EMA.

    The plan is built (and the model copied) by the first update, outside the graph; a capture records the
    kernels without running them. A constant decay's weight is a fixed kernel argument of the graph.
    """
    monkeypatch.setattr("polyak.kernels.CHUNK", 1000)  # the bf16 model is staged in several batches
    model = SmallCNN().cuda()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    ema = EMA(model, decay=0.75)
    ema.update()
    reference = float64_average(model, None, 1.0)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        ema.update()
    for name, value in ema.shadow.tensors().items():  # capturing ran nothing
        if name in reference:
            torch.testing.assert_close(value.double().cpu(), reference[name], rtol=0, atol=0, msg=name)
    for step in range(4):
        perturb(model, 10 + step)
        graph.replay()
        reference = float64_average(model, reference, 0.25)
    torch.cuda.synchronize()
    tensors = ema.shadow.tensors()
    for name, value in reference.items():
        torch.testing.assert_close(tensors[name].double().cpu(), value, rtol=1e-5, atol=1e-5, msg=name)


def test_stochastic_rounding_on_the_gpu_is_unbiased_without_host_sync():
    """A bf16 average of a model held above it by a tenth of a bf16 spacing per update's reach: round-to-nearest
    stalls; the stochastic one follows the float64 reference within a fifth of a spacing on average."""
    torch.manual_seed(0)
    n, decay, spacing = 1 << 16, 0.9999, 2**-7
    model = nn.Linear(n, 1, bias=False).cuda()
    start = (1 + torch.rand(n, device="cuda")).to(torch.bfloat16).float()
    with torch.no_grad():
        model.weight.copy_(start.reshape(1, -1))
    ema = EMA(model, decay=decay, dtype=torch.bfloat16, rounding="stochastic")
    ema.update()
    target = start + 0.25
    with torch.no_grad():
        model.weight.copy_(target.reshape(1, -1))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2000):
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    exact = target.double() + (start.double() - target.double()) * decay**2000
    error = ema.shadow.tensors()["weight"].double().flatten() - exact
    assert abs(error.mean().item()) < 0.2 * spacing
