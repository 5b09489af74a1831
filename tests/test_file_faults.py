"""Damaged, hostile and odd files, and faults while writing: each refused in one line (exit code 2), nothing lost.

Every polyak entry point that reads a file is probed: ``polyak.load_state``, ``polyak.io`` readers, and the
``average``, ``export`` and ``posthoc`` commands.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import polyak
from polyak.cli import main
from polyak.io import CheckpointError, load_torch, open_safetensors, save_state_dict
from polyak.posthoc import find_snapshots, reconstruct

SRC = str(Path(polyak.__file__).resolve().parents[1])  # the polyak under test, for child processes


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """Run ``polyak argv``: it must fail with exit code 2 and one error line containing ``expected``."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"polyak {argv[0]}: error: "), err
    assert "Traceback" not in "\n".join(err)
    for text in expected:
        assert text in err[-1], (text, err[-1])
    return err[-1]


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def averager_state(path: Path) -> polyak.EMA:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    ema = polyak.EMA(model, decay=0.9)
    ema.update()
    torch.save(ema.state_dict(), path)
    return ema


def member_offset(path: Path, suffix: str) -> int:
    """Where the data of the zip member whose name ends with ``suffix`` starts in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    header = path.read_bytes()[info.header_offset : info.header_offset + 30]
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


# ---------------------------------------------------------------------------------------------- damaged files


def test_a_flipped_bit_in_a_saved_state_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ema.pt"
    ema = averager_state(path)
    polyak.load_state(path)  # intact: accepted
    flip_bit(path, member_offset(path, "data/0") + 100, bit=3)  # inside the first tensor's bytes
    with pytest.raises(ValueError, match="CRC") as caught:
        polyak.load_state(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(CheckpointError, match="CRC"):
        load_torch(path)
    one_line_exit_2(capsys, ["export", str(path), "-o", str(tmp_path / "out.safetensors")], "CRC", str(path))
    one_line_exit_2(capsys, ["average", str(path), str(path), "-o", str(tmp_path / "o.pt")], "CRC")
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "o.pt").exists()
    assert ema.step == 1  # nothing was loaded


def test_a_flipped_bit_in_a_safetensors_file_polyak_wrote_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = {"w": torch.randn(1000), "b": torch.randn(10).double(), "n": torch.tensor(3)}
    path = tmp_path / "avg.safetensors"
    save_state_dict(tensors, path)
    good = path.read_bytes()
    opened = open_safetensors(path)
    assert opened.checked and all(torch.equal(opened[n], t) for n, t in tensors.items())
    data_start = 8 + int.from_bytes(good[:8], "little")
    for offset in (data_start + 5, len(good) - 1, data_start + 8 * 10 + 400):  # b, n and w's bytes
        path.write_bytes(good)
        flip_bit(path, offset, bit=6)
        opened = open_safetensors(path)
        with pytest.raises(CheckpointError, match="fails its checksum"):
            dict(opened)
        one_line_exit_2(capsys, ["average", str(path), str(path), "-o", str(tmp_path / "x.safetensors")], "checksum")
    # In the header: a digit of the metadata, which no structural check can notice.
    path.write_bytes(good)
    save_state_dict(tensors, path, metadata={"step": "24"})
    flip_bit(path, path.read_bytes().index(b'"24"') + 2)  # "24" -> "25"
    with pytest.raises(CheckpointError, match="header fails its checksum"):
        open_safetensors(path)
    assert not (tmp_path / "x.safetensors").exists()


def test_pieces_read_out_of_order_are_still_checked_when_read_in_order(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_state_dict({"w": torch.arange(100.0)}, path)
    flip_bit(path, len(path.read_bytes()) - 4)
    opened = open_safetensors(path)
    opened.read("w", 50, 100)  # a piece alone cannot be checked
    opened.read("w", 0, 30)
    with pytest.raises(CheckpointError, match="checksum"):
        opened.read("w", 30, 100)


def test_a_decompression_bomb_is_refused_before_it_inflates(tmp_path: Path) -> None:
    """A small .pt whose zip member inflates to 256 MiB: refused from the declared sizes, memory never grows."""
    good, bomb = tmp_path / "good.pt", tmp_path / "bomb.pt"
    averager_state(good)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename.endswith("data/0"):
                with target.open(info.filename, "w", force_zip64=True) as member:
                    zeros = bytes(1 << 20)
                    for _ in range(256):
                        member.write(zeros)
            else:
                target.writestr(info, source.read(info))
    target_size = bomb.stat().st_size
    assert target_size < 1 << 20
    probe = textwrap.dedent(
        f"""
        import resource, sys
        import polyak
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            polyak.load_state({str(bomb)!r})
        except ValueError as error:
            print(error)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grown // 1024)
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    message, grown_mib = done.stdout.strip().splitlines()
    assert "decompression bomb" in message, done.stdout + done.stderr
    assert int(grown_mib) < 64  # peak memory (MiB) grew by far less than the 256 MiB it would inflate to


def test_damaged_safetensors_headers_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def header(text: bytes) -> bytes:
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text

    deep = b"[" * 100_000 + b"]" * 100_000
    entry = b'"w":{"dtype":"F32","shape":%s,"data_offsets":[0,8]}'
    cases = {
        "deep": header(b'{"__metadata__":{},"x":' + deep + b"}"),
        "deep_metadata": header(b'{"__metadata__":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001),
        "bool_shape": header(b"{" + entry % b"[true,2]" + b"}") + bytes(8),
        "float_shape": header(b"{" + entry % b"[2.0]" + b"}") + bytes(8),
        "negative_shape": header(b"{" + entry % b"[-2,-1]" + b"}") + bytes(8),
        "string_shape": header(b"{" + entry % b'"2"' + b"}") + bytes(8),
        "list_header": header(b"[1,2]"),
        "entry_not_object": header(b'{"w":[1]}'),
        "bad_metadata": header(b'{"__metadata__":{"a":1}}'),
        "unknown_dtype": header(b'{"w":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}}') + bytes(8),
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="corrupt safetensors header") as caught:
            open_safetensors(path)
        assert "\n" not in str(caught.value), name
        one_line_exit_2(capsys, ["average", str(path), str(path), "-o", str(tmp_path / "o.safetensors")], str(path))


def test_sparse_tensors_in_a_pt_file_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(3).to_sparse(), "b": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="sparse_coo tensor"):
        load_torch(path)
    one_line_exit_2(capsys, ["average", str(path), str(path), "-o", str(tmp_path / "o.pt")], "'w'", "sparse")
    one_line_exit_2(capsys, ["export", str(path), "-o", str(tmp_path / "o.pt")], "sparse")
    with pytest.raises(TypeError, match="'w'"):
        save_state_dict({"w": torch.eye(3).to_sparse()}, tmp_path / "o.safetensors")


def test_float8_checkpoints_are_averaged_in_float32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        states = [{"w": (torch.randn(300, generator=g) * 4).to(dtype), "n": torch.tensor(i)} for i in range(3)]
        paths = []
        for i, state in enumerate(states):
            paths.append(tmp_path / f"f8_{i}.safetensors")
            save_state_dict(state, paths[-1])
        out = tmp_path / "avg.safetensors"
        assert main(["average", *map(str, paths), "--weights", "1", "2", "5", "-o", str(out), "-q"]) == 0
        expected = sum(w * s["w"].double() for w, s in zip((1 / 8, 2 / 8, 5 / 8), states, strict=True))
        got = open_safetensors(out)
        assert got["w"].dtype == dtype and torch.equal(got["n"], torch.tensor(2))
        # the float32 sum rounded once to float8: equal to the float64 reference rounded to float8
        assert torch.equal(got["w"].float(), expected.float().to(dtype).float())
        wider = polyak.average_checkpoints(paths, weights=[1, 2, 5], dtype=torch.float32)["w"]
        torch.testing.assert_close(wider.double(), expected, rtol=1e-6, atol=1e-6)


def test_a_step_too_large_for_int64_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = snapshots(tmp_path / "snaps", steps=8)
    one_line_exit_2(
        capsys,
        ["posthoc", str(directory), "--sigma-rel", "0.1", "--step", str(2**64), "-o", str(tmp_path / "o.pt")],
        "step",
    )
    last = sorted(directory.iterdir())[-1]
    huge = tmp_path / "huge"
    huge.mkdir()
    tensors = open_safetensors(last)
    metadata = {k: v for k, v in tensors.metadata.items() if k != "polyak.crc32"}
    save_state_dict(dict(tensors), huge / "phema-1.safetensors", metadata={**metadata, "step": str(2**70)})
    with pytest.raises(ValueError, match="int64"):
        find_snapshots(huge)
    one_line_exit_2(capsys, ["posthoc", str(huge), "--sigma-rel", "0.1", "-o", str(tmp_path / "o.pt")], "int64")
    assert not (tmp_path / "o.pt").exists()
    state_path = tmp_path / "ema.pt"
    averager_state(state_path)
    state = torch.load(state_path, weights_only=True)
    for value in (2**63, -1, True, 1.5):
        torch.save({**state, "step": value}, state_path)
        with pytest.raises(ValueError, match="damaged averager state: step") as caught:
            polyak.load_state(state_path)
        assert "\n" not in str(caught.value)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""

    def hung(*_: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifos_and_devices_are_refused_not_waited_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "ckpt_1.pt"
    os.mkfifo(fifo)
    good = tmp_path / "good.safetensors"
    save_state_dict({"w": torch.zeros(3)}, good)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    os.mkfifo(snaps / "phema-000000000001.safetensors")
    with deadline(20):
        for path in (fifo, Path("/dev/zero"), Path("/dev/null")):
            with pytest.raises(ValueError, match="not a regular file"):
                polyak.load_state(path)
            one_line_exit_2(capsys, ["export", str(path), "-o", str(tmp_path / "o.pt")], "not a regular file")
            one_line_exit_2(capsys, ["average", str(good), str(path), "-o", str(tmp_path / "o.pt")], "regular")
        one_line_exit_2(capsys, ["posthoc", str(snaps), "--sigma-rel", "0.1", "-o", str(tmp_path / "o.pt")], "regular")
        index = tmp_path / "model.safetensors.index.json"
        os.mkfifo(index)
        one_line_exit_2(capsys, ["average", str(index), str(index), "-o", str(tmp_path / "o.pt")], "regular")


# ---------------------------------------------------------------------------------------------- writing


def inputs(tmp_path: Path) -> list[str]:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"in_{i}.safetensors")
        save_state_dict({"w": torch.full((1 << 18,), float(i))}, paths[-1])
    return [str(p) for p in paths]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_full_disk_is_one_line_and_keeps_the_old_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"the previous output")
    argv = ["average", *inputs(tmp_path), "-o", str(out), "-q"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))  # writes past 64 kB fail (EFBIG), as on a full disk
    try:
        one_line_exit_2(capsys, argv, "disk full", "nothing was changed")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert out.read_bytes() == b"the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in_0.safetensors", "in_1.safetensors", out.name])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_enospc_at_fsync_is_one_line_and_keeps_the_old_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"the previous output")
    argv = ["average", *inputs(tmp_path), "-o", str(out), "-q"]

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    one_line_exit_2(capsys, argv, "disk full", "No space left on device")
    assert out.read_bytes() == b"the previous output" and len(list(tmp_path.iterdir())) == 3


def test_replaced_outputs_keep_their_permissions_and_links_are_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = inputs(tmp_path)
    private = tmp_path / "private.safetensors"
    private.write_bytes(b"old")
    os.chmod(private, 0o600)
    assert main(["average", *files, "-o", str(private), "-q"]) == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and open_safetensors(private)["w"][0] == 0.5
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "model.pt"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    assert main(["export", files[0], "-o", str(link), "-q"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert torch.equal(torch.load(real, weights_only=True)["w"], torch.zeros(1 << 18))
    for command in ("average", "export"):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "symbolic link is written through" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------------- posthoc


def snapshots(directory: Path, steps: int, width: int = 4, every: int = 4, run: str | None = None) -> Path:
    torch.manual_seed(0)
    model = nn.Linear(width, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = polyak.PostHocEMA(model, directory=directory, snapshot_every=every)
    if run is not None:  # two trackers writing under one run's name: only their shapes tell them apart
        tracker.run_id = run
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, width)).square().mean().backward()
        optimizer.step()
        tracker.update()
    return directory


def test_posthoc_refuses_snapshots_of_different_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = snapshots(tmp_path / "snaps", steps=8, width=4, run="one")
    other = snapshots(tmp_path / "other", steps=12, width=6, run="one")  # the same names, wider weight
    (other / "phema-000000000012.safetensors").rename(directory / "phema-000000000012.safetensors")
    with pytest.raises(ValueError, match="'0/weight' has shape"):
        reconstruct(directory, [0.1], [tmp_path / "o.safetensors"])
    one_line_exit_2(capsys, ["posthoc", str(directory), "--sigma-rel", "0.1", "-o", str(tmp_path / "o.pt")], "shape")


def test_posthoc_never_writes_where_it_would_read_a_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = snapshots(tmp_path / "snaps", steps=8)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    for name in ("phema-000000000008.safetensors", "phema-final.safetensors", "ema.safetensors"):
        argv = ["posthoc", str(directory), "--sigma-rel", "0.1", "-o", str(directory / name)]
        one_line_exit_2(capsys, argv, "is inside the snapshot folder")
    link = tmp_path / "innocent.safetensors"
    link.symlink_to(directory / "phema-000000000004.safetensors")
    one_line_exit_2(capsys, ["posthoc", str(directory), "--sigma-rel", "0.1", "-o", str(link)], "snapshot")
    same = [
        "posthoc",
        str(directory),
        "--sigma-rel",
        "0.1",
        "0.08",
        "-o",
        str(tmp_path / "a.pt"),
        str(tmp_path / "a.pt"),
    ]
    one_line_exit_2(capsys, same, "same file")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_posthoc_refuses_targets_the_snapshots_cannot_express(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = snapshots(tmp_path / "snaps", steps=16)  # snapshots at 4, 8, 12, 16 of widths 0.05 and 0.10
    out = tmp_path / "o.safetensors"
    base = ["posthoc", str(directory), "-o", str(out)]
    one_line_exit_2(capsys, [*base, "--sigma-rel", "0.1", "--step", "5000"], "after the last snapshot", "--force")
    one_line_exit_2(capsys, [*base, "--sigma-rel", "0.1", "--step", "10"], "between snapshots", "4, 8, 12, 16")
    message = one_line_exit_2(capsys, [*base, "--sigma-rel", "0.25"], "relative profile error", "--force")
    assert "np." not in message and "0.05, 0.1" in message
    assert not out.exists()
    for forced in (["--step", "5000"], ["--step", "10"], ["--sigma-rel", "0.25"]):
        argv = [*base, *forced] if "--sigma-rel" in forced else [*base, "--sigma-rel", "0.1", *forced]
        assert main([*argv, "--force"]) == 0
    assert main([*base, "--sigma-rel", "0.1", "--step", "12"]) == 0


def test_posthoc_output_format_follows_the_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = snapshots(tmp_path / "snaps", steps=8)
    pt, st = tmp_path / "d.pt", tmp_path / "d.safetensors"
    assert main(["posthoc", str(directory), "--sigma-rel", "0.1", "0.08", "-o", str(pt), str(st)]) == 0
    assert pt.read_bytes()[:2] == b"PK"
    from_pt, from_st = torch.load(pt, weights_only=True), dict(open_safetensors(st))
    nn.Linear(4, 3).load_state_dict(from_pt)
    assert from_pt.keys() == from_st.keys()
    one_line_exit_2(capsys, ["posthoc", str(directory), "--sigma-rel", "0.1", "-o", str(tmp_path / "d.txt")], ".txt")
    assert not (tmp_path / "d.txt").exists()


def test_solver_errors_print_plain_numbers() -> None:
    import numpy as np

    from polyak.posthoc import solve_coefficients

    for call in (
        lambda: solve_coefficients([10.0], [0.1], np.float64(-0.5), [0.1]),
        lambda: solve_coefficients([np.float64(10.0)], [0.1], np.float64(5.0), [0.1]),
    ):
        with pytest.raises(ValueError) as caught:
            call()
        assert "np." not in str(caught.value), str(caught.value)


# ---------------------------------------------------------------------------------------------- wording


def test_command_line_wording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = inputs(tmp_path)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "o.safetensors"
    capsys.readouterr()
    assert main(["average", files[0], "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "averaging 1 checkpoint with" in err and "only one checkpoint given" in err and "1 tensor," in err
    for bad in (["--ema", "1.5"], ["--ema", "nan"], ["--weights", "1", "-1"], ["--weights", "1", "2", "3"]):
        argv = ["average", "--last", "2", str(tmp_path), *bad, "-o", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "newest" not in err and err.count("\n") == 1 and bad[0] in err, err  # refused before the listing
    (tmp_path / "best.safetensors").write_bytes(Path(files[0]).read_bytes())
    assert main(["average", "--last", "2", str(tmp_path), "-o", str(out)]) == 0
    assert "ignoring 1 file with no number in the name (best.safetensors)" in capsys.readouterr().err
    save_state_dict({"w": torch.zeros(2)}, tmp_path / "small.safetensors")
    one_line_exit_2(capsys, ["average", files[0], str(tmp_path / "small.safetensors"), "-o", str(out)], "--no-strict")
    for command in (["export", files[0]], ["average", *files]):
        one_line_exit_2(capsys, [*command, "-o", str(tmp_path / "y.txt")], "y.txt", ".safetensors")
        assert not (tmp_path / "y.txt").exists()
    assert main(["export", files[0], "-o", str(tmp_path / "y.txt"), "--format", "pt", "-q"]) == 0
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "tools that work on checkpoints" not in text and "demo" in text and "bench" in text


def test_every_reader_gives_one_line(tmp_path: Path) -> None:
    """No reader lets a Python exception of its own (KeyError, RecursionError, ...) escape on a bad file."""
    readers: list[Callable[[Path], object]] = [
        lambda p: dict(open_safetensors(p)),
        lambda p: load_torch(p),
        lambda p: dict(polyak.average_checkpoints([p, p])),
        lambda p: dict(polyak.export_weights(p)),
    ]
    good = tmp_path / "good.safetensors"
    save_state_dict({"a": torch.randn(40), "b": torch.arange(3)}, good)
    content = good.read_bytes()
    path = tmp_path / "bad.safetensors"
    for offset in range(0, len(content), max(1, len(content) // 150)):
        for bit in (0, 5):
            data = bytearray(content)
            data[offset] ^= 1 << bit
            path.write_bytes(bytes(data))
            for number, read in enumerate(readers):
                try:
                    read(path)
                except CheckpointError as error:
                    assert "\n" not in str(error)
                else:
                    pytest.fail(
                        f"reader {number}: a flipped bit {bit} at byte {offset} of {len(content)} went unnoticed"
                    )
    meta = json.loads(content[8 : 8 + int.from_bytes(content[:8], "little")])["__metadata__"]
    assert "polyak.crc32" in meta
