"""An averager inside a ``torch.compile``d training step: one graph break, no recompile after the first step.

Without care, dynamo specialises on the front end's Python step counter and recompiles on every step until its
recompile limit, then falls back to eager for the whole step. ``error_on_recompile`` turns any recompile into an
error here; the average is checked against a float64 EMA of the weights the compiled steps produced.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn

from polyak import EMA
from polyak.swa_utils import AveragedModel, get_ema_multi_avg_fn

DECAY = 0.75
STEPS = 12  # more than dynamo's recompile limit (8)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def train(front_end: str) -> tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]]]:
    """Run STEPS compiled steps; return the model, the averaged tensors and the weights after every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    averaged: Callable[[], dict[str, Tensor]]
    after_step: Callable[[], None] = lambda: None  # noqa: E731
    if front_end == "swa_utils":
        average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
        after_step = lambda: average.update_parameters(model)  # noqa: E731
        averaged = lambda: {k: v for k, v in average.module.state_dict().items()}  # noqa: E731
    else:
        ema = EMA(model, decay=DECAY)
        if front_end == "attached":
            ema.attach(optimizer)
        else:
            after_step = lambda: ema.update(model)  # noqa: E731
        averaged = ema.shadow.tensors

    def step(x: Tensor, y: Tensor) -> None:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step()

    compiled = torch.compile(step, backend="eager")
    history = []
    for number in range(STEPS):
        # The first step runs eagerly: SGD creates its momentum buffers then, a recompile of torch's own.
        (step if number == 0 else compiled)(torch.randn(4, 6), torch.randn(4, 3))
        history.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
    return model, averaged(), history


@pytest.mark.parametrize("front_end", ["plain", "attached", "swa_utils"])
def test_compiled_step_does_not_recompile_and_averages(front_end):
    _, averaged, history = train(front_end)  # error_on_recompile raises on a second compilation
    reference = history[0]  # the first update copies the model
    for weights in history[1:]:
        reference = {k: v + (1 - DECAY) * (weights[k] - v) for k, v in reference.items()}
    for name, value in reference.items():
        torch.testing.assert_close(averaged[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.allclose(history[0]["0.weight"], history[-1]["0.weight"])  # the step really trained
