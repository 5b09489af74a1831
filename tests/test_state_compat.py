"""States saved by polyak before the one-path redesign (tests/data/states_v1.pt) load into today's averagers.

Each saved state comes from tests/data/make_states_v1.py, run with the main of that time. Loading must keep the
saved averages bit for bit and the counters, and continuing must follow each front end's published update from
the loaded average (checked in float64 here, not against numbers from polyak's own output).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
spec = importlib.util.spec_from_file_location("make_states_v1", DATA / "make_states_v1.py")
assert spec is not None and spec.loader is not None
maker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(maker)

STATES = torch.load(DATA / "states_v1.pt", weights_only=True)


def averages_of(state: dict) -> list[dict[str, torch.Tensor]]:
    """The saved averages of a format /1 state, whatever its front end."""
    if "shadow" in state:
        return [] if state["shadow"] is None else [state["shadow"]]
    if "averages" in state:
        return [part["shadow"] for part in state["averages"].values()]
    if "ema" in state:
        return [state["ema"], state["anchor"]]
    return list(state["shadows"])


@pytest.mark.parametrize("name", sorted(maker.BUILDERS))
def test_a_state_saved_before_the_redesign_loads_bit_for_bit(name: str) -> None:
    saved = STATES[name]
    net = maker.model()
    averager = maker.BUILDERS[name](net)
    averager.load_state_dict(saved)
    now = averager.state_dict()
    if "averages" in saved:  # MultiEMA: format /2 keeps the averages by name, the counters once
        first = next(iter(saved["averages"].values()))
        assert now["step"] == first["step"] and now["num_updates"] == first["num_updates"]
        loaded = [now["averages"][n] for n in saved["averages"]]
    else:
        assert (now["step"], now["num_updates"]) == (saved["step"], saved["num_updates"])
        loaded = [now[k] for k in ("shadow", "ema", "anchor") if k in now] or list(now.get("shadows", []))
        loaded = [a for a in loaded if a is not None]
    expected = averages_of(saved)
    assert len(loaded) == len(expected)
    for got, want in zip(loaded, expected, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), (name, key)
    if "rounding_state" in saved:
        assert torch.equal(now["rounding_state"]["cpu"], saved["rounding_state"]["cpu"])


def test_a_loaded_ema_continues_by_its_formula() -> None:
    """One more update of the loaded EMA (decay 0.9) is ``avg + 0.1 (theta - avg)``, computed in float64."""
    saved = STATES["ema"]
    net = maker.model()
    ema = maker.BUILDERS["ema"](net)
    ema.load_state_dict(saved)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    modes = ema.shadow.modes()
    tensors = dict(net.named_parameters(), **dict(net.named_buffers()))
    for name, value in ema.state_dict()["shadow"].items():
        theta = tensors[name].detach().double()
        before = saved["shadow"][name].double()
        expected = before + 0.1 * (theta - before) if modes[name] == "average" else theta  # frozen, int: copied
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)


def test_a_loaded_swa_continues_as_an_equal_average() -> None:
    """SWA after n updates folds the next with weight 1 / (n + 1)."""
    saved = STATES["swa"]
    net = maker.model()
    swa = maker.BUILDERS["swa"](net)
    swa.load_state_dict(saved)
    n = saved["num_updates"]
    swa.update(net)
    theta = net[0].weight.detach().double()
    before = saved["shadow"]["0.weight"].double()
    torch.testing.assert_close(
        swa.state_dict()["shadow"]["0.weight"].double(), before + (theta - before) / (n + 1), rtol=0, atol=1e-6
    )
