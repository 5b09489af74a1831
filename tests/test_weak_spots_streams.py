"""The random streams of stochastic rounding: seeded from torch's seed, restored on a lazy resume; and
PostHocEMA's start_step, a setting that a saved state must match.

References: the same updates under the same and another global seed (the streams are documented to start from
``torch.initial_seed()``), and an uninterrupted run of the same updates (a resume must continue it bit for bit).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import polyak


def steps(count: int, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """Model states, one per step: a random walk the same under any global seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=1e-3)
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))


def stochastic(m: nn.Module, **options) -> polyak.EMA:
    return polyak.EMA(m, decay=0.99, dtype=torch.bfloat16, rounding="stochastic", **options)


def test_the_streams_start_from_torchs_seed():
    run = steps(20)
    results = {}
    for seed in (1, 2, 1):
        m = model()
        torch.manual_seed(seed)
        ema = stochastic(m)
        for state in run:
            m.load_state_dict(state)
            ema.update()
        results.setdefault(seed, []).append(ema.shadow.tensors())
    first, again = results[1]
    (other,) = results[2]
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same seed, the same bits
    assert any(not torch.equal(first[k], other[k]) for k in first)  # another seed rounds otherwise


@pytest.mark.parametrize("saved_at", [3, 8])
def test_a_lazy_resume_continues_the_rounding_stream(saved_at):
    """A lazy averager allocates its average (and streams) when loading a started state: the saved stream, not
    a fresh one seeded from the current global seed, must drive the following roundings."""
    run = steps(14)
    m = model()
    torch.manual_seed(3)
    ema = stochastic(m, lazy=True, start_step=2)
    saved = None
    for step, state in enumerate(run, start=1):
        m.load_state_dict(state)
        ema.update()
        if step == saved_at:
            saved = copy.deepcopy(ema.state_dict())
    assert saved is not None and "rounding_state" in saved
    torch.manual_seed(3)  # the seed the original was built under: a fresh stream would restart from it
    resumed_model = model()
    resumed = stochastic(resumed_model, lazy=True, start_step=2)
    assert resumed._shadow is None
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.shadow.streams.state()["cpu"], saved["rounding_state"]["cpu"])
    for state in run[saved_at:]:
        resumed_model.load_state_dict(state)
        resumed.update()
    for name, value in ema.shadow.tensors().items():
        assert torch.equal(value, resumed.shadow.tensors()[name]), name


def test_posthoc_start_step_is_a_setting_a_state_must_match(tmp_path):
    """A state saved with start_step=3 continues only in a tracker of start_step=3: its step counts from there."""
    m = nn.Linear(3, 2)
    tracker = polyak.PostHocEMA(m, gammas=(6.94,), start_step=3)
    for _ in range(6):
        tracker.update()
    saved = copy.deepcopy(tracker.state_dict())
    other = polyak.PostHocEMA(nn.Linear(3, 2), gammas=(6.94,), start_step=5)
    with pytest.raises(ValueError, match="start_step=3"):
        other.load_state_dict(saved)
    assert other.step == 0
    same = polyak.PostHocEMA(nn.Linear(3, 2), gammas=(6.94,), start_step=3)
    same.load_state_dict(saved)
    assert same.num_updates == tracker.num_updates == 3
