"""Power-function EMA snapshots and post-hoc reconstruction (EDM2, arXiv:2312.02696)."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import math

import numpy as np
import pytest
import torch
from models import SmallCNN, TinyTransformer, train_steps
from torch import nn

import polyak
from polyak.cli import main
from polyak.io import open_safetensors
from polyak.posthoc import find_snapshots, reconstruct, solve_coefficients
from polyak.rules import PowerFunction, sigma_rel_to_gamma
from polyak.shadow import Shadow

# ---------------------------------------------------------------------- float64 reference from the formulas

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(200)


def profile(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
    """The power-function profile ``(gamma+1) tau**gamma / t**(gamma+1)`` on [0, t], 0 after."""
    return np.where(tau <= t, (gamma + 1) * np.clip(tau / t, 0, None) ** gamma / t, 0.0)


def integrate(f, breaks: list[float]) -> float:
    """Gauss-Legendre quadrature of ``f`` on [0, max(breaks)], piecewise between the sorted break points."""
    points = sorted({0.0, *breaks})
    total = 0.0
    for a, b in itertools.pairwise(points):
        tau = 0.5 * (b - a) * _NODES + 0.5 * (a + b)
        total += 0.5 * (b - a) * float(np.sum(_WEIGHTS * f(tau)))
    return total


def reference_coefficients(steps, sigmas, target_step, targets):
    """Algorithm 3 by numerical quadrature: normal equations, solve, normalise columns; residual by quadrature."""
    keep = [i for i, t in enumerate(steps) if t <= target_step]
    ts = [float(steps[i]) for i in keep]
    gs = [sigma_rel_to_gamma(sigmas[i]) for i in keep]
    gr = [sigma_rel_to_gamma(s) for s in targets]
    n, breaks = len(ts), [*ts, float(target_step)]
    a = np.array(
        [
            [
                integrate(lambda x, i=i, j=j: profile(x, ts[i], gs[i]) * profile(x, ts[j], gs[j]), breaks)
                for j in range(n)
            ]
            for i in range(n)
        ]
    )
    b = np.array(
        [
            [integrate(lambda x, i=i, g=g: profile(x, ts[i], gs[i]) * profile(x, target_step, g), breaks) for g in gr]
            for i in range(n)
        ]
    )
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x /= x.sum(axis=0)
    full = np.zeros((len(steps), len(targets)))
    full[keep] = x
    errors = []
    for r, g in enumerate(gr):

        def residual(tau, r=r, g=g):
            fit = sum(x[i, r] * profile(tau, ts[i], gs[i]) for i in range(n))
            return (profile(tau, target_step, g) - fit) ** 2

        norm = integrate(lambda tau, g=g: profile(tau, target_step, g) ** 2, breaks)
        errors.append(math.sqrt(integrate(residual, breaks) / norm))
    return full, np.array(errors)


STEPS = [200 * k for k in range(1, 11)] * 2
SIGMAS = [0.05] * 10 + [0.10] * 10


def test_coefficients_match_float64_quadrature_reference():
    targets = [0.04, 0.07, 0.12, 0.2]
    got, errors = solve_coefficients(STEPS, SIGMAS, 1600, targets)
    want, want_errors = reference_coefficients(STEPS, SIGMAS, 1600, targets)
    assert got.dtype == np.float64 and got.shape == (20, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(got.sum(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(errors, want_errors, rtol=1e-3, atol=1e-6)
    assert not got[[8, 9, 18, 19]].any()  # snapshots after the target step are not used


def test_stored_profile_gives_one_hot_coefficients():
    coefficients, errors = solve_coefficients(STEPS, SIGMAS, 1400, [0.05, 0.10])
    expected = np.zeros((20, 2))
    expected[6, 0] = expected[16, 1] = 1.0  # step 1400 with sigma_rel 0.05 and 0.10
    np.testing.assert_allclose(coefficients, expected, atol=1e-8)
    assert errors.max() < 1e-6


def test_coefficients_depend_only_on_step_ratios():
    a, ea = solve_coefficients(STEPS, SIGMAS, 2000, [0.07])
    b, eb = solve_coefficients([t * 1000 for t in STEPS], SIGMAS, 2_000_000, [0.07])
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ea, eb, rtol=1e-6)


def test_solve_errors():
    with pytest.raises(ValueError, match="no saved average at or before target_step=100"):
        solve_coefficients([200, 400], [0.05, 0.1], 100, [0.07])
    with pytest.raises(ValueError, match="same length"):
        solve_coefficients([200, 400], [0.05], 400, [0.07])
    with pytest.raises(ValueError, match="appears twice"):
        solve_coefficients([200, 200], [0.05, 0.05], 400, [0.07])
    with pytest.raises(ValueError, match="sigma_rel"):
        solve_coefficients([200], [0.05], 400, [0.3])


# ---------------------------------------------------------------------- the tracker


def test_update_every_keeps_the_profile():
    """Updating every 100 steps must not pile the weight onto early training (a known failure elsewhere).

    The parameter is 1 during the first 10% of training and 0 after, so the average is the profile's mass on
    the first 10%: exactly 0.1**(gamma+1), whatever the update interval.
    """
    model = nn.Linear(1, 1, bias=False).double()
    tracker = polyak.PostHocEMA(model, update_every=100)
    for step in range(1, 10_001):
        with torch.no_grad():
            model.weight.fill_(1.0 if step <= 1000 else 0.0)
        tracker.update()
    for k, rule in enumerate(tracker.rules):
        got = tracker.shadow.tensors(k)["weight"].item()
        assert got == pytest.approx(0.1 ** (rule.gamma + 1), rel=1e-9, abs=1e-300)
        assert got < 1e-6


@pytest.mark.parametrize("flat", [False, True])
def test_one_pass_update_matches_separate_shadows_in_bfloat16(flat):
    torch.manual_seed(0)
    model = SmallCNN().to(torch.bfloat16)
    if flat:  # the model's tensors tile one buffer: each staged batch is one copy
        polyak.flatten_parameters(model)
    tracker = polyak.PostHocEMA(model, sigma_rels=(0.05, 0.1, 0.2), update_every=2)
    separate = [Shadow(model) for _ in tracker.rules]
    for t in range(1, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        tracker.update()
        if t % 2 == 0:
            for rule, shadow in zip(tracker.rules, separate, strict=True):
                shadow.update(model, rule.weight(t, 2))
    for k, theirs in enumerate(separate):
        mine = tracker.shadow.tensors(k)
        assert mine["head.weight"].dtype == torch.float32
        for name, value in theirs.tensors().items():
            assert torch.equal(mine[name], value), name


def train_with_snapshots(tmp_path, steps=60, every=3, snapshot_every=6, direct=(0.05, 0.07, 0.1)):
    """Train a SmallCNN with a PostHocEMA writing snapshots, and direct power EMAs of the widths ``direct``.

    Also keeps, in float64, each averaged tensor's running integral of (theta - theta_init)**2 over steps, for
    the Cauchy-Schwarz bound of the reconstruction error. Returns the tracker, the direct EMAs' weights
    at every snapshot step, and the integrals at every snapshot step.
    """
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = polyak.PostHocEMA(model, directory=tmp_path, snapshot_every=snapshot_every, update_every=every)
    emas = {s: polyak.EMA(model, rule=PowerFunction(sigma_rel=s), update_every=every) for s in direct}
    initial = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    spread = {k: torch.zeros_like(v) for k, v in initial.items()}
    history: dict[int, dict] = {}

    def after_step():
        tracker.update()
        for ema in emas.values():
            ema.update()
        if tracker.step % every == 0:
            state = model.state_dict()
            for name in spread:
                spread[name] += every * (state[name].double() - initial[name]) ** 2
        if tracker.step % snapshot_every == 0:
            history[tracker.step] = {
                "direct": {s: {k: v.clone() for k, v in e.shadow.tensors().items()} for s, e in emas.items()},
                "spread": {k: v.clone() for k, v in spread.items()},
            }

    train_steps(model, optimizer, steps, after_step=after_step)
    return tracker, history


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 60-step run with snapshots and direct EMAs, shared by the reconstruction tests (read-only)."""
    directory = tmp_path_factory.mktemp("snapshots")
    _, history = train_with_snapshots(directory)
    return directory, history


def test_snapshot_files(tmp_path):
    tracker, _ = train_with_snapshots(tmp_path, steps=24)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"phema-{t:012d}.safetensors" for t in (6, 12, 18, 24)]  # no temporary files left
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(tmp_path / files[-1]), framework="pt") as f:
        metadata = f.metadata()
        assert metadata["step"] == "24" and metadata["optimizer_step"] == "24"
        assert json.loads(metadata["sigma_rels"]) == pytest.approx([0.05, 0.10])
        assert json.loads(metadata["gammas"]) == pytest.approx([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1)])
        assert metadata["polyak_version"] == polyak.__version__
        assert json.loads(metadata["names"]) == tracker.shadow.names
        assert json.loads(metadata["copied"]) == ["features.1.num_batches_tracked", "features.4.num_batches_tracked"]
        for k in range(tracker.count):
            for name, value in tracker.shadow.tensors(k).items():
                stored = f.get_tensor(f"{k}/{name}")
                assert stored.dtype == (torch.float32 if value.is_floating_point() else torch.int64)
                assert torch.equal(stored, value), name
    found = find_snapshots(tmp_path)
    assert [s.step for s in found] == [6, 12, 18, 24]


@pytest.mark.parametrize("step", [36, 60])
def test_stored_profile_reconstructs_the_direct_ema(tmp_path, trained, step):
    directory, history = trained
    out = tmp_path / "ema.safetensors"
    result = reconstruct(directory, [0.1], [out], step=step)
    assert result.errors[0] < 1e-6
    tensors = open_safetensors(out)
    metadata = tensors.metadata
    assert metadata["step"] == str(step) and float(metadata["sigma_rel"]) == 0.1
    for name, value in history[step]["direct"][0.1].items():
        got = tensors[name]
        if value.is_floating_point():
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got, value)


def test_reconstruction_in_pieces_is_identical(tmp_path, monkeypatch):
    train_with_snapshots(tmp_path / "snaps", steps=18, direct=())
    reconstruct(tmp_path / "snaps", [0.07, 0.1], [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    monkeypatch.setattr(polyak.posthoc.synthesis, "_CHUNK", 7)  # tensors split into flat pieces, across tensor ends
    reconstruct(tmp_path / "snaps", [0.07, 0.1], [tmp_path / "c.safetensors", tmp_path / "d.safetensors"])
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()


def test_other_profile_within_the_fit_bound(tmp_path, trained):
    """A width between the stored ones (0.07): |reconstructed - direct| <= ||p_r - fit||_2 ||theta - theta_init||_2.

    Both sides are integrals of the (piecewise constant) parameter trajectory against a profile; the fitted
    combination has unit mass like the target, so the difference is bounded by Cauchy-Schwarz. The bound uses
    the absolute L2 error, the relative one times ||p_r|| = (gamma+1) / sqrt((2 gamma + 1) t).
    """
    directory, history = trained
    out = tmp_path / "out.safetensors"
    result = reconstruct(directory, [0.07], [out])
    gamma, t = sigma_rel_to_gamma(0.07), 60
    absolute = result.errors[0] * (gamma + 1) / math.sqrt((2 * gamma + 1) * t)
    slack = 1e-6 * float(np.abs(result.coefficients).sum())
    tensors = open_safetensors(out)
    closer, floating = 0, 0
    for name, direct in history[60]["direct"][0.07].items():
        if not direct.is_floating_point():
            continue
        got = tensors[name].double()
        bound = absolute * history[60]["spread"][name].sqrt() + slack * (1 + direct.abs().double())
        assert torch.all((got - direct.double()).abs() <= bound), name
        nearest = history[60]["direct"][0.05][name].double()
        closer += int((got - direct).norm() < (nearest - direct).norm())
        floating += 1
    assert closer >= 0.8 * floating  # and it is closer than the nearest stored width


def test_tied_model_output_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()  # lm_head.weight is embed.weight
    tracker = polyak.PostHocEMA(model, directory=tmp_path / "snaps", snapshot_every=4)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, after_step=tracker.update)
    reconstruct(tmp_path / "snaps", [0.07], [tmp_path / "out.safetensors"])
    state = dict(open_safetensors(tmp_path / "out.safetensors"))
    assert torch.equal(state["lm_head.weight"], state["embed.weight"])
    TinyTransformer().load_state_dict(state, strict=True)


def test_resume_writes_the_same_snapshots(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = dict(snapshot_every=4, update_every=2)
    current = {"tracker": polyak.PostHocEMA(model, directory=tmp_path / "a", **options), "calls": 0}
    plain = polyak.PostHocEMA(model, directory=tmp_path / "b", **options)

    def after_step():
        current["tracker"].update()
        plain.update()
        current["calls"] += 1
        if current["calls"] == 10:
            buffer = io.BytesIO()
            torch.save(current["tracker"].state_dict(), buffer)
            buffer.seek(0)
            current["tracker"] = polyak.PostHocEMA(model, directory=tmp_path / "a", **options)
            current["tracker"].load_state_dict(torch.load(buffer))

    train_steps(model, optimizer, 20, after_step=after_step)
    a, b = find_snapshots(tmp_path / "a"), find_snapshots(tmp_path / "b")
    assert [s.step for s in a] == [s.step for s in b] == [4, 8, 12, 16, 20]
    assert len({s.run for s in a}) == 1  # the resumed run continued under its own identity
    run_a, run_b = a[0].run, b[0].run
    assert run_a and run_b and run_a != run_b  # two runs
    resumed, uninterrupted = a[-1].tensors, b[-1].tensors
    assert {k: v for k, v in resumed.metadata.items() if "run" not in k and "crc" not in k} == {
        k: v for k, v in uninterrupted.metadata.items() if "run" not in k and "crc" not in k
    }  # identical but for the run's name (and the header's checksum, which covers it)
    from safetensors.torch import load_file

    theirs = load_file(b[-1].path)
    assert all(torch.equal(value, theirs[key]) for key, value in load_file(a[-1].path).items())
    with pytest.raises(ValueError, match="update_every"):
        polyak.PostHocEMA(model, update_every=1).load_state_dict(plain.state_dict())


def test_cli(tmp_path, capsys):
    train_with_snapshots(tmp_path / "snaps", steps=30, direct=())
    out_a, out_b, png = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "profile.png"
    argv = ["posthoc", str(tmp_path / "snaps"), "--sigma-rel", "0.07", "0.1", "--step", "24"]
    plot = importlib.util.find_spec("matplotlib") is not None  # the core install has no matplotlib
    assert main([*argv, "-o", str(out_a), str(out_b), *(["--plot", str(png)] if plot else [])]) == 0
    printed = capsys.readouterr().out
    assert "sigma_rel 0.07" in printed and "at step 24 from 4 snapshots" in printed
    assert out_a.stat().st_size > 0 and out_b.stat().st_size > 0
    assert not plot or png.read_bytes()[:4] == b"\x89PNG"
    assert main(["posthoc", str(tmp_path / "missing"), "--sigma-rel", "0.1", "-o", str(out_a)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_input_errors(tmp_path):
    with pytest.raises(ValueError, match="no snapshots"):
        reconstruct(tmp_path, [0.1], [tmp_path.parent / "x.safetensors"])
    (tmp_path / "phema-1.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    with pytest.raises(ValueError, match="not a polyak snapshot"):
        find_snapshots(tmp_path)
    with pytest.raises(ValueError, match="one output path per target"):
        reconstruct(tmp_path, [0.1, 0.2], [tmp_path.parent / "x.safetensors"])
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="snapshot_every must be a positive multiple of update_every=2"):
        polyak.PostHocEMA(model, directory=tmp_path, snapshot_every=3, update_every=2)
    with pytest.raises(ValueError, match="sigma_rel"):
        polyak.PostHocEMA(model, sigma_rels=(0.5,))
    with pytest.raises(RuntimeError, match="first update"):
        polyak.PostHocEMA(model).snapshot(tmp_path)


def test_averaged_model_and_widths_as_given():
    torch.manual_seed(0)
    model = SmallCNN()
    tracker = polyak.PostHocEMA(model)
    assert tracker.sigma_rels == [0.05, 0.1] and repr(tracker.sigma_rels) == "[0.05, 0.1]"
    assert polyak.PostHocEMA(model, sigma_rels=(0.07,)).sigma_rels == [0.07]
    with pytest.warns(UserWarning, match="no update yet"):
        tracker.averaged_model()  # the model as built
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, optimizer, steps=3, after_step=tracker.update)
    for profile in (0, 1):
        copy = tracker.averaged_model(profile)
        assert copy is not model
        expected = tracker.shadow.tensors(profile)
        for name, value in copy.state_dict().items():
            if name in expected:
                assert torch.equal(value, expected[name].to(value.dtype)), name
    with pytest.raises(ValueError, match=r"profile must be in 0\.\.1"):
        tracker.averaged_model(2)


def test_a_step_that_is_no_snapshots_is_refused_unless_forced(tmp_path):
    """Between two snapshots the training since the earlier one is missing, after the last nothing was seen: both
    are refused naming why, unless forced."""
    train_with_snapshots(tmp_path / "snaps", steps=12, direct=())  # snapshots at steps 6 and 12
    out = tmp_path / "ema.safetensors"
    for step, where in ((9, "between snapshots"), (15, "after the last snapshot")):
        with pytest.raises(ValueError, match=where):
            reconstruct(tmp_path / "snaps", [0.1], [out], step=step)
    assert not out.exists()
    assert reconstruct(tmp_path / "snaps", [0.1], [out], step=9, force=True).step == 9


def test_a_snapshot_at_step_0_or_without_a_profiles_tensor_is_refused(tmp_path):
    """A snapshot is written after an update (step >= 1) and holds every profile's tensors: a file at step 0, or
    lacking the second profile's tensor, is refused naming the file; the same file rewritten intact is read."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tracker = polyak.PostHocEMA(nn.Linear(2, 2), sigma_rels=(0.05, 0.1))
    tracker.update()
    written = tracker.snapshot(tmp_path / "written")
    tensors = safetensors_torch.load_file(str(written))
    metadata = dict(open_safetensors(written).metadata)
    metadata.pop("polyak.crc32", None)  # rewritten below: as a file written by another tool, without checksums

    def folder(name: str, tensors: dict[str, torch.Tensor], step: str) -> object:
        (tmp_path / name).mkdir()
        path = tmp_path / name / f"phema-{int(step):012d}.safetensors"
        safetensors_torch.save_file(tensors, str(path), metadata=metadata | {"step": step})
        return tmp_path / name

    assert [s.step for s in find_snapshots(folder("intact", tensors, "1"))] == [1]
    with pytest.raises(ValueError, match="step 0 is not a positive int64"):
        find_snapshots(folder("zero", tensors, "0"))
    partial = {k: v for k, v in tensors.items() if k != "1/bias"}
    with pytest.raises(ValueError, match=r"lacks tensor '1/bias' \(1 missing\)"):
        find_snapshots(folder("partial", partial, "1"))
