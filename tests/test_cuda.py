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
    monkeypatch.setattr("polyak.kernels._CHUNK", 1000)  # several staged batches
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
