"""Writes that only add, and inputs that stay read-only: every writer of polyak, from Python and the command line.

Folder writers (``export_pretrained``, ``save_pretrained``, ``polyak export --like``) add their files to the
target and keep the user's; a name the target holds is replaced only with ``overwrite``; a kill at any moment
leaves each file old or complete-new. No writer writes over, into or around one of its inputs, whatever the
spelling of the path (``./``, ``..``, a symbolic link, a hard link).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import polyak
from polyak.cli import main
from polyak.io import CheckpointError, open_safetensors, save_state_dict
from polyak.posthoc import reconstruct

SRC = str(Path(polyak.__file__).resolve().parents[1])  # the polyak under test, for the child process
WORKER = str(Path(__file__).with_name("export_worker.py"))


def make_inputs(root: Path, elements: int = 1 << 12) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A reference folder (config, tokenizer, safetensors weights) and a checkpoint holding weights of its names."""
    torch.manual_seed(0)
    like = root / "base"
    like.mkdir(parents=True)
    base = {"encoder.weight": torch.randn(64, elements // 64), "encoder.bias": torch.randn(64)}
    save_state_dict(base, like / "model.safetensors")
    (like / "config.json").write_text('{"hidden": 64}')
    (like / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    averaged = {name: value + 1.0 for name, value in base.items()}
    torch.save(averaged, root / "last.pt")
    return like, root / "last.pt", averaged


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_folder(folder: Path) -> dict[str, bytes]:
    """A folder of the user's own files (a README, a log in a sub-folder), as it was before any export."""
    (folder / "logs").mkdir(parents=True)
    (folder / "README.md").write_text("my notes\n")
    (folder / "logs" / "train.log").write_text("step 1 loss 3.2\n")
    return tree(folder)


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"polyak {argv[0]}: error: "), err
    assert expected in err[0], (expected, err[0])
    return err[0]


# ---------------------------------------------------------------------------------------------- only adding


def test_export_adds_its_files_and_keeps_the_users(tmp_path):
    like, checkpoint, averaged = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    before = users_folder(out)
    folder, left_out = polyak.export_pretrained(checkpoint, like, out)
    assert left_out == []
    after = tree(folder)
    assert {name: after[name] for name in before} == before  # every file of the user's, untouched
    assert sorted(set(after) - set(before)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert after["config.json"] == (like / "config.json").read_bytes()
    written = open_safetensors(out / "model.safetensors")
    for name, value in averaged.items():
        assert torch.equal(written[name], value), name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no building folder left


def test_a_name_the_folder_holds_is_replaced_only_with_overwrite(tmp_path, capsys):
    like, checkpoint, averaged = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    users_folder(out)
    (out / "config.json").write_text('{"mine": true}')
    (out / "config.json").chmod(0o600)
    before = tree(out)
    message = "already holds 'config.json', which this write would replace; pass overwrite=True (--overwrite)"
    with pytest.raises(CheckpointError, match=r"already holds 'config\.json', which this write would replace"):
        polyak.export_pretrained(checkpoint, like, out)
    argv = ["export", str(checkpoint), "--like", str(like), "-o", str(out)]
    assert message in one_line_exit_2(capsys, argv, "already holds")
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    assert main([*argv, "--overwrite", "-q"]) == 0
    after = tree(out)
    assert after["config.json"] == (like / "config.json").read_bytes()  # replaced, and only that name
    assert {name: after[name] for name in before if name != "config.json"} == {
        name: data for name, data in before.items() if name != "config.json"
    }
    assert (out / "config.json").stat().st_mode & 0o777 == 0o600  # a replaced file keeps its permission bits
    assert torch.equal(open_safetensors(out / "model.safetensors")["encoder.bias"], averaged["encoder.bias"])
    one_line_exit_2(capsys, ["export", str(checkpoint), "-o", str(tmp_path / "w.pt"), "--overwrite"], "--like only")


def test_a_folder_in_the_way_of_a_name_is_refused_even_with_overwrite(tmp_path):
    like, checkpoint, _ = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    (out / "model.safetensors").mkdir(parents=True)  # a folder of the user's where the weights would go
    (out / "model.safetensors" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"'model\.safetensors' cannot be written, .* is in the way"):
        polyak.export_pretrained(checkpoint, like, out, overwrite=True)
    assert tree(out) == {"model.safetensors/keep.txt": b"mine"}


class Pretrained(nn.Module):
    """A model with its own ``save_pretrained`` (as transformers and diffusers models have): config + weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.config = {"_name_or_path": ""}

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        Path(directory, "sub").mkdir(parents=True, exist_ok=True)
        Path(directory, "config.json").write_text(json.dumps({"in": 3, "out": 2}))
        Path(directory, "sub", "extra.txt").write_text("written by the model")
        save_state_dict(self.state_dict(), Path(directory, "model.safetensors"))


def test_save_pretrained_adds_its_files_and_keeps_the_users(tmp_path, monkeypatch):
    model = Pretrained()
    ema = polyak.EMA(model, decay=0.5)
    ema.update()
    with torch.no_grad():
        model.layer.weight.add_(1.0)
    ema.update()
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "mine.txt").write_text("mine")
    before = users_folder(out)
    polyak.save_pretrained(ema, out)
    after = tree(out)
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == ["config.json", "model.safetensors", "sub/extra.txt"]
    saved = open_safetensors(out / "model.safetensors")
    torch.testing.assert_close(saved["layer.weight"], expected["layer.weight"] - 0.5, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"already holds 'config\.json' \(and 2 more\)"):
        polyak.save_pretrained(ema, out)
    polyak.save_pretrained(ema, out, overwrite=True)
    assert tree(out) == after

    monkeypatch.chdir(out)
    with pytest.raises(CheckpointError, match="is the current directory or holds it"):
        polyak.save_pretrained(ema, ".", overwrite=True)
    model.config["_name_or_path"] = str(tmp_path / "base")  # as from_pretrained("…/base") records it
    (tmp_path / "base").mkdir()
    with pytest.raises(CheckpointError, match="is the folder the model was loaded from"):
        polyak.save_pretrained(ema, tmp_path / "base")
    assert list((tmp_path / "base").iterdir()) == []


def test_an_interrupted_export_changes_nothing(tmp_path, monkeypatch):
    like, checkpoint, _ = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    polyak.export_pretrained(checkpoint, like, out)
    before = tree(out)

    def full_disk(*args, **kwargs):
        raise CheckpointError("disk full")

    monkeypatch.setattr("polyak.pretrained.save_state_dict", full_disk)
    for target in (out, tmp_path / "new"):
        with pytest.raises(CheckpointError, match="disk full"):
            polyak.export_pretrained(checkpoint, like, target, overwrite=True)
    assert tree(out) == before and not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_killed_at_random_moments_each_file_is_old_or_complete_new(tmp_path):
    """SIGKILL an export loop (A, B, A, ... into one folder, overwrite=True) at 20 random moments; after each kill
    the user's files are intact and each written name holds its old bytes or a complete new version."""
    like, checkpoint_a, _ = make_inputs(tmp_path / "in", elements=1 << 18)  # 1 MiB of weights: kills land mid-write
    checkpoint_b = tmp_path / "in" / "other.pt"
    torch.save({name: value * 2.0 for name, value in torch.load(checkpoint_a).items()}, checkpoint_b)
    versions: dict[str, set[bytes]] = {}
    for checkpoint in (checkpoint_a, checkpoint_b):  # the complete new versions, from uninterrupted exports
        polyak.export_pretrained(checkpoint, like, tmp_path / "ref" / checkpoint.stem)
        for name, data in tree(tmp_path / "ref" / checkpoint.stem).items():
            versions.setdefault(name, set()).add(data)
    work = tmp_path / "work"
    out = work / "out"
    users = users_folder(out)
    old = {"config.json": b"old config", "model.safetensors": b"old weights"}
    fresh = work / "fresh"  # a folder the export creates: it appears whole or not at all

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    worker = subprocess.Popen(
        [sys.executable, WORKER, str(checkpoint_a), str(checkpoint_b), str(like)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    chance = random.Random(0)
    watchdog = threading.Timer(120.0, worker.kill)  # a hung worker fails the test instead of stalling CI
    watchdog.start()
    pid: int | None = None
    try:
        for kill in range(20):
            target = fresh if kill % 4 == 3 else out
            for name in versions:  # each round starts from the old files (an export takes ~50 ms here)
                (out / name).unlink(missing_ok=True)
            for name, data in old.items():
                (out / name).write_bytes(data)
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(f"{target}\n")
            worker.stdin.flush()
            pid = int(worker.stdout.readline())
            time.sleep(chance.uniform(0.0, 0.1))
            os.kill(pid, 9)
            assert worker.stdout.readline().strip() == "reaped"
            now = tree(out)
            assert {name: now[name] for name in users} == users, kill
            for name in set(now) - set(users):
                assert now[name] == old.get(name) or now[name] in versions[name], (kill, name)
            if fresh.exists():  # appeared whole: every file complete
                got = tree(fresh)
                assert set(got) == set(versions) and all(got[n] in versions[n] for n in got), kill
                for item in fresh.iterdir():
                    item.unlink()
                fresh.rmdir()
            others = {p.name for p in work.iterdir()} - {"out", "fresh"}
            assert all(name.startswith((".out.polyak-", ".fresh.polyak-")) for name in others), others
    finally:
        watchdog.cancel()
        worker.kill()
        worker.wait()
        if pid is not None:  # the last export child, in case the worker died before reaping it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


# ---------------------------------------------------------------------------------------------- inputs


def test_export_never_writes_over_into_or_around_its_inputs(tmp_path, capsys, monkeypatch):
    like, checkpoint, _ = make_inputs(tmp_path / "in")
    (tmp_path / "link-to-base").symlink_to(like)
    inputs = tree(tmp_path / "in")
    bad = {
        str(like): "is the reference folder",
        str(like) + "/./": "is the reference folder",
        str(tmp_path / "link-to-base"): "is the reference folder",
        str(like / "ema"): "is inside the reference folder",
        str(tmp_path / "link-to-base" / "ema"): "is inside the reference folder",
        str(tmp_path / "in"): "holds the checkpoint being exported",
        str(tmp_path): "holds the checkpoint being exported",
        str(checkpoint): "is the checkpoint being exported",
    }
    for output, expected in bad.items():
        with pytest.raises(CheckpointError, match=expected):
            polyak.export_pretrained(checkpoint, like, output, overwrite=True)
        argv = ["export", str(checkpoint), "--like", str(like), "-o", output, "--overwrite"]
        assert "inputs are read-only" in one_line_exit_2(capsys, argv, expected)
    assert tree(tmp_path / "in") == inputs

    # The worst case of issue 23: `cd sandbox && polyak export ../last.pt --like ../base -o .`
    sandbox = tmp_path / "home" / "sandbox"
    users = users_folder(sandbox)
    monkeypatch.chdir(sandbox)
    given = ["export", "../../in/last.pt", "--like", "../../in/base"]
    for output in (".", "./", str(sandbox), "..", "logs/.."):
        one_line_exit_2(capsys, [*given, "-o", output, "--overwrite"], "is the current directory or holds it")
    assert tree(sandbox) == users and Path.cwd() == sandbox
    assert main([*given, "-o", "ema", "-q"]) == 0  # a new sub-folder
    assert (sandbox / "ema" / "model.safetensors").is_file()


def state_file(path: Path, value: float) -> Path:
    torch.save({"weight": torch.full((4, 4), value), "bias": torch.full((4,), value)}, path)
    return path


def test_average_never_writes_over_an_input(tmp_path, capsys, monkeypatch):
    a, b = state_file(tmp_path / "step_0.pt", 1.0), state_file(tmp_path / "step_100.pt", 3.0)
    (tmp_path / "symlink.pt").symlink_to(a)
    os.link(a, tmp_path / "hardlink.pt")
    monkeypatch.chdir(tmp_path)
    before = a.read_bytes()
    for output in (str(a), "step_0.pt", "./step_0.pt", "sub/../step_0.pt", "symlink.pt", "hardlink.pt"):
        argv = ["average", "step_0.pt", str(b), "-o", output]
        message = one_line_exit_2(capsys, argv, "is a checkpoint being averaged")
        assert "inputs are read-only" in message
        with pytest.raises(CheckpointError, match="is a file this state dict is read from"):
            save_state_dict(polyak.average_checkpoints([a, b]), output)
    assert a.read_bytes() == before
    assert main(["average", "step_0.pt", "step_100.pt", "-o", "avg.pt", "-q"]) == 0
    assert torch.equal(torch.load("avg.pt")["weight"], torch.full((4, 4), 2.0))


def test_file_export_never_writes_over_its_checkpoint(tmp_path, capsys):
    checkpoint = state_file(tmp_path / "last.pt", 1.0)
    os.link(checkpoint, tmp_path / "hardlink.pt")
    before = checkpoint.read_bytes()
    for output in (checkpoint, tmp_path / "hardlink.pt", tmp_path / "." / "last.pt"):
        one_line_exit_2(capsys, ["export", str(checkpoint), "-o", str(output)], "is the checkpoint being exported")
        with pytest.raises(CheckpointError, match="is a file this state dict is read from"):
            save_state_dict(polyak.export_weights(checkpoint), output)
    assert checkpoint.read_bytes() == before


def test_reconstruct_never_writes_into_the_snapshot_folder(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    tracker = polyak.PostHocEMA(model, directory=tmp_path / "snaps", snapshot_every=2)
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(0.1)
        tracker.update()
    snaps = tmp_path / "snaps"
    (tmp_path / "link").symlink_to(snaps)
    before = tree(snaps)
    for output in (snaps / "ema.safetensors", tmp_path / "link" / "ema.pt", snaps / "phema-000000000002.safetensors"):
        with pytest.raises(CheckpointError, match="is inside the snapshot folder"):
            reconstruct(snaps, [0.1], [output])
        argv = ["posthoc", str(snaps), "--sigma-rel", "0.1", "-o", str(output)]
        one_line_exit_2(capsys, argv, "is inside the snapshot folder")
    assert tree(snaps) == before
    reconstruct(snaps, [0.1], [tmp_path / "ema.safetensors"])


def test_the_lightning_callbacks_export_file_is_replaced_atomically(tmp_path):
    pytest.importorskip("lightning", reason="lightning is not installed (pip install 'polyak[lightning]')")
    from polyak.integrations.lightning import save_weights

    path = tmp_path / "average.pt"
    path.write_bytes(b"the previous average")
    with pytest.raises(Exception, match="pickle"):  # fails halfway through torch.save
        save_weights({"w": torch.ones(2), "broken": lambda: None}, path)  # type: ignore[dict-item]
    assert path.read_bytes() == b"the previous average"
    assert [p.name for p in tmp_path.iterdir()] == ["average.pt"]
    save_weights({"w": torch.ones(2)}, path)
    assert torch.equal(torch.load(path)["w"], torch.ones(2))
