"""Choosing the EMA width on validation data (polyak.posthoc.select) and among live averages (MultiEMA.select).

The reference for every score is the issue's definition: reconstruct the width to a file, load it into a fresh
copy of the model, evaluate. Selection must agree with that, read each snapshot once, and leave the model as it was.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import polyak
from polyak.io import SafetensorsFile, open_safetensors
from polyak.posthoc import MAX_FIT_ERROR, reconstruct, select, solve_coefficients

STEPS, SNAPSHOT_EVERY = 300, 30


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: on a busy 2-core machine a second thread makes the 300 steps 30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data(n: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True)) + noise * torch.randn(n, 1, generator=g)


X_VAL, Y_VAL = data(256, seed=1, noise=0.0)


def regression() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 1))


def val_loss(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return nn.functional.mse_loss(model(X_VAL), Y_VAL).item()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 300-step SGD run on noisy regression data, snapshots every 30 steps: (folder, trained model)."""
    directory = tmp_path_factory.mktemp("snapshots")
    model = regression()
    x, y = data(512, seed=0, noise=0.3)
    tracker = polyak.PostHocEMA(model, directory=directory, snapshot_every=SNAPSHOT_EVERY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker.attach(optimizer)
    g = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        batch = torch.randint(0, len(x), (32,), generator=g)
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return directory, model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def reference_score(directory, model: nn.Module, width: float, tmp_path) -> float:
    """The hand-written way: reconstruct the width to a file, load it into a copy of the model, evaluate."""
    out = tmp_path / f"ref-{width}.safetensors"
    reconstruct(directory, [width], [out])
    probe = copy.deepcopy(model)
    probe.load_state_dict(dict(open_safetensors(out)))
    return val_loss(probe)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_scores_are_reconstruct_then_evaluate_and_the_choice_is_the_best(run, tmp_path, mode):
    directory, model = run
    model.train()
    before = state(model)
    sign = 1.0 if mode == "min" else -1.0  # "max" on the negated loss must choose the same width
    result = select(directory, model, lambda m: sign * val_loss(m), mode=mode, output=tmp_path / "chosen.safetensors")
    assert model.training and all(m.training for m in model.modules())  # evaluate switched to eval: undone
    assert_same(model, before)
    assert result.step == STEPS and result.tracked == (0.05, 0.1) and result.passes == 1
    widths = list(result.scores)
    assert widths == sorted(widths) and {0.05, 0.1} <= set(widths) and len(widths) >= 12
    low, high = result.reach
    assert low <= min(widths) and max(widths) <= high
    for width, score in result.scores.items():
        assert type(score) is float
        assert score == pytest.approx(sign * reference_score(directory, model, width, tmp_path), abs=1e-6), width
    losses = {w: sign * s for w, s in result.scores.items()}
    assert result.chosen == min(losses, key=losses.__getitem__) == result.sigma_rel
    # The chosen average is reconstruct's output for that width, in memory and in the file.
    reconstruct(directory, [result.chosen], [tmp_path / "expected.safetensors"])
    expected = dict(open_safetensors(tmp_path / "expected.safetensors"))
    written = dict(open_safetensors(tmp_path / "chosen.safetensors"))
    for name, value in expected.items():
        assert torch.equal(result.state_dict[name], value), name
        assert torch.equal(written[name], value), name
    for width, error in result.fit_errors.items():
        assert error <= MAX_FIT_ERROR and width in result.scores


def test_model_restored_when_evaluate_raises_on_the_third_candidate(run):
    directory, model = run
    model.train()
    model[1].eval()  # a mixed state: every module's own flag comes back
    before = state(model)
    calls = []

    def evaluate(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                m[0].weight.add_(1.0)  # damage on the way out
            m.train()
            raise RuntimeError("evaluation failed")
        return val_loss(m)

    with pytest.raises(RuntimeError, match="evaluation failed"):
        select(directory, model, evaluate)
    assert len(calls) == 3
    assert_same(model, before)
    assert model.training and not model[1].training and model[0].training
    model[1].train()


def test_snapshot_files_are_read_once_for_the_whole_grid(run, monkeypatch):
    directory, model = run
    reads: list[tuple[str, str, int]] = []
    original = SafetensorsFile.read

    def counting(self, name, start=0, stop=None, out=None):
        reads.append((self.path.name, name, start))
        return original(self, name, start, stop, out)

    monkeypatch.setattr(SafetensorsFile, "read", counting)
    result = select(directory, model, val_loss)
    assert len(result.scores) >= 12 and result.passes == 1
    assert len(reads) == len(set(reads))  # no piece read twice
    files = sorted(p.name for p in directory.iterdir())
    assert len(files) == STEPS // SNAPSHOT_EVERY
    for snapshot in polyak.posthoc.find_snapshots(directory):
        averaged = [f"{k}/{n}" for k in range(2) for n in snapshot.names if n not in snapshot.copied]
        assert {name for file, name, _ in reads if file == snapshot.path.name} >= set(averaged)


def test_candidates_over_the_memory_cap_go_in_batches(run, monkeypatch):
    directory, model = run
    reads: list[int] = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, *a, **k: reads.append(1) or original(self, *a, **k))
    whole = select(directory, model, val_loss)
    one_pass, reads[:] = len(reads), []
    per_candidate = sum(v.numel() * v.element_size() for v in whole.state_dict.values())
    batched = select(directory, model, val_loss, max_memory=3 * per_candidate)
    assert batched.passes == math.ceil(len(whole.scores) / 3) and len(reads) == batched.passes * one_pass
    assert batched.scores == whole.scores and batched.chosen == whole.chosen
    assert batched.state_dict.keys() == whole.state_dict.keys()
    for name, value in whole.state_dict.items():
        assert torch.equal(batched.state_dict[name], value), name


def test_out_of_reach_candidates_are_reported_not_scored(run):
    directory, model = run
    widths = [0.004, 0.05, 0.08, 0.28]
    seen = []
    result = select(directory, model, lambda m: seen.append(1) or val_loss(m), sigma_rels=widths)
    snapshots = polyak.posthoc.find_snapshots(directory)
    steps = [s.step for s in snapshots for _ in s.sigma_rels]
    sigmas = [w for s in snapshots for w in s.sigma_rels]
    _, errors = solve_coefficients(steps, sigmas, STEPS, widths)
    assert errors[0] > MAX_FIT_ERROR and errors[3] > MAX_FIT_ERROR
    assert list(result.scores) == [0.05, 0.08] and len(seen) == 2
    assert result.left_out == pytest.approx({0.004: errors[0], 0.28: errors[3]})
    assert result.fit_errors == pytest.approx(dict(zip(widths, errors, strict=True)))
    with pytest.raises(ValueError, match=r"cannot express any of sigma_rels \['0.004', '0.28'\]") as error:
        select(directory, model, val_loss, sigma_rels=[0.004, 0.28])
    assert "\n" not in str(error.value)


def test_refinement_closes_in_on_the_best_width(run, tmp_path):
    """evaluate: distance of the weights to the reconstruction of sigma_rel 0.07, smallest (0) at that width."""
    directory, model = run
    reconstruct(directory, [0.07], [tmp_path / "target.safetensors"])
    goal = dict(open_safetensors(tmp_path / "target.safetensors"))

    def distance(m: nn.Module) -> float:
        current = m.state_dict()
        return sum(
            float((current[k].double() - v.double()).square().sum()) for k, v in goal.items() if v.is_floating_point()
        )

    coarse = select(directory, model, distance, sigma_rels=[0.03, 0.05, 0.1, 0.15])
    assert coarse.chosen in (0.05, 0.1) and coarse.passes == 1
    fine = select(directory, model, distance, sigma_rels=[0.03, 0.05, 0.1, 0.15], refine=8)
    assert fine.passes == 1 + len(fine.scores) - 4 <= 9
    assert abs(math.log(fine.chosen / 0.07)) < 0.02 < abs(math.log(coarse.chosen / 0.07))
    assert all(0.05 <= w <= 0.1 for w in list(fine.scores)[4:])  # between the best grid width's neighbours
    assert set(fine.fit_errors) == set(fine.scores)


def test_one_snapshot_or_none_is_a_one_line_error(tmp_path):
    model = regression()
    tracker = polyak.PostHocEMA(model)
    tracker.update()
    with pytest.raises(ValueError, match="no snapshots") as none:
        select(tmp_path, model, val_loss)
    tracker.snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"holds 1 snapshot .* needs at least 2") as one:
        select(tmp_path, model, val_loss)
    for error in (none, one):
        assert "\n" not in str(error.value)


def test_bad_scores_and_arguments(run, tmp_path):
    directory, model = run
    before = state(model)
    with pytest.raises(ValueError, match=r"NaN for sigma_rel 0.05.*inf") as nan:
        select(directory, model, lambda m: float("nan"), sigma_rels=[0.05])
    assert "\n" not in str(nan.value)
    assert_same(model, before)
    with pytest.raises(TypeError, match=r"returned a str for sigma_rel 0\.05"):
        select(directory, model, lambda m: "low", sigma_rels=[0.05])
    assert select(directory, model, lambda m: torch.tensor(2.5), sigma_rels=[0.05]).scores == {0.05: 2.5}
    ties = select(directory, model, lambda m: float("inf"), sigma_rels=[0.08, 0.05])
    assert ties.chosen == 0.08  # a tie goes to the first evaluated
    with pytest.raises(ValueError, match="mode must be 'min'"):
        select(directory, model, val_loss, mode="minimum")
    with pytest.raises(TypeError, match="evaluate must be a function"):
        select(directory, model, 0.5)
    with pytest.raises(ValueError, match=r"sigma_rels\[1\]"):
        select(directory, model, val_loss, sigma_rels=[0.05, 0.3])
    with pytest.raises(ValueError, match="named like a snapshot"):
        select(directory, model, val_loss, output=directory / "phema-1.safetensors")
    with pytest.raises(ValueError, match=r"'0\.weight' has shape"):
        select(directory, nn.Sequential(nn.Linear(3, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 1)), val_loss)
    with pytest.raises(ValueError, match="lacks"):
        select(directory, nn.Linear(4, 1), val_loss)


def test_multi_ema_select(tmp_path):
    model = regression()
    x, y = data(128, seed=0, noise=0.3)
    multi = polyak.MultiEMA(model, {"fast": 0.9, "slow": 0.99, "power": polyak.rules.PowerFunction(sigma_rel=0.1)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    multi.attach(optimizer)
    for i in range(60):
        loss = nn.functional.mse_loss(model(x[i % 4 :: 4]), y[i % 4 :: 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.train()
    before = state(model)
    result = multi.select(model, val_loss, mode="min", output=tmp_path / "chosen.pt")
    assert_same(model, before)
    assert model.training
    for name, average in multi.items():  # independent: a new module holding that average
        assert result.scores[name] == pytest.approx(val_loss(average.averaged_model()), abs=1e-6)
    assert result.chosen == min(result.scores, key=result.scores.__getitem__)
    expected = multi[result.chosen].averaged_model().state_dict()
    saved = torch.load(tmp_path / "chosen.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(result.state_dict[name], value) and torch.equal(saved[name], value), name
    assert result.widths == {"power": pytest.approx(0.1)} and result.fit_errors == {}
    with pytest.raises(ValueError, match="NaN for average 'fast'"):
        multi.select(model, lambda m: math.nan)
    assert_same(model, before)


def test_plot(run, tmp_path):
    pytest.importorskip("matplotlib")
    directory, model = run
    result = select(directory, model, val_loss, sigma_rels=[0.004, 0.03, 0.05, 0.07, 0.1, 0.15, 0.28])
    result.plot(tmp_path / "selection.png")
    png = (tmp_path / "selection.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_plot_without_matplotlib_names_the_extra(run, tmp_path, monkeypatch):
    import sys

    directory, model = run
    result = select(directory, model, val_loss, sigma_rels=[0.05])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"polyak\[plot\]"):
        result.plot(tmp_path / "x.png")
    assert np.isfinite(result.scores[0.05])


def test_bench_agrees_with_the_hand_written_loop():
    """benchmarks/posthoc_select.py at toy size: select and the reconstruct-load-evaluate loop choose alike."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "posthoc_select.py"
    spec = importlib.util.spec_from_file_location("posthoc_select_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.measure(layers=1, width=64, vocab=256, context=16, snapshots=8, widths=4, rounds=1)
    assert figures["widths"] == 4 and figures["ratio"] > 0
    assert "goal <= 0.6x" in bench.report(figures)
