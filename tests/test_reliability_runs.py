"""A PostHocEMA run's identity (issue 23, item 4): a second run refuses a folder holding another run's snapshots,
a resumed run continues there, and reconstruction refuses a folder holding two runs."""

from __future__ import annotations

import copy
import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_reliability import net, one_line
from torch import nn

import polyak

EVERY = 2  # optimizer steps between snapshots


def tracker(model: nn.Module, folder: Path, **options: Any) -> polyak.PostHocEMA:
    return polyak.PostHocEMA(model, sigma_rels=(0.05, 0.1), directory=folder, snapshot_every=EVERY, **options)


def run_steps(averager: polyak.PostHocEMA, steps: int, moves: torch.Generator | int) -> None:
    """``steps`` stand-in optimizer steps (a random move of every parameter, drawn from ``moves``, a generator or
    a seed), each followed by the update."""
    if isinstance(moves, int):
        moves = torch.Generator().manual_seed(moves)
    for _ in range(steps):
        with torch.no_grad():
            for p in averager.model.parameters():
                p.add_(torch.randn(p.shape, generator=moves) * 0.1)
        averager.update()


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*"))}


def loaded(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_a_second_run_is_refused_at_its_first_snapshot_and_can_go_elsewhere(tmp_path):
    folder = tmp_path / "snaps"
    first = tracker(net(), folder)
    run_steps(first, 4, moves=1)
    before = files(folder)
    assert list(before) == ["phema-000000000002.safetensors", "phema-000000000004.safetensors"]
    second = tracker(net(), folder)
    moves = torch.Generator().manual_seed(2)
    run_steps(second, 1, moves)  # no snapshot due yet
    with pytest.raises(ValueError, match="holds snapshots of another run") as error:
        run_steps(second, 1, moves)
    message = one_line(error)
    assert first.run_id in message and second.run_id in message
    assert "load its state (load_state_dict)" in message and "pick another directory" in message
    assert files(folder) == before  # nothing overwritten, nothing added
    # The update itself went through and was counted; the snapshot can be written elsewhere, and the run goes on.
    assert (second.step, second.num_updates) == (2, 2)
    second.directory = tmp_path / "elsewhere"
    second.snapshot()
    run_steps(second, 2, moves)
    assert list(files(tmp_path / "elsewhere")) == list(before)


def test_a_resumed_run_continues_in_its_folder_and_reconstructs_bit_for_bit(tmp_path):
    resumed_folder, plain_folder = tmp_path / "resumed", tmp_path / "plain"
    plain = tracker(net(), plain_folder)
    run_steps(plain, 12, moves=1)

    moves = torch.Generator().manual_seed(1)
    first = tracker(net(), resumed_folder)
    run_steps(first, 5, moves)  # interrupted between two snapshots
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = tracker(first.model, resumed_folder)  # a new tracker: a new run until the state is loaded
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.run_id == first.run_id
    run_steps(resumed, 7, moves)

    assert list(files(resumed_folder)) == list(files(plain_folder))
    assert {s.run for s in polyak.posthoc.find_snapshots(resumed_folder)} == {first.run_id}
    for step in (4, 12):
        outputs = {}
        for folder in (resumed_folder, plain_folder):
            outputs[folder.name] = out = tmp_path / f"{folder.name}-{step}.safetensors"
            polyak.posthoc.reconstruct(folder, [0.07], [out], step=step)
        resumed_out, plain_out = loaded(outputs["resumed"]), loaded(outputs["plain"])
        assert resumed_out.keys() == plain_out.keys()
        for key, value in plain_out.items():
            assert torch.equal(resumed_out[key], value), (step, key)


def two_runs(tmp_path: Path) -> tuple[Path, str, str]:
    """A folder holding run A's snapshots at steps 2 and 4, and run B's at 6 and 8 (moved in by hand)."""
    folder, other = tmp_path / "snaps", tmp_path / "other"
    first, second = tracker(net(), folder), tracker(net(seed=1), other)
    run_steps(first, 4, moves=1)
    run_steps(second, 8, moves=2)
    for path in sorted(other.glob("phema-*"))[2:]:
        shutil.copy(path, folder / path.name)
    return folder, first.run_id, second.run_id  # type: ignore[return-value]  # new runs have ids


def test_a_folder_holding_two_runs_is_refused_by_reconstruct_select_and_the_cli(tmp_path, capsys):
    from polyak.cli import main

    folder, run_a, run_b = two_runs(tmp_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="holds snapshots of 2 runs") as error:
        polyak.posthoc.reconstruct(folder, [0.07], [out])
    assert run_a in one_line(error) and run_b in str(error.value)
    with pytest.raises(ValueError, match="holds snapshots of 2 runs") as error:
        polyak.posthoc.select(folder, net(), lambda model: 0.0, sigma_rels=[0.05, 0.07])
    assert run_a in one_line(error) and run_b in str(error.value)
    assert main(["posthoc", str(folder), "--sigma-rel", "0.07", "-o", str(out)]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("polyak posthoc: error:") and "\n" not in printed
    assert run_a in printed and run_b in printed and "a folder of its own" in printed
    assert not out.exists()


def without_run_ids(folder: Path, into: Path) -> None:
    """``folder``'s snapshots as polyak wrote them before runs had an identity: no "run" in their metadata
    (written by the safetensors package, so without polyak's checksums either)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    into.mkdir()
    for path in sorted(folder.glob("phema-*")):
        with safe_open(path, "pt") as snapshot:
            metadata = {k: v for k, v in snapshot.metadata().items() if k not in ("run", "polyak.crc32")}
            tensors = {k: snapshot.get_tensor(k) for k in snapshot.keys()}  # noqa: SIM118  # not a dict
            save_file(tensors, into / path.name, metadata=metadata)


def test_snapshots_from_before_run_ids_are_one_unnamed_run(tmp_path):
    named, unnamed = tmp_path / "named", tmp_path / "unnamed"
    run_steps(tracker(net(), named), 6, moves=1)
    without_run_ids(named, unnamed)
    assert {s.run for s in polyak.posthoc.find_snapshots(unnamed)} == {None}
    for folder in (named, unnamed):  # they reconstruct as they did, bit for bit
        polyak.posthoc.reconstruct(folder, [0.07], [tmp_path / f"{folder.name}.safetensors"], step=4)
    named_out, unnamed_out = loaded(tmp_path / "named.safetensors"), loaded(tmp_path / "unnamed.safetensors")
    assert all(torch.equal(unnamed_out[k], v) for k, v in named_out.items()) and named_out.keys() == unnamed_out.keys()

    # A new run is refused there; they are named "(unnamed)" beside a named run's snapshots.
    with pytest.raises(ValueError, match=r"another run \(\(unnamed\)\)"):
        run_steps(tracker(net(), unnamed), EVERY, moves=2)
    shutil.copy(sorted(named.glob("phema-*"))[-1], unnamed)
    with pytest.raises(ValueError, match=r"2 runs \((\(unnamed\), \w+|\w+, \(unnamed\))\)"):
        polyak.posthoc.reconstruct(unnamed, [0.07], [tmp_path / "mixed.safetensors"])


def test_a_state_from_before_run_ids_continues_its_unnamed_folder(tmp_path):
    """The PostHocEMA state saved by the pre-redesign polyak (tests/data/states_v1.pt) has no run: it continues
    beside unnamed snapshots, and is refused beside a named run's."""
    from test_state_compat import STATES, maker

    named, unnamed = tmp_path / "named", tmp_path / "unnamed"
    run_steps(tracker(net(), named), 4, moves=1)
    without_run_ids(named, unnamed)
    for folder, accepted in ((unnamed, True), (named, False)):
        old = polyak.PostHocEMA(maker.model(), sigma_rels=(0.05, 0.1), directory=folder)
        old.load_state_dict(STATES["posthoc"])
        assert old.run_id is None
        if accepted:
            assert old.snapshot().name == "phema-000000000007.safetensors"
            assert {s.run for s in polyak.posthoc.find_snapshots(folder)} == {None}
        else:
            with pytest.raises(ValueError, match="holds snapshots of another run"):
                old.snapshot()


@pytest.mark.parametrize("run", [5, b"abc", ["abc"], ""], ids=["int", "bytes", "list", "empty"])
def test_a_damaged_run_entry_in_a_state_is_refused_and_nothing_changes(tmp_path, run):
    source = tracker(net(), tmp_path / "a")
    run_steps(source, 3, moves=1)
    state = source.state_dict()
    state["run"] = run
    other = tracker(net(seed=1), tmp_path / "b")
    run_steps(other, 1, moves=2)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"saved PostHocEMA has run=.*The state is damaged") as error:
        other.load_state_dict(state)
    one_line(error)
    after = other.state_dict()
    assert after["run"] == before["run"] and after["step"] == before["step"] == 1
    for saved, now in zip(before["shadows"], after["shadows"], strict=True):
        assert all(torch.equal(now[k], v) for k, v in saved.items())
