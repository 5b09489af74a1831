"""Averaging and exporting checkpoint files, through the API and the ``polyak`` command, on real files."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from models import SmallCNN, TinyTransformer
from torch.optim.swa_utils import AveragedModel

import polyak
from polyak.checkpoints import newest_checkpoints
from polyak.cli import main
from polyak.io import CheckpointError


def trained(seed: int) -> SmallCNN:
    """A SmallCNN with distinct weights and BatchNorm statistics (and ``num_batches_tracked`` = seed + 1)."""
    torch.manual_seed(seed)
    model = SmallCNN()
    model.train()
    for _ in range(seed + 1):
        model(torch.randn(4, 3, 8, 8))
    return model


def write_inputs(folder: Path, count: int, kind: str, dtype: torch.dtype = torch.float32) -> list[Path]:
    """``count`` checkpoints: ``safetensors``, a plain ``pt`` state dict, or a ``training`` checkpoint dict."""
    paths = []
    for i in range(count):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in trained(i).state_dict().items()}
        path = folder / f"ckpt_{i}.{'safetensors' if kind == 'safetensors' else 'pt'}"
        if kind == "safetensors":
            safetensors.torch.save_file(state, path)
        elif kind == "pt":
            torch.save(state, path)
        else:
            torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "step": i}, path)
        paths.append(path)
    return paths


def reference(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted average in float64, from whole files loaded the ordinary way."""
    states = [safetensors.torch.load_file(p) if p.suffix == ".safetensors" else torch.load(p) for p in paths]
    states = [s.get("model", s) for s in states]
    out = {}
    for name, last in states[-1].items():
        if last.is_floating_point():
            out[name] = sum(w * s[name].double() for w, s in zip(weights, states, strict=True))
        else:
            out[name] = last
    return out


def check_close(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert set(result) == set(expected)
    for name, want in expected.items():
        got = result[name]
        if want.is_floating_point():
            assert got.dtype == dtype, name
            # float32 accumulation: error ~1e-7 relative; only the final rounding to a narrow dtype adds more
            tol = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float64: 1e-12}[dtype]
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=name)
        else:
            assert torch.equal(got, want), name


@pytest.mark.parametrize("kind", ["safetensors", "pt", "training"])
def test_uniform_weighted_and_ema_match_a_float64_reference(tmp_path: Path, kind: str) -> None:
    paths = write_inputs(tmp_path, 3, kind)
    d = 0.6
    cases = {
        "uniform": ({}, [1 / 3] * 3),
        "weighted": ({"weights": [1, 0, 3]}, [0.25, 0.0, 0.75]),
        "ema": ({"ema_decay": d}, [d * d, (1 - d) * d, 1 - d]),
    }
    for options, weights in cases.values():
        average = polyak.average_checkpoints(paths, **options)
        assert average.weights == pytest.approx(weights, abs=1e-15)
        check_close(dict(average), reference(paths, weights), torch.float32)
    assert dict(average)["features.1.num_batches_tracked"] == 3  # integers come from the last file


def test_low_precision_inputs_are_accumulated_in_float32(tmp_path: Path) -> None:
    paths = write_inputs(tmp_path, 4, "safetensors", torch.bfloat16)
    expected = reference(paths, [0.25] * 4)
    check_close(dict(polyak.average_checkpoints(paths)), expected, torch.bfloat16)
    check_close(dict(polyak.average_checkpoints(paths, dtype=torch.float32)), expected, torch.float32)


def test_large_tensors_are_read_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("polyak.checkpoints._CHUNK", 7)  # every tensor spans several pieces
    for kind in ("safetensors", "pt"):
        folder = tmp_path / kind
        folder.mkdir()
        paths = write_inputs(folder, 3, kind, torch.float16)
        average = polyak.average_checkpoints(paths, weights=[3, 2, 1], dtype=torch.float32)
        check_close(dict(average), reference(paths, [0.5, 1 / 3, 1 / 6]), torch.float32)


def test_the_average_loads_into_a_model_and_streams_to_either_format(tmp_path: Path) -> None:
    paths = write_inputs(tmp_path, 2, "training")
    average = polyak.average_checkpoints(paths)
    assert [f.key for f in average.inputs] == ["model", "model"]
    assert "using 'model'" in (average.inputs[0].note or "")
    SmallCNN().load_state_dict(average)
    expected = dict(average)
    polyak.save_state_dict(average, tmp_path / "avg.safetensors")
    polyak.save_state_dict(average, tmp_path / "avg.pt")
    for loaded in (safetensors.torch.load_file(tmp_path / "avg.safetensors"), torch.load(tmp_path / "avg.pt")):
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()) and set(loaded) == set(expected)


def test_sharded_checkpoints_are_read_through_their_index(tmp_path: Path) -> None:
    paths = []
    for i, kind in enumerate(["safetensors", "bin"]):
        folder = tmp_path / f"checkpoint-{i}"
        folder.mkdir()
        state = trained(i).state_dict()
        names = list(state)
        weight_map = {}
        for part, shard in enumerate([names[: len(names) // 2], names[len(names) // 2 :]]):
            file = f"model-{part + 1:05d}-of-00002.{kind}"
            tensors = {name: state[name] for name in shard}
            if kind == "safetensors":
                safetensors.torch.save_file(tensors, folder / file)
            else:
                torch.save(tensors, folder / file)
            weight_map.update(dict.fromkeys(shard, file))
        index = folder / f"model.{kind}.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        torch.save(state, folder / "whole.pt")
        paths.append(index)
    expected = reference([tmp_path / f"checkpoint-{i}" / "whole.pt" for i in range(2)], [0.5, 0.5])
    check_close(dict(polyak.average_checkpoints(paths)), expected, torch.float32)
    broken = json.loads(paths[0].read_text())
    broken["weight_map"]["head.bias"] = "model-00001-of-00002.safetensors"
    paths[0].write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="which does not hold it") as caught:
        polyak.average_checkpoints(paths)
    assert "'head.bias' in model-00001-of-00002.safetensors" in str(caught.value)


def test_mismatched_inputs_name_the_file_and_tensor(tmp_path: Path) -> None:
    model = trained(0).state_dict()
    variants = {
        "a.pt": model,
        "missing.pt": {k: v for k, v in model.items() if k != "head.bias"},
        "shape.pt": {**model, "head.bias": torch.zeros(11)},
        "dtype.pt": {**model, "head.bias": model["head.bias"].double()},
    }
    for name, state in variants.items():
        torch.save(state, tmp_path / name)
    a = tmp_path / "a.pt"
    for name, expected in [("missing.pt", "not in"), ("shape.pt", "shape (11,)"), ("dtype.pt", "float64")]:
        with pytest.raises(CheckpointError, match="strict=False") as caught:
            polyak.average_checkpoints([a, tmp_path / name])
        assert "'head.bias'" in str(caught.value) and name in str(caught.value) and expected in str(caught.value)
        loose = polyak.average_checkpoints([a, tmp_path / name], strict=False)
        assert set(loose) == set(model) - {"head.bias"} and list(loose.left_out) == ["head.bias"]


def test_bad_weights_and_inputs_are_refused(tmp_path: Path) -> None:
    paths = write_inputs(tmp_path, 2, "pt")
    for options, expected in [
        ({"weights": [1.0]}, "2 checkpoints"),
        ({"weights": [0.0, 0.0]}, "not all zero"),
        ({"weights": [1.0, -1.0]}, ">= 0"),
        ({"ema_decay": 1.0}, r"\[0, 1\)"),
        ({"weights": [1, 1], "ema_decay": 0.5}, "not both"),
        ({"dtype": torch.int32}, "floating-point"),
    ]:
        with pytest.raises(CheckpointError, match=expected):
            polyak.average_checkpoints(paths, **options)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        polyak.average_checkpoints([])


def training_checkpoint(path: Path) -> tuple[TinyTransformer, polyak.EMA]:
    """A model trained a few steps with a polyak EMA, saved as a training checkpoint with both states."""
    torch.manual_seed(0)
    model = TinyTransformer()
    ema = polyak.EMA(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randint(0, 50, (2, 16))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
    compiled = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # as torch.compile's wrapper names them
    state = {"model": compiled, "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(state, path)
    return model, ema


def test_export_finds_the_polyak_ema_and_gives_a_model_ready_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "train.pt"
    _, ema = training_checkpoint(path)
    exported = polyak.export_weights(path)
    assert exported.source.key == "ema.shadow" and "'model'" in (exported.source.note or "")
    fresh = TinyTransformer()
    # The shadow stores tied tensors once and saves them under every name, so the export loads strictly.
    fresh.load_state_dict(exported)
    for name, tensor in ema.shadow.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor.to(fresh.state_dict()[name].dtype)), name
    model_weights = polyak.export_weights(path, key="model")  # _orig_mod. removed
    TinyTransformer().load_state_dict(model_weights)
    half = polyak.export_weights(path, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.values() if v.is_floating_point())


def test_export_of_an_averaged_model_state_drops_its_wrapping(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    swa = AveragedModel(model)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        swa.update_parameters(model)
    torch.save(swa.state_dict(), tmp_path / "swa.pt")
    polyak.save_state_dict(polyak.export_weights(tmp_path / "swa.pt"), tmp_path / "model.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "model.safetensors")
    fresh = SmallCNN()
    fresh.load_state_dict(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in swa.module.state_dict().items())


def test_ambiguous_training_checkpoints_ask_for_a_key(tmp_path: Path) -> None:
    a, b = trained(0).state_dict(), trained(1).state_dict()
    torch.save({"student": a, "teacher": b}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"'student', 'teacher'.*--key"):
        polyak.average_checkpoints([tmp_path / "two.pt"])
    picked = polyak.average_checkpoints([tmp_path / "two.pt"], key="teacher")
    assert torch.equal(dict(picked)["head.weight"], b["head.weight"])
    with pytest.raises(CheckpointError, match="no key 'nope'"):
        polyak.average_checkpoints([tmp_path / "two.pt"], key="nope")


def test_newest_checkpoints_by_step_number_then_by_time(tmp_path: Path) -> None:
    for name in ["ckpt_9.pt", "ckpt_100.pt", "ckpt_10.pt", "checkpoint_best.pt", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    chosen, how = newest_checkpoints(tmp_path, 2)
    assert [p.name for p in chosen] == ["ckpt_10.pt", "ckpt_100.pt"] and "step" in how
    timed = tmp_path / "timed"
    timed.mkdir()
    for age, name in enumerate(["new.pt", "mid.pt", "old.pt"]):
        (timed / name).write_bytes(b"")
        os.utime(timed / name, (time.time() - 100 * age,) * 2)
    assert [p.name for p in newest_checkpoints(timed, 2)[0]] == ["mid.pt", "new.pt"]
    for step in (500, 1000, 1500):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
    chosen, _ = newest_checkpoints(tmp_path / "checkpoint-*" / "model.safetensors", 2)
    assert [p.parent.name for p in chosen] == ["checkpoint-1000", "checkpoint-1500"]
    with pytest.raises(CheckpointError, match="found 3"):
        newest_checkpoints(tmp_path, 4)


def test_command_line_average_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_inputs(tmp_path, 3, "training")
    out = tmp_path / "avg.safetensors"
    assert main(["average", "--last", "2", str(tmp_path), "--ema", "0.5", "-o", str(out)]) == 0
    report = capsys.readouterr().err
    assert "ckpt_1.pt, " in report and "2 checkpoints: using 'model'" in report and "wrote" in report
    expected = reference([tmp_path / "ckpt_1.pt", tmp_path / "ckpt_2.pt"], [0.5, 0.5])
    check_close(safetensors.torch.load_file(out), expected, torch.float32)
    with safetensors.safe_open(out, "pt") as f:
        assert "ckpt_2.pt" in f.metadata()["polyak"]
    assert main(["export", str(out), "-o", str(tmp_path / "model.pt"), "-q"]) == 0
    SmallCNN().load_state_dict(torch.load(tmp_path / "model.pt"))
    smaller = {k: v for k, v in torch.load(tmp_path / "model.pt").items() if k != "head.bias"}
    torch.save(smaller, tmp_path / "smaller.pt")
    capsys.readouterr()
    argv = ["average", str(tmp_path / "model.pt"), str(tmp_path / "smaller.pt"), "-o", str(tmp_path / "common.pt")]
    assert main(argv) == 2 and "--no-strict" in capsys.readouterr().err
    assert main([*argv, "--no-strict"]) == 0 and "left out 1 tensor not" in capsys.readouterr().err
    assert set(torch.load(tmp_path / "common.pt")) == set(smaller)
    with pytest.raises(SystemExit) as help_exit:
        main(["average", "--help"])
    assert help_exit.value.code == 0 and "examples:" in capsys.readouterr().out


def test_command_line_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_inputs(tmp_path, 1, "pt")[0]
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:-100])
    torch.save({"model": trained(0).state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pt")
    cases = [
        (["average", str(good), str(tmp_path / "missing.pt")], "no such file"),
        (["average", str(good), str(tmp_path / "cut.safetensors")], "truncated"),
        (["average", str(good), str(tmp_path / "cut.pt")], "truncated or corrupt"),
        (["export", str(tmp_path / "cut.safetensors")], "truncated"),
        (["export", str(tmp_path / "pickled.pt")], "never unpickles (Unsupported global: GLOBAL argparse.Namespace)"),
        (["average", "--last", "5", str(tmp_path)], "asked for the last 5"),
    ]
    for argv, expected in cases:
        assert main([*argv, "-o", str(tmp_path / "out.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"polyak {argv[0]}: error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.safetensors").exists()


def test_output_may_not_replace_one_of_the_inputs(tmp_path: Path) -> None:
    paths = write_inputs(tmp_path, 2, "safetensors")
    before = paths[0].read_bytes()
    average = polyak.average_checkpoints(paths)
    with pytest.raises(CheckpointError, match="is a file this state dict is read from"):  # inputs are read-only
        polyak.save_state_dict(average, paths[0])
    assert paths[0].read_bytes() == before
    check_close(dict(average), reference(paths, [0.5, 0.5]), torch.float32)
