"""``averaged_model()`` (issue 25, item 7): an eval-mode copy that requires no grad, in the model's dtype unless
``dtype=`` says otherwise (floating tensors only; complex ones keep their imaginary parts), for every front end,
holding the float64 average written here; the training model keeps its modes, flags and values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_reliability import state, unchanged
from torch import nn

import polyak


class Mixed(nn.Module):
    """Real and complex parameters, a frozen one, BatchNorm buffers (one an integer), one submodule in eval."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.phase = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
        self.norm.eval()


def moved(model: nn.Module, moves: torch.Generator) -> None:
    """A stand-in training step: every parameter and floating buffer moves; the batch counter counts."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("num_batches_tracked"):
                t.add_(1)
            elif name.endswith("running_var"):
                t.mul_(1 + 0.1 * torch.rand(t.shape, generator=moves).to(t.dtype))
            else:
                t.add_((torch.randn(t.shape, generator=moves) * 0.1).to(t.dtype))


def ema_of(seen: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """``average <- average + w (theta - average)`` over ``seen[1:]`` (one weight each), from ``seen[0]``."""
    average = dict(seen[0])
    for theta, w in zip(seen[1:], weights, strict=True):
        average = {k: average[k] + w * (theta[k] - average[k]) for k in average}
    return average


def power_gamma(sigma_rel: float) -> float:
    """EDM2's exponent for a relative width: the largest real root of g^3 + 7g^2 + (16 - s)g + (12 - s), s =
    sigma_rel^-2."""
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


UPDATES = 4
REAL_FLOATING = ("lin.weight", "lin.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var")


def expected_average(front: str, seen: list[dict[str, torch.Tensor]], now: dict[str, torch.Tensor]):
    """The float64 average each front end is documented to hold after ``UPDATES`` updates (``seen[0]``: the model
    when the averager was made; ``now``: the model as it is)."""
    n = len(seen) - 1
    if front in ("EMA", "MultiEMA['slow']"):  # the first update copies
        return ema_of(seen, [1.0] + [1 - 0.9] * (n - 1))
    if front == "SWA":
        return ema_of(seen, [1 / t for t in range(1, n + 1)])
    if front == "PostHocEMA(profile=1)":
        gamma = power_gamma(0.1)
        return ema_of(seen, [1 - (1 - 1 / t) ** (gamma + 1) for t in range(1, n + 1)])
    assert front == "BEMA"  # the EMA of beta_s = (10 + s)^-0.5, plus alpha_s (theta - theta_0) for parameters
    ema = ema_of(seen, [(10.0 + s) ** -0.5 for s in range(1, n + 1)])
    alpha = (10.0 + n) ** -0.2
    return {k: v if "running" in k else v + alpha * (now[k] - seen[0][k]) for k, v in ema.items()}


FRONTS = {
    "EMA": (lambda m: polyak.EMA(m, decay=0.9), lambda a, **kw: a.averaged_model(**kw)),
    "SWA": (polyak.SWA, lambda a, **kw: a.averaged_model(**kw)),
    "MultiEMA['slow']": (
        lambda m: polyak.MultiEMA(m, {"fast": 0.5, "slow": 0.9}),
        lambda a, **kw: a["slow"].averaged_model(**kw),
    ),
    "BEMA": (polyak.BEMA, lambda a, **kw: a.averaged_model(**kw)),
    "PostHocEMA(profile=1)": (
        lambda m: polyak.PostHocEMA(m, sigma_rels=(0.05, 0.1)),
        lambda a, **kw: a.averaged_model(1, **kw),
    ),
}


@pytest.mark.parametrize("front", list(FRONTS))
@pytest.mark.parametrize(
    ("model_dtype", "dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.float64), (torch.bfloat16, torch.float64)],
    ids=["fp32", "bf16", "fp32-as-fp64", "bf16-as-fp64"],
)
def test_averaged_model_is_an_eval_frozen_copy_in_the_models_dtype(front, model_dtype, dtype):
    model = Mixed()
    model._apply(lambda t: t.to(model_dtype) if t.is_floating_point() else t)
    make, averaged_model = FRONTS[front]
    averager = make(model)
    moves = torch.Generator().manual_seed(1)
    seen = [{k: v.detach().to(torch.complex128 if v.is_complex() else torch.float64) for k, v in state(model).items()}]
    for _ in range(UPDATES):
        moved(model, moves)
        averager.update()
        seen.append({k: v.to(seen[0][k].dtype) for k, v in state(model).items()})
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    before = state(model)

    copy_ = averaged_model(averager, **({} if dtype is None else {"dtype": dtype}))

    # The training model keeps its mode, flags and values.
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == modes == {"": True, "lin": True, "norm": False}
    assert unchanged(model, before)
    # The copy: evaluation mode everywhere, nothing requires grad, floating tensors in the model's dtype or dtype=.
    assert copy_ is not model and not any(m.training for m in copy_.modules())
    assert not any(p.requires_grad for p in copy_.parameters())
    wanted = dtype or model_dtype
    held = copy_.state_dict()
    assert {k: v.dtype for k, v in held.items()} == {
        **{k: wanted for k in REAL_FLOATING},
        "frozen": wanted,
        "phase": torch.complex128 if dtype == torch.float64 else torch.complex64,
        "norm.num_batches_tracked": torch.int64,
    }
    # Its values: the float64 average (complex: imaginary parts too), the frozen and integer tensors copied.
    expected = expected_average(front, seen, seen[-1])
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if wanted == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for key in (*REAL_FLOATING, "phase"):
        actual = held[key].to(torch.complex128 if held[key].is_complex() else torch.float64)
        torch.testing.assert_close(actual, expected[key], **tolerance, msg=f"{front}: {key}")
    assert torch.equal(held["frozen"], before["frozen"].to(wanted))
    assert int(held["norm.num_batches_tracked"]) == UPDATES
    with torch.no_grad():  # a copy of its own: changing it leaves the model alone
        for t in held.values():
            t.zero_()
    assert unchanged(model, before)
