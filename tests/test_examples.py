"""The examples run end to end (shortened)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs():
    results = load("quickstart").main(steps=300)
    assert set(results) == {"last iterate", "EMA 0.99", "SWA (2nd half)"}
    assert all(math.isfinite(v) and v > 0 for v in results.values())


def test_swa_mnist1d_runs():
    results = load("swa_mnist1d").main(epochs=2, num_samples=600)
    assert len(results) == 3
    assert all(0.0 <= v <= 1.0 for v in results.values())
