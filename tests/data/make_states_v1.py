"""Write tests/data/states_v1.pt: averager states saved by polyak before the one-path redesign (format /1).

Run once, with the polyak of commit 9a49032 (the last main before the redesign), from the repository root:

    PYTHONPATH=src python tests/data/make_states_v1.py

tests/test_state_compat.py loads each state into an averager built the same way by the current code.
"""

from __future__ import annotations

import torch
from torch import nn

import polyak


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    net[2].bias.requires_grad_(False)  # a frozen parameter: copied
    return net


def train(net: nn.Module, averager: object, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        net.train()
        net(torch.randn(8, 4, generator=generator))  # BatchNorm statistics move
        averager.update(net)  # type: ignore[attr-defined]


BUILDERS = {
    "ema": lambda m: polyak.EMA(m, decay=0.9),
    "ema_every_start": lambda m: polyak.EMA(m, decay=0.9, update_every=2, start_step=1),
    "ema_lazy_before_start": lambda m: polyak.EMA(m, decay=0.9, start_step=100, lazy=True),
    "ema_half_life_samples": lambda m: polyak.EMA(m, half_life="64 samples", batch_size=8),
    "ema_skip": lambda m: polyak.EMA(m, decay=0.9, nonfinite="skip"),
    "ema_bf16_stochastic": lambda m: polyak.EMA(m, decay=0.9, dtype=torch.bfloat16, rounding="stochastic"),
    "ema_target": lambda m: polyak.EMA(m, tau=0.1, target="copy"),
    "swa": lambda m: polyak.SWA(m, start_step=2),
    "multi": lambda m: polyak.MultiEMA(m, decays=(0.9, 0.99)),
    "bema": lambda m: polyak.BEMA(m, burn_in=1),
    "posthoc": lambda m: polyak.PostHocEMA(m, sigma_rels=(0.05, 0.1)),
}


def main() -> None:
    states = {}
    for name, build in BUILDERS.items():
        net = model()
        averager = build(net)
        train(net, averager, steps=7)
        states[name] = averager.state_dict()  # type: ignore[attr-defined]
    torch.save(states, "tests/data/states_v1.pt")


if __name__ == "__main__":
    main()
