"""`polyak demo`: runs end to end, is deterministic, reads its numbers honestly, rejects bad options."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy
import pytest
import torch

from polyak.cli import main

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import polyak
from polyak.commands.demo import plots, report
from polyak.commands.demo.data import HELD_OUT, mnist1d, with_label_noise
from polyak.commands.demo.recipe import (
    DIRECT_SIGMA_RELS,
    LAST,
    METHODS,
    POSTHOC,
    RECALCULATED,
    SETTINGS,
    SWEEP_SIGMA_RELS,
    cnn,
)
from polyak.commands.demo.train import Curves, Sweep, _evaluate, train
from polyak.posthoc import MAX_FIT_ERROR, solve_coefficients

FILES = ("accuracy.png", "sigma_rel.png", "selection.png", "table.md", "results.json")
BN_SETTING = next(s for s in SETTINGS if s.model == "cnn")
POSTHOC_SETTING = next(s for s in SETTINGS if s.posthoc)
RECALCULATED_ROWS = [m.name + RECALCULATED for m in METHODS if m.recalculate]


@pytest.fixture(scope="module")
def data():
    return mnist1d()


@pytest.fixture(autouse=True)
def one_thread():
    """As the demo itself runs: the models are tiny, and threads only fight over a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """`polyak demo --quick` run twice into two folders: (folder, printed text) for each."""
    runs = []
    for k in range(2):
        out = tmp_path_factory.mktemp(f"demo{k}") / "out"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["demo", "--quick", "--out", str(out)]) == 0
        runs.append((out, printed.getvalue()))
    return runs


@pytest.mark.slow
def test_quick_run_end_to_end(quick_runs):
    out, printed = quick_runs[0]
    for name in ("accuracy.png", "sigma_rel.png", "selection.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        assert str(out / name) in printed
    table = (out / "table.md").read_text()
    assert table.strip() in printed
    rows = [LAST, *(m.name for m in METHODS), POSTHOC, *RECALCULATED_ROWS]
    for name in rows:
        assert f"| {name} " in table
    flat = " ".join(table.split())  # the prose is filled to lines
    for setting in SETTINGS:
        assert f"{setting.name}: averaging " in flat  # one verdict per setting
    assert f"{BN_SETTING.name}: recomputing the BatchNorm statistics" in flat
    assert f"Post-hoc EMA ({POSTHOC_SETTING.name})" in flat

    record = json.loads((out / "results.json").read_text())
    assert set(record["settings"]) == {s.name for s in SETTINGS}
    for setting, curves in record["settings"].items():
        expected = [LAST, *(m.name for m in METHODS)] + (RECALCULATED_ROWS if setting == BN_SETTING.name else [])
        assert list(curves) == expected
        for name, per_seed in curves.items():
            assert len(per_seed) == 2  # quick: two seeds
            for curve in per_seed:
                assert len(curve) == len(record["steps"])
                final = curve[-1]
                assert math.isfinite(final) and 0.0 <= final <= 100.0, (setting, name, final)
        # the last iterate has learned something: above chance (10 classes) in every setting
        assert min(curve[-1] for curve in curves[LAST]) > 10.0
    for name in RECALCULATED_ROWS:  # so have the averages with recomputed BatchNorm statistics
        assert min(curve[-1] for curve in record["settings"][BN_SETTING.name][name]) > 10.0

    sweep = record["posthoc"][POSTHOC_SETTING.name]
    assert list(record["posthoc"]) == [POSTHOC_SETTING.name]
    assert sweep["sigma_rels"] == list(SWEEP_SIGMA_RELS)
    assert len(sweep["chosen_on_held_out"]) == 2 and set(sweep["chosen_on_held_out"]) <= set(SWEEP_SIGMA_RELS)
    for key in ("test", "held_out"):
        assert len(sweep[key]) == 2
        for values in sweep[key]:
            assert len(values) == len(SWEEP_SIGMA_RELS)
            assert all(math.isfinite(v) and 10.0 < v <= 100.0 for v in values), (key, values)
    for errors in sweep["profile_errors"]:
        assert all(0.0 <= e < 1.0 for e in errors)
    words = [" ".join(paragraph.split()) for paragraph in table.split("\n\n")]
    assert [" ".join(p.split()) for p in record["summaries"]] == words[2:4]  # the two paragraphs reading the table
    assert " ".join(record["notes"].split()) in words[0]  # filled to lines, nothing lost
    prose = [line for line in printed.splitlines() if not line.startswith("|")]  # the table's rows are not filled
    assert max(len(line) for line in prose) <= 100, max(prose, key=len)


@pytest.mark.slow
def test_quick_runs_are_byte_identical(quick_runs):
    (first, _), (again, _) = quick_runs
    for name in FILES:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_same_seed_same_numbers(data):
    def run(seed):
        return train(data, BN_SETTING, seed, steps=120, evaluations=3, advance=lambda n: None)

    first, again, other = run(0), run(0), run(1)
    assert first.steps == again.steps == [40, 80, 120]
    assert list(first.accuracy) == [LAST, *(m.name for m in METHODS), *RECALCULATED_ROWS]
    for name, curve in first.accuracy.items():
        numpy.testing.assert_array_equal(curve, again.accuracy[name])  # NaN == NaN here: SWA has not begun
    assert first.accuracy[LAST] != other.accuracy[LAST]


def test_posthoc_sweep_is_deterministic_and_complete(data):
    def run():
        return train(data, POSTHOC_SETTING, 0, steps=100, evaluations=4, advance=lambda n: None).sweep

    first, again = run(), run()
    assert first is not None and first == again
    # 4 snapshots of σrel 0.03 and 0.15 (steps 25..100) express only some widths: the others are left out, not scored
    _, errors = solve_coefficients(
        [t for t in (25, 50, 75, 100) for _ in range(2)], [0.03, 0.15] * 4, 100, SWEEP_SIGMA_RELS
    )
    expressible = [w for w, e in zip(SWEEP_SIGMA_RELS, errors, strict=True) if e <= MAX_FIT_ERROR]
    assert 0 < len(expressible) < len(SWEEP_SIGMA_RELS) and first.snapshots == 4
    assert first.sigma_rels == expressible and first.profile_errors == pytest.approx(
        list(errors[errors <= MAX_FIT_ERROR])
    )
    assert first.selection is not None and set(first.selection.left_out) == set(SWEEP_SIGMA_RELS) - set(expressible)
    assert all(math.isfinite(v) for v in first.test + first.held_out)
    assert first.chosen == first.sigma_rels[first.held_out.index(max(first.held_out))]  # the first among equals


def test_evaluation_leaves_the_model_as_it_was(data):
    """update_bn runs on the averages inside `swapped`: the training model's weights, BatchNorm statistics and
    mode come back exactly, so evaluating does not change the run."""
    torch.manual_seed(0)
    model = cnn(data.x.shape[1], data.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    trackers = {"EMA": polyak.EMA(model, decay=0.9), "SWA": polyak.SWA(model)}
    for tracker in trackers.values():
        tracker.attach(optimizer)
    for step in range(5):
        index = torch.arange(16) + 16 * step
        nn_loss = torch.nn.functional.cross_entropy(model(data.x[index]), data.y[index])
        optimizer.zero_grad()
        nn_loss.backward()
        optimizer.step()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    into = {name: [] for name in (LAST, "EMA", "SWA", "EMA" + RECALCULATED, "SWA" + RECALCULATED)}
    _evaluate(model, trackers, {"EMA", "SWA"}, data, into)
    assert model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(len(values) == 1 and math.isfinite(values[0]) for values in into.values())


def test_progress_counts_every_step(data):
    seen = []
    train(data, SETTINGS[0], 0, steps=100, evaluations=7, advance=seen.append)
    assert sum(seen) == 100


def test_dataset_is_the_standard_split_with_a_held_out_part(data):
    assert data.x.shape == (4000 - HELD_OUT, 40) and data.x_held_out.shape == (HELD_OUT, 40)
    assert data.y_held_out.shape == (HELD_OUT,) and data.x_test.shape == (1000, 40)
    assert data.x.dtype == torch.float32 and data.classes == 10
    assert "MNIST-1D" in data.source and f"{HELD_OUT} held out" in data.source


def test_label_noise_replaces_the_asked_share():
    labels = torch.arange(1000) % 10
    noisy = with_label_noise(labels, 0.3, 10, torch.Generator().manual_seed(0))
    changed = int((noisy != labels).sum())
    assert changed <= 300  # 300 replaced, about a tenth of them by their own class
    assert changed > 200
    assert torch.equal(with_label_noise(labels, 0.0, 10, torch.Generator()), labels)


def _runs(last, averaged, name="avg"):
    """One Curves per seed with the given final accuracies for the last iterate and one average."""
    return [Curves([1], {LAST: [a], name: [b]}) for a, b in zip(last, averaged, strict=True)]


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


@pytest.mark.parametrize(
    ("recalculated", "word"),
    [
        ([94.0, 95.0, 96.0], "helps"),
        ([90.2, 89.9, 90.1], "makes no clear difference"),
        ([80.0, 81.0, 79.0], "hurts"),
    ],
)
def test_recalculation_verdict_reads_the_numbers(recalculated, word):
    averaged = [90.0, 90.0, 90.0]
    runs = [
        Curves([1], {LAST: [85.0], "EMA": [a], "EMA" + RECALCULATED: [r]})
        for a, r in zip(averaged, recalculated, strict=True)
    ]
    text = report.recalculation_verdict("s", runs, test_size=1000)
    assert text is not None and text.endswith(f": recalculating {word}.")
    assert f"changes EMA by {sum(recalculated) / 3 - 90.0:+.1f} points" in text
    assert report.recalculation_verdict("s", _runs([1.0], [2.0]), test_size=1000) is None


def _swept(held_out, test, direct=(50.0, 50.0)):
    """A run with a sweep over SWEEP_SIGMA_RELS and the directly tracked widths' final accuracies."""
    rows = {LAST: [40.0], **{row: [value] for row, value in zip(DIRECT_SIGMA_RELS.values(), direct, strict=True)}}
    chosen = SWEEP_SIGMA_RELS[held_out.index(max(held_out))]  # as select chooses: the first among equals
    sweep = Sweep(list(SWEEP_SIGMA_RELS), test, held_out, [0.01] * len(test), 40, [0.03, 0.15], chosen)
    return Curves([1], rows, sweep)


def test_the_width_is_chosen_on_the_held_out_split_not_the_test_set():
    n = len(SWEEP_SIGMA_RELS)
    held_out = [50.0] * n
    held_out[1] = 60.0  # best on held out
    test = [50.0] * n
    test[-1] = 70.0  # best on test
    runs = [_swept(held_out, test), _swept(held_out, test)]
    assert report.chosen(runs) == 1
    assert report.finals(runs)[POSTHOC] == [50.0, 50.0]
    text = report.posthoc_summary("s", runs, test_size=1000)
    assert text is not None
    assert f"(σrel {SWEEP_SIGMA_RELS[1]:g}, {SWEEP_SIGMA_RELS[1]:g}) give 50.0 ± 0.0% test accuracy" in text
    assert f"on the test set itself, σrel {SWEEP_SIGMA_RELS[-1]:g} (70.0%)" in text


def test_posthoc_summary_reports_reconstructed_minus_direct():
    n = len(SWEEP_SIGMA_RELS)
    test = [50.0] * n
    test[SWEEP_SIGMA_RELS.index(0.05)] = 51.0
    test[SWEEP_SIGMA_RELS.index(0.10)] = 49.5
    runs = [_swept([50.0] * n, test, direct=(50.0, 50.0)), _swept([50.0] * n, test, direct=(50.5, 50.0))]
    text = report.posthoc_summary("s", runs, test_size=1000)
    assert text is not None
    assert "σrel 0.05 +0.75 ± 0.35 points (largest 1.00" in text
    assert "σrel 0.1 -0.50 ± 0.00 points (largest 0.50" in text
    assert "they agree within the noise level" in text  # 1.6 points on 1,000 test examples
    far = [_swept([50.0] * n, test, direct=(50.0, 40.0)), _swept([50.0] * n, test, direct=(50.0, 40.0))]
    assert "they differ by more than the noise at σrel 0.1." in (report.posthoc_summary("s", far, 1000) or "")
    assert report.posthoc_summary("s", _runs([1.0], [2.0]), test_size=1000) is None


def test_table_marks_rows_that_do_not_apply():
    results = {"a": _runs([60.0, 61.0], [62.0, 63.0]), "b": _runs([60.0, 61.0], [62.0, 63.0], name="other")}
    lines = report.table(results).splitlines()
    assert [cell.strip() for cell in lines[2].split("|")[1:4]] == ["last iterate", "60.5 ± 0.7", "60.5 ± 0.7"]
    assert f"| {report.MISSING}" in next(line for line in lines if line.startswith("| avg "))
    assert next(line for line in lines if line.startswith("| other ")).split("|")[2].strip() == report.MISSING


def test_every_method_has_its_own_colour_and_its_update_bn_row_is_the_same_colour_dashed():
    methods = [LAST, *(m.name for m in METHODS)]
    assert set(methods) <= set(plots.STYLES)
    assert len({plots.style(name)["color"] for name in methods}) == len(methods)
    assert {plots.style(name)["linestyle"] for name in methods} == {"-"}
    for row in RECALCULATED_ROWS:
        base = plots.style(row.removesuffix(RECALCULATED))
        assert plots.style(row)["color"] == base["color"] and plots.style(row)["linestyle"] == "--", row


def _first_update_at(decay):
    """The first update j at which TensorFlow's warm-up min(d, (1 + n) / (10 + n)), n = j - 1, reaches d."""
    j = 1
    while (1 + (j - 1)) / (10 + (j - 1)) < decay:
        j += 1
    return j


def test_the_warmup_note_says_what_each_ema_reaches_in_the_run():
    assert _first_update_at(0.999) > 4000 > _first_update_at(0.99)
    note = report.warmup_note(4000)
    assert f"EMA 0.99 reaches 0.99 after {_first_update_at(0.99):,} updates" in note
    assert f"EMA 0.999 ends at {4000 / 4009:.4f} (it would reach 0.999 after {_first_update_at(0.999):,})" in note
    assert "same average" not in note
    assert f"EMA 0.999 reaches 0.999 after {_first_update_at(0.999):,} updates" in report.warmup_note(10_000)
    short = report.warmup_note(600)  # neither reaches its decay: both follow (1+n)/(10+n) all along
    assert f"EMA 0.99 ends at {600 / 609:.4f}" in short and "EMA 0.99 and EMA 0.999 are the same average" in short


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_follows_the_terminal(terminal, monkeypatch, capsys):
    """A bar on a terminal; with stderr sent to a file, one line per setting instead of a bar's ~800 updates."""
    from polyak.commands.demo import session

    def fake_train(data, setting, seed, steps, evaluations, advance):
        for _ in range(evaluations):
            advance(steps // evaluations)

    monkeypatch.setattr(session, "train", fake_train)
    stderr = _Terminal() if terminal else None
    if stderr is not None:
        monkeypatch.setattr("sys.stderr", stderr)
    session._train_all(None, seeds=5, steps=4000)
    written = stderr.getvalue() if stderr is not None else capsys.readouterr().err
    if terminal:
        assert "\r" in written and "polyak demo" in written
    else:
        assert "\r" not in written and written.count("\n") == len(SETTINGS), written
        for setting in SETTINGS:
            assert f"training {setting.name} (" in written


def test_noise_level_is_at_least_the_test_set_error():
    # identical gains on every seed: only the test set's own sampling error remains
    assert report.noise_level([1.0, 1.0, 1.0], 50.0, 10_000) == pytest.approx(0.5)
    assert report.noise_level([0.0, 4.0], 50.0, 10_000) == pytest.approx(2 * math.sqrt(8) / math.sqrt(2))


def test_help_names_every_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("EMA 0.99", "0.999", "SWA", "power-function EMA", "BEMA", "update_bn", "PostHocEMA", "σrel"):
        assert words in text, words


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
