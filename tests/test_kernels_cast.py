"""The staged cast of a model of another dtype: channels_last tensors are staged whole, not copied per piece."""

from __future__ import annotations

import torch
from models import SmallCNN
from torch import nn

from polyak import EMA
from polyak.commands.bench import Census


def test_channels_last_bf16_model_staged_without_copies(monkeypatch):
    monkeypatch.setattr("polyak.kernels.CHUNK", 100)  # smaller than the convolution weights (216, 1152)
    torch.manual_seed(0)
    model = SmallCNN().to(torch.bfloat16).to(memory_format=torch.channels_last)
    assert not model.features[3].weight.is_contiguous()
    ema = EMA(model, decay=0.5)
    ema.update()
    reference = {k: v.detach().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        with Census() as census:
            ema.update()
        assert census.allocated == 0 and census.syncs == 0  # reshape of a piece would copy the whole tensor
        live = {k: v.detach().double() for k, v in model.state_dict().items() if v.is_floating_point()}
        reference = {k: v + 0.5 * (live[k] - v) for k, v in reference.items()}
    tensors = ema.shadow.tensors()
    for name, value in reference.items():
        torch.testing.assert_close(tensors[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)


def test_fp16_model_into_float32_average_matches_float64(monkeypatch):
    monkeypatch.setattr("polyak.kernels.CHUNK", 64)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3)).to(torch.float16)
    ema = EMA(model, decay=0.9)
    ema.update()
    reference = {k: v.detach().double() for k, v in model.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        ema.update()
        reference = {k: v + 0.1 * (model.state_dict()[k].double() - v) for k, v in reference.items()}
    for name, value in reference.items():
        assert ema.shadow.tensors()[name].dtype == torch.float32
        torch.testing.assert_close(ema.shadow.tensors()[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)


def test_average_of_a_channels_last_model_is_laid_out_like_it():
    torch.manual_seed(2)
    model = SmallCNN().to(memory_format=torch.channels_last)
    ema = EMA(model, decay=0.5, dtype=torch.bfloat16, rounding="stochastic")
    weight = ema.shadow.tensors()["features.3.weight"]
    assert weight.stride() == model.features[3].weight.stride()  # read and written in the model's memory order
    ema.update()
    start = weight.double().clone()
    with torch.no_grad():
        model.features[3].weight.add_(1.0)
    ema.update()
    exact = start + 0.5 * (model.features[3].weight.double() - start)
    assert ((weight.double() - exact).abs() <= 2**-7 * exact.abs()).all()  # within one bf16 spacing
    restored = SmallCNN()
    restored.load_state_dict(ema.shadow.state_dict())  # loads into a model of the default layout
    torch.testing.assert_close(restored.features[3].weight.double(), weight.double(), rtol=0, atol=0)
