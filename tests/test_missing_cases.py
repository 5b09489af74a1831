"""Cases that bugs planted in the code showed missing: each compares against torch or a float64 reference."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.optim.swa_utils as ts
from models import SmallCNN, TinyTransformer, train_steps
from torch import nn

import polyak
import polyak.swa_utils as ps
from polyak import kernels
from polyak.io import open_safetensors, save_state_dict
from polyak.posthoc import find_snapshots

# ---------------------------------------------------------------------- PostHocEMA with a start step


@pytest.mark.parametrize(("start_step", "every"), [(3, 1), (5, 2)])
def test_posthoc_start_step_matches_float64_power_function(tmp_path, start_step, every):
    """The profiles start at ``start_step``: beta_j = (1 - 1/j)**(gamma + 1), j counted from there (float64)."""
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gammas = (6.94, 16.97)
    tracker = polyak.PostHocEMA(
        model, gammas=gammas, start_step=start_step, update_every=every, directory=tmp_path, snapshot_every=2 * every
    )
    averaged = [n for n, mode in tracker.shadow.modes().items() if mode == "average"]
    reference: list[dict[str, torch.Tensor]] = [{} for _ in gammas]
    calls = {"n": 0, "last": 0}

    def after_step() -> None:
        tracker.update()
        calls["n"] += 1
        t = calls["n"] - start_step  # steps since averaging began
        if t < 1 or t % every:
            return
        state = model.state_dict()
        for k, gamma in enumerate(gammas):
            kept = 1.0
            for j in range(calls["last"] + 1, t + 1):
                kept *= (1.0 - 1.0 / j) ** (gamma + 1.0)  # j = 1 keeps nothing: the first update copies
            for name in averaged:
                now = state[name].double()
                reference[k][name] = now.clone() if kept == 0.0 else kept * reference[k][name] + (1 - kept) * now
        calls["last"] = t

    train_steps(model, optimizer, 17, after_step=after_step)
    assert tracker.last_update_step == calls["last"] and tracker.num_updates == (17 - start_step) // every
    for k in range(tracker.count):
        for name in averaged:
            torch.testing.assert_close(
                tracker.shadow.tensors(k)[name].double(), reference[k][name], rtol=1e-5, atol=1e-6
            )
    snapshots = find_snapshots(tmp_path)
    assert [s.step for s in snapshots] == list(range(2 * every, 17 - start_step + 1, 2 * every))
    metadata = open_safetensors(snapshots[-1].path).metadata
    assert int(metadata["optimizer_step"]) == start_step + snapshots[-1].step


# ---------------------------------------------------------------------- polyak's helpers as torch calls them


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (ps.get_ema_avg_fn(0.9), ts.get_ema_avg_fn(0.9)),
        (ps.get_ema_avg_fn(0.37), ts.get_ema_avg_fn(0.37)),
        (ps.get_swa_avg_fn(), ts.get_swa_avg_fn()),
        (ps.get_ema_multi_avg_fn(0.8), ts.get_ema_multi_avg_fn(0.8)),
    ],
)
@pytest.mark.parametrize("use_buffers", [False, True])
def test_per_tensor_helpers_inside_torchs_averaged_model(ours, theirs, use_buffers):
    """torch's AveragedModel calls ``avg_fn(averaged, current, num_averaged)`` per tensor (num_averaged a tensor)."""
    torch.manual_seed(3)
    model = TinyTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    kind = "multi_avg_fn" if "multi" in type(ours).__name__.lower() else "avg_fn"
    a = ts.AveragedModel(model, use_buffers=use_buffers, **{kind: ours})
    b = ts.AveragedModel(model, use_buffers=use_buffers, **{kind: theirs})
    train_steps(model, optimizer, 6, after_step=lambda: (a.update_parameters(model), b.update_parameters(model)))
    for (name, x), (_, y) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)
    assert int(a.n_averaged) == int(b.n_averaged) == 6


def test_per_tensor_helper_returns_the_weighted_value():
    averaged, current = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    out = ps.get_ema_avg_fn(0.75)(averaged, current, torch.tensor(4))
    torch.testing.assert_close(out, 0.75 * averaged + 0.25 * current)
    out = ps.get_swa_avg_fn()(averaged, current, torch.tensor(3))
    torch.testing.assert_close(out, averaged + (current - averaged) / 4)
    assert torch.equal(averaged, torch.tensor([1.0, 2.0]))  # returned, not written in place


# ---------------------------------------------------------------------- the 8-byte alignment io.py promises


def test_safetensors_output_keeps_every_tensor_aligned(tmp_path: Path):
    state = {
        "a_bytes": torch.arange(7, dtype=torch.uint8),
        "b_half": torch.randn(3).half(),
        "c_double": torch.randn(5, dtype=torch.float64),
        "d_flag": torch.tensor([True, False, True]),
        "e_float": torch.randn(3),
        "f_long": torch.arange(3),
        "g_empty": torch.zeros(0, dtype=torch.float64),
    }
    for extra in range(9):  # headers of every length modulo 8
        path = tmp_path / f"s{extra}.safetensors"
        save_state_dict(state, path, metadata={"pad": "x" * extra})
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        start = 8 + length
        assert start % 8 == 0, extra
        header = json.loads(raw[8:start])
        for name, tensor in state.items():
            begin, end = header[name]["data_offsets"]
            assert (start + begin) % tensor.element_size() == 0, (extra, name)  # aligned for its own dtype
            assert end - begin == tensor.numel() * tensor.element_size(), name
            if tensor.numel():
                data = torch.frombuffer(bytearray(raw[start + begin : start + end]), dtype=tensor.dtype)
                assert torch.equal(data, tensor.reshape(-1)), name


# ---------------------------------------------------------------------- the overlapped (offload) staging loop


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("flat_shadow", [True, False])
@pytest.mark.parametrize("keep", [None, True, False])
def test_overlapped_staging_matches_float64_with_an_asymmetric_weight(monkeypatch, keep, flat_shadow, overlap):
    """The offload path's loop (stage batch b+1, then fold batch b) runs on CPU when told it is offloaded.

    A weight of 0.1 tells ``w`` from ``1 - w``; small chunks give several batches and split tensors; shadows
    that are views of one flat buffer are lerped range by range, separate ones piece by piece.
    """
    monkeypatch.setattr(kernels, "CHUNK", 37)
    monkeypatch.setattr(kernels, "_offloaded", lambda shadow, model: overlap)
    torch.manual_seed(0)
    shapes = [(5, 4), (100,), (3,), (0,), (9, 9)]
    shadows = [torch.randn(s) for s in shapes]
    models = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    flat = torch.cat([s.reshape(-1) for s in shadows])
    views, offset = [], 0
    for s in shadows:  # shadows as views into one flat buffer, as the shadow stores them
        views.append(flat[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    if not flat_shadow:  # separate tensors (as adopted storage is): each batch lerps a list of pieces
        views = [v.clone() for v in views]
    cast = kernels.Fold([views], models, guard=keep is not None)
    assert cast.overlap == overlap and len(cast.scratches) == 1 + overlap and len(cast.batches) > 3
    expected = [v.double() + 0.1 * (m.double() - v.double()) for v, m in zip(views, models, strict=True)]
    if keep is False:
        expected = [v.double().clone() for v in views]
    cast.run([0.1], None if keep is None else torch.tensor(keep))
    for value, reference in zip(views, expected, strict=True):
        torch.testing.assert_close(value.double(), reference, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- the first update copies, even over garbage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_first_update_copies_over_non_finite_initial_values(dtype, garbage):
    """An average built while the model held garbage (``torch.empty``, a failed init) becomes the model, exactly:
    a lerp by 1 is not a copy there (``inf + 1 * (x - inf)`` is NaN)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(garbage)
    ema = polyak.EMA(model, decay=0.9)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    ema.update()
    for name, value in ema.shadow.tensors().items():
        assert torch.equal(value, dict(model.named_parameters())[name].to(value.dtype)), name
