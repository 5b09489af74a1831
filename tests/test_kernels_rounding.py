"""Stochastic rounding into a bfloat16 average: unbiased, seeded, resumable, sync-free, refused where wrong."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from polyak import EMA
from polyak.commands.bench import Census
from polyak.kernels import round_stochastically_

BF16_BITS = 1 << 16  # float32 bits that bfloat16 drops


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values on either side of float32 ``x`` (toward zero, away from zero), as float64."""
    toward = (x.view(torch.int32) & -BF16_BITS).view(torch.float32)
    away = ((x.view(torch.int32) & -BF16_BITS) + BF16_BITS).view(torch.float32)
    return toward.double(), away.double()


def test_rounding_is_exactly_unbiased_over_every_draw():
    # Every one of the 2**16 possible draws, for each value: their mean must be the value itself, in float64.
    values = torch.tensor(
        [1.0 + 2**-12, -1.0 - 3 * 2**-14, 0.1, -0.1, 1000.123, 3.0e38, 1e-40, -1e-41, 2**-126, 5.5], dtype=torch.float32
    )
    draws = torch.arange(BF16_BITS, dtype=torch.int32)
    for x in values:
        wide = x.repeat(BF16_BITS)
        out = torch.empty(BF16_BITS, dtype=torch.bfloat16)
        round_stochastically_(out, wide, draws)
        toward, away = bf16_neighbours(x.reshape(1))
        assert ((out.double() == toward) | (out.double() == away)).all(), x  # only the two neighbours
        assert out.double().mean().item() == x.double().item(), x  # exact, not statistical


def test_rounding_keeps_representable_values_and_specials():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), -float("inf"), 3.3895313892515355e38])
    for draw in (0, 1, BF16_BITS - 1):
        out = torch.empty(len(exact), dtype=torch.bfloat16)
        round_stochastically_(out, exact.clone(), torch.full((len(exact),), draw, dtype=torch.int32))
        assert torch.equal(out.float(), exact)
    nan = torch.full((3,), float("nan"))
    out = torch.empty(3, dtype=torch.bfloat16)
    round_stochastically_(out, nan, torch.tensor([0, 7, BF16_BITS - 1], dtype=torch.int32))
    assert out.isnan().all()


def held_model(values: torch.Tensor) -> nn.Module:
    model = nn.Linear(values.numel(), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(values.reshape(1, -1))
    return model


def test_average_does_not_stall_over_100k_updates():
    """decay 0.99999, the model held 0.25 above the average's start (values in [1, 2), bf16 spacing 2**-7):
    each increment is 2.5e-6, under half a spacing, so round-to-nearest never moves. The float64 reference
    moves 0.158 (20 spacings) in 100k updates; the stochastically rounded average's mean error over 4096
    values must stay under half a spacing at every 10k updates (measured: at most 0.09; the rounding noise is
    ~2.9 spacings per value, a standard error of ~0.05 for the mean: the bound is ~10 of them). Seed 0."""
    torch.manual_seed(0)
    n, decay, spacing = 4096, 0.99999, 2**-7
    start = (1 + torch.rand(n)).to(torch.bfloat16).float()  # representable: the first update copies exactly
    model = held_model(start)
    nearest = EMA(model, decay=decay, dtype=torch.bfloat16)
    stochastic = EMA(model, decay=decay, dtype=torch.bfloat16, rounding="stochastic")
    nearest.update()
    stochastic.update()
    target = start + 0.25
    with torch.no_grad():
        model.weight.copy_(target.reshape(1, -1))
    for t in range(1, 100_001):
        stochastic.update()
        if t % 10_000 == 0:
            exact = target.double() + (start.double() - target.double()) * decay**t
            error = stochastic.shadow.tensors()["weight"].double().flatten() - exact
            assert abs(error.mean().item()) < 0.5 * spacing, (t, error.mean().item() / spacing)
    nearest.update()
    stalled = nearest.shadow.tensors()["weight"].double().flatten() - exact
    assert torch.equal(nearest.shadow.tensors()["weight"].float().flatten(), start)  # it never moved ...
    assert stalled.mean().item() < -15 * spacing  # ... and trails the float64 reference by ~20 spacings


def run(seed: int, steps: int = 30) -> tuple[EMA, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    ema = EMA(model, decay=0.99, dtype=torch.bfloat16, rounding="stochastic")
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        ema.update()
    return ema, model


def test_deterministic_under_a_seed():
    a, _ = run(1)
    b, _ = run(1)
    c, _ = run(2)
    for name, value in a.shadow.tensors().items():
        assert torch.equal(value, b.shadow.tensors()[name]), name
    assert any(not torch.equal(v, c.shadow.tensors()[k]) for k, v in a.shadow.tensors().items())


def test_resume_is_bit_exact():
    ema, model = run(3, steps=20)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    torch.manual_seed(99)  # another global seed: the saved stream must win
    resumed = EMA(model, decay=0.99, dtype=torch.bfloat16, rounding="stochastic")
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        ema.update()
        resumed.update()
    for name, value in ema.shadow.tensors().items():
        assert torch.equal(value, resumed.shadow.tensors()[name]), name


def test_update_has_no_host_sync_and_no_allocation():
    ema, _ = run(4, steps=3)
    with Census() as census:
        ema.update()
    assert census.syncs == 0 and census.allocated == 0


def test_nonfinite_skip_keeps_the_average_bit_for_bit():
    torch.manual_seed(5)
    model = nn.Linear(8, 8)
    ema = EMA(model, decay=0.9, dtype=torch.bfloat16, rounding="stochastic", nonfinite="skip")
    ema.update()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    before = {k: v.clone() for k, v in ema.shadow.tensors().items()}
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    ema.update()
    assert ema.skipped_updates == 1
    for name, value in before.items():
        assert torch.equal(ema.shadow.tensors()[name], value), name


def test_nonfinite_raise_names_the_tensor():
    model = nn.Linear(4, 4)
    ema = EMA(model, decay=0.9, dtype=torch.bfloat16, rounding="stochastic", nonfinite="raise")
    ema.update()
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(RuntimeError, match="'bias'"):
        ema.update()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rounding": "stochastic"}, "bfloat16 average; got dtype=None"),
        ({"rounding": "stochastic", "dtype": torch.float32}, "got dtype=torch.float32"),
        ({"rounding": "stochastic", "dtype": torch.float16}, "got dtype=torch.float16"),
        ({"rounding": "up", "dtype": torch.bfloat16}, "rounding: expected one of"),
        ({"rounding": None}, "rounding: expected one of"),
    ],
)
def test_bad_combinations_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        EMA(nn.Linear(2, 2), decay=0.9, **options)


def test_damaged_or_mismatched_state_is_refused_without_change():
    ema, model = run(6, steps=5)
    state = ema.state_dict()
    saved = {k: v.clone() for k, v in ema.shadow.tensors().items()}
    stream = ema.shadow.streams.state()
    for damaged in ({"cpu": torch.zeros(3, dtype=torch.uint8)}, {"cuda:0": stream["cpu"]}, None, {"cpu": "x"}):
        with pytest.raises(ValueError, match="rounding state"):
            ema.load_state_dict(state | {"rounding_state": damaged})
        assert torch.equal(ema.shadow.streams.state()["cpu"], stream["cpu"])
    nearest = EMA(model, decay=0.99, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="policy"):
        nearest.load_state_dict(state)
    with pytest.raises(ValueError, match="policy"):
        ema.load_state_dict(nearest.state_dict())
    for name, value in saved.items():
        assert torch.equal(ema.shadow.tensors()[name], value), name
