"""`polyak demo`: runs end to end, is deterministic, reads its numbers honestly, rejects bad options."""

from __future__ import annotations

import json
import math

import numpy
import pytest
import torch

from polyak.cli import main

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from polyak.demo import report
from polyak.demo.data import mnist1d, with_label_noise
from polyak.demo.train import LAST, METHODS, SETTINGS, Curves, train


@pytest.fixture(scope="module")
def data():
    return mnist1d()


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert str(out / "accuracy.png") in printed
    table = (out / "table.md").read_text()
    assert table.strip() in printed
    names = [LAST, *(m.name for m in METHODS)]
    for name in names:
        assert f"| {name} " in table
    for setting in SETTINGS:
        assert f"{setting.name}: averaging " in table  # one verdict per setting

    record = json.loads((out / "results.json").read_text())
    assert set(record["settings"]) == {s.name for s in SETTINGS}
    for curves in record["settings"].values():
        assert list(curves) == names
        for name, per_seed in curves.items():
            assert len(per_seed) == 2  # quick: two seeds
            for curve in per_seed:
                assert len(curve) == len(record["steps"])
                final = curve[-1]
                assert math.isfinite(final) and 0.0 <= final <= 100.0, (name, final)
        # the last iterate has learned something: above chance (10 classes) in every setting
        assert min(curve[-1] for curve in curves[LAST]) > 10.0


def test_same_seed_same_numbers(data):
    def run(seed):
        return train(data, SETTINGS[2], seed, steps=120, evaluations=3, advance=lambda n: None)

    first, again, other = run(0), run(0), run(1)
    assert first.steps == again.steps
    for name, curve in first.accuracy.items():
        numpy.testing.assert_array_equal(curve, again.accuracy[name])  # NaN == NaN here: SWA has not begun
    assert first.accuracy[LAST] != other.accuracy[LAST]
    assert first.steps == [40, 80, 120]


def test_progress_counts_every_step(data):
    seen = []
    train(data, SETTINGS[0], 0, steps=100, evaluations=7, advance=seen.append)
    assert sum(seen) == 100


def test_dataset_is_the_standard_split(data):
    assert data.x.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.x.dtype == torch.float32 and data.classes == 10
    assert "MNIST-1D" in data.source


def test_label_noise_replaces_the_asked_share():
    labels = torch.arange(1000) % 10
    noisy = with_label_noise(labels, 0.3, 10, torch.Generator().manual_seed(0))
    changed = int((noisy != labels).sum())
    assert changed <= 300  # 300 replaced, about a tenth of them by their own class
    assert changed > 200
    assert torch.equal(with_label_noise(labels, 0.0, 10, torch.Generator()), labels)


def _runs(last, averaged):
    """One Curves per seed with the given final accuracies for the last iterate and one average."""
    return [Curves([1], {LAST: [a], "avg": [b]}) for a, b in zip(last, averaged, strict=True)]


@pytest.mark.parametrize(
    ("averaged", "word"),
    [
        ([70.0, 71.0, 72.0], "helps"),
        ([60.5, 59.0, 61.0], "gives no clear gain"),
        ([50.0, 49.0, 51.0], "hurts"),
    ],
)
def test_verdict_reads_the_numbers(averaged, word):
    text = report.verdict("s", _runs([60.0, 60.0, 61.0], averaged), test_size=1000)
    assert text.startswith(f"s: averaging {word}")


def test_noise_level_is_at_least_the_test_set_error():
    # identical gains on every seed: only the test set's own sampling error remains
    assert report.noise_level([1.0, 1.0, 1.0], 50.0, 10_000) == pytest.approx(0.5)
    assert report.noise_level([0.0, 4.0], 50.0, 10_000) == pytest.approx(2 * math.sqrt(8) / math.sqrt(2))


@pytest.mark.parametrize(
    ("option", "value"),
    [("--seeds", "0"), ("--seeds", "two"), ("--steps", "10")],
)
def test_bad_options_name_the_argument(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", option, value])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    assert "--out" in capsys.readouterr().err


def test_missing_extra_is_named(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mnist1d" else real(name))
    assert main(["demo", "--quick"]) == 1
    assert "polyak[demo]" in capsys.readouterr().err
