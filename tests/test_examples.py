"""The examples run end to end (shortened)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The trainer examples never take a state_dict() of a swapped model (polyak's own warning): an error there.
NO_SWAPPED_STATE = pytest.mark.filterwarnings(r"error:state_dict\(\) of .* taken inside a `swapped\(\)` block")


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
    import pytest

    pytest.importorskip("mnist1d")
    results = load("swa_mnist1d").main(epochs=2, num_samples=600)
    assert len(results) == 3
    assert all(0.0 <= v <= 1.0 for v in results.values())


@NO_SWAPPED_STATE
def test_lightning_loop_runs(tmp_path):
    pytest.importorskip("lightning")
    results = load("lightning_loop").main(epochs=1, out=str(tmp_path))
    assert all(math.isfinite(v) and v > 0 for v in results.values())
    # trainer.validate reported the training weights (as evaluated outside the Trainer) and the average.
    assert results["last iterate (trainer.validate)"] == pytest.approx(results["last iterate"], rel=1e-6)
    assert results["EMA 0.99 (trainer.validate)"] != results["last iterate"]
    assert (tmp_path / "averaged.pt").is_file()
    assert len(list((tmp_path / "checkpoints").glob("*.ckpt"))) == 1


@NO_SWAPPED_STATE
def test_hf_trainer_runs(tmp_path):
    pytest.importorskip("transformers")
    results = load("hf_trainer").main(steps=8, out=str(tmp_path))
    assert all(math.isfinite(v) and v > 0 for v in results.values())
    # The average evaluated side by side is the one saved for from_pretrained.
    assert results["EMA (from_pretrained)"] == results["EMA"] != results["last iterate"]


def test_examples_leave_no_temporary_folders(tmp_path, monkeypatch, capsys):
    import tempfile

    pytest.importorskip("lightning")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    load("lightning_loop").main(epochs=1)
    assert list(tmp_path.iterdir()) == []
    assert "removed" in capsys.readouterr().out


def test_compile_amp_runs():
    results = load("compile_amp").main(steps=40)  # the suite's one real (inductor) compile
    assert all(math.isfinite(v) and v > 0 for v in results.values())
    assert results["last iterate again"] == results["last iterate"] != results["EMA 0.98"]


def test_dqn_cartpole_runs():
    import pytest

    pytest.importorskip("gymnasium")
    results = load("dqn_cartpole").main(steps=1600, seeds=(0,))
    assert results[0]["target updates"] == (1600 - 1000) // 500  # hard copies every 500 optimizer steps
    assert 8 <= results[0]["greedy return"] <= 500 and results[0]["episodes"] > 0


def test_td3_pendulum_runs():
    import pytest

    pytest.importorskip("gymnasium")
    results = load("td3_pendulum").main(steps=1100, seeds=(0,))
    assert results[0]["target updates"] == 50  # with every second critic step
    assert -2000 < results[0]["eval return"] <= 0  # Pendulum's rewards are in [-16.3, 0] per step, 200 steps


def test_mean_teacher_mnist1d_runs():
    results = load("mean_teacher_mnist1d").main(steps=60, labels=100, seeds=(0,))
    assert set(results[0]) == {"student", "teacher"}
    assert all(0.0 <= v <= 1.0 for v in results[0].values())
    assert results[0]["student"] > 0.15  # above chance (0.1) after 60 steps
