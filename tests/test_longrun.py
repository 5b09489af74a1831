"""Long-run precision: a float32 average over a million updates stays on its float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak


@pytest.mark.slow
def test_million_updates_float32_track_float64():
    """decay 0.9999 over 1,000,000 updates of a model that moves every step: within 1e-5 relative.

    The bound is close to float32's own limit: each update rounds by up to half an ulp, and with decay d these
    errors add up like a random walk of about sqrt(1 / (12 (1 - d**2))) ~ 20 ulp (some 2e-6 for values near 1),
    so the worst of 36 values sits a few such deviations below 1e-5.
    """
    steps, decay = 1_000_000, 0.9999
    model = nn.Linear(8, 4)  # 36 float32 values
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(36, generator=generator, dtype=torch.float64) + 0.5  # values in [0.5, 1.5]
    table = (base + 0.1 * torch.randn(4099, 36, generator=generator, dtype=torch.float64)).float()
    rows = [list(row.split([p.numel() for p in params])) for row in table]
    rows = [[piece.view_as(p) for piece, p in zip(row, params, strict=True)] for row in rows]
    ema = polyak.EMA(model, decay=decay)
    reference = torch.empty(36, dtype=torch.float64)
    with torch.no_grad():
        for t in range(steps):
            i = (t * 7) % len(rows)  # revisits rows in a long cycle
            torch._foreach_copy_(params, rows[i])
            ema.update()
            if t == 0:
                reference.copy_(table[i])
            else:
                reference += (1 - decay) * (table[i].double() - reference)
    average = torch.cat([ema.shadow.tensors()[name].flatten() for name in ("weight", "bias")]).double()
    relative = ((average - reference).abs() / reference.abs()).max().item()
    assert relative < 1e-5, relative
