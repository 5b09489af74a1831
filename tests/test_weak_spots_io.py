"""File bounds: a zip member's CRC-32 over every piece, the decompression bound summed over members, the
safetensors header length bound. References: zlib's CRC-32, files written by ``torch.save`` / ``zipfile`` and the
``safetensors`` package itself, bytes flipped by hand."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from polyak.io import CheckpointError, check_zip, load_torch, open_safetensors, save_state_dict, torch_files
from polyak.io import safetensors as st_module


def saved(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    tensor = torch.arange(1000, dtype=torch.float32) * 0.5 + 1.0
    path = tmp_path / "state.pt"
    torch.save({"w": tensor}, path)
    return path, tensor


def test_zip_crc_runs_over_every_piece(tmp_path, monkeypatch):
    """Checked 64 bytes at a time (4000 bytes of data: 63 pieces), a good file passes and a byte flipped in the
    first piece is refused: the CRC is carried from piece to piece, as zlib.crc32 computes it over the whole."""
    monkeypatch.setattr(torch_files, "_PIECE", 64)
    path, tensor = saved(tmp_path)
    with zipfile.ZipFile(path) as archive:
        (member,) = [m for m in archive.infolist() if m.filename.endswith("data/0")]
        assert member.file_size == 4000 and zlib.crc32(tensor.numpy().tobytes()) == member.CRC
    check_zip(path)
    loaded, _ = load_torch(path)
    assert torch.equal(loaded["w"], tensor)
    raw = bytearray(path.read_bytes())
    at = raw.find(tensor.numpy().tobytes())
    assert at > 0
    raw[at + 5] ^= 0x10  # the first piece
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        check_zip(path)


def test_decompression_bound_sums_the_members(tmp_path):
    """Eight members of 512 KiB of zeros each: every one alone fits the bound (4 x the file's size + 1 MiB), the
    4 MiB they inflate to together does not."""
    path, _ = saved(tmp_path)
    bomb = tmp_path / "many.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bomb, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        prefix = source.infolist()[0].filename.split("/")[0]
        for i in range(8):
            target.writestr(f"{prefix}/extra/{i}", bytes(512 << 10), compress_type=zipfile.ZIP_DEFLATED)
    size = bomb.stat().st_size
    bound = 4 * size + (1 << 20)
    assert 512 << 10 < bound < 8 * (512 << 10)
    with pytest.raises(CheckpointError, match="decompression bomb"):
        check_zip(bomb)
    few = tmp_path / "few.pt"  # the same with two such members fits
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(few, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        for i in range(2):
            target.writestr(f"{prefix}/extra/{i}", bytes(512 << 10), compress_type=zipfile.ZIP_DEFLATED)
    check_zip(few)


def test_safetensors_header_length_is_bounded(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_state_dict({"w": torch.ones(4)}, path)
    length = int.from_bytes(path.read_bytes()[:8], "little")
    assert open_safetensors(path)["w"].tolist() == [1.0] * 4
    monkeypatch.setattr(st_module, "MAX_HEADER", length - 1)
    with pytest.raises(CheckpointError, match=rf"truncated or corrupt safetensors file \(a header of {length} bytes"):
        open_safetensors(path)
    monkeypatch.setattr(st_module, "MAX_HEADER", length)
    assert open_safetensors(path)["w"].tolist() == [1.0] * 4


@pytest.mark.parametrize("tensors", [{}, {"empty": torch.zeros(0, 3)}], ids=["no-tensor", "empty-tensor"])
def test_a_header_that_fills_the_file_is_read(tmp_path, tensors):
    """The safetensors package writes files whose header runs to the last byte when there is no data."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "empty.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    assert int.from_bytes(path.read_bytes()[:8], "little") == path.stat().st_size - 8
    opened = open_safetensors(path)
    assert list(opened) == list(tensors)


def test_safetensors_checksum_runs_over_pieces_read_in_order(tmp_path):
    """Read 7 elements at a time, in order, a file polyak wrote checks out; a flipped byte in the first piece is
    refused when the last piece is read."""
    tensor = torch.arange(100, dtype=torch.float32)
    path = tmp_path / "w.safetensors"
    save_state_dict({"w": tensor}, path)
    opened = open_safetensors(path)
    assert opened.checked
    pieces = [opened.read("w", start, start + 7) for start in range(0, 100, 7)]
    assert torch.equal(torch.cat(pieces), tensor)
    raw = bytearray(path.read_bytes())
    at = raw.find(tensor.numpy().tobytes())
    raw[at + 1] ^= 0x01
    path.write_bytes(bytes(raw))
    damaged = open_safetensors(path)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        for start in range(0, 100, 7):
            damaged.read("w", start, start + 7)


def test_a_deflated_member_is_checked_to_its_end(tmp_path, monkeypatch):
    """A member torch.save would not write (deflated) is inflated through zipfile, which checks its CRC at the
    end: a byte flipped near the end of 64 KiB (zipfile inflates 4 KiB at a time) is refused too."""
    monkeypatch.setattr(torch_files, "_PIECE", 64)
    path, _ = saved(tmp_path)
    data = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    payload = data.numpy().tobytes()  # incompressible: deflate stores it as it is
    packed = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(packed, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        prefix = source.infolist()[0].filename.split("/")[0]
        target.writestr(f"{prefix}/extra/0", payload, compress_type=zipfile.ZIP_DEFLATED)
    check_zip(packed)
    raw = bytearray(packed.read_bytes())
    at = raw.find(payload[-100:])
    assert at > 0
    raw[at + 90] ^= 0x01
    packed.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged file"):
        check_zip(packed)
