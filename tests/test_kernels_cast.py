"""The chunked folds: a cast model is staged (channels_last tensors whole, not copied per piece); K averages of the
model's own dtype read each chunk in place."""

from __future__ import annotations

import pytest
import torch
from models import SmallCNN
from torch import nn

from polyak import EMA, MultiEMA, flatten_parameters
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


@pytest.mark.parametrize("layout", ["channels_last", "flat"])
def test_multi_ema_reading_the_model_in_place_matches_float64(monkeypatch, layout):
    """K float32 averages of a float32 model read each chunk in place (no staging): channels_last tensors, tensors
    split across chunks, and a flat model whose chunks span tensors, against a float64 loop."""
    monkeypatch.setattr("polyak.kernels.CHUNK", 100)  # smaller than the convolution weights (216, 1152)
    torch.manual_seed(3)
    model = SmallCNN()
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        assert not model.features[3].weight.is_contiguous()
    else:
        flatten_parameters(model)
    decays = (0.5, 0.9, 0.99)
    multi = MultiEMA(model, decays=decays)
    multi.update()
    state = {k: v.detach().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    reference = [dict(state) for _ in decays]
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        with Census() as census:
            multi.update()
        assert census.allocated == 0 and census.syncs == 0
        live = {k: v.detach().double() for k, v in model.state_dict().items() if v.is_floating_point()}
        for decay, average in zip(decays, reference, strict=True):
            average.update({k: v + (1 - decay) * (live[k] - v) for k, v in average.items()})
    for index, average in enumerate(reference):
        tensors = multi.shadow.tensors(index)
        for name, value in average.items():
            torch.testing.assert_close(tensors[name].double(), value, rtol=1e-6, atol=1e-6, msg=f"{index} {name}")
