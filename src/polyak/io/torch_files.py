"""PyTorch files: checked before loading, loaded without running pickled code, written atomically.

Before ``torch.load`` sees a zip file (everything ``torch.save`` wrote since PyTorch 1.6), every member is
checked against the zip's own records: the sizes it declares must fit the file (a member that would inflate
past them — a decompression bomb — is refused before anything is inflated), and each member's CRC-32 is
recomputed in a streamed pass (torch itself never checks it), so a flipped bit is refused, not loaded.
Loading is ``weights_only=True``; tensors that are not plain dense ones (sparse, quantized, nested) are refused.
Old (pre-1.6) pickle files carry no checksum and are loaded as they are.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import (
    CheckpointError,
    TensorFile,
    TensorSpec,
    TensorWriter,
    atomic_write,
    crc32,
    identity,
    one_line,
    open_regular,
    sniff,
)
from .base import pread_into as _pread_into

__all__ = ["TorchWriter", "check_zip", "load_torch", "torch_tensors"]

_INFLATION = 4  # a member may declare at most this many times the file's size (plus _SLACK) uncompressed
_SLACK = 1 << 20
_PIECE = 1 << 22  # bytes checked at a time


def check_zip(path: Path) -> None:
    """Refuse a PyTorch zip file whose members are damaged (CRC) or would inflate far past the file's size."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            archive = zipfile.ZipFile(f)
            members = archive.infolist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({one_line(error)})"
            ) from None
        declared = sum(m.file_size for m in members)
        if declared > _INFLATION * size + _SLACK:
            raise CheckpointError(
                f"{path}: its zip members declare {declared} bytes once inflated, {declared / max(size, 1):.0f} times "
                "the file's size; refused unread (a decompression bomb?)"
            )
        buffer = memoryview(bytearray(min(_PIECE, max(m.compress_size for m in members) if members else 0)))
        for member in members:
            try:
                _check_member(f.fileno(), archive, member, size, buffer)
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as error:
                raise CheckpointError(f"{path}: damaged file: {member.filename!r} {one_line(error)}") from None


def _check_member(fd: int, archive: zipfile.ZipFile, member: zipfile.ZipInfo, size: int, buffer: memoryview) -> None:
    if member.compress_type != zipfile.ZIP_STORED:  # not what torch.save writes; zipfile checks the CRC
        with archive.open(member) as stream:
            while stream.read(_PIECE):
                pass
        return
    if member.file_size != member.compress_size:
        raise ValueError(f"is stored with {member.compress_size} bytes but declares {member.file_size}")
    local = bytearray(30)
    if _pread_into(fd, memoryview(local), member.header_offset) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError("has no local header where the zip's directory puts it")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    start = member.header_offset + 30 + name_length + extra_length
    if start + member.file_size > size:
        raise ValueError(f"ends at byte {start + member.file_size} of a {size}-byte file (truncated)")
    crc, done = 0, 0
    while done < member.file_size:
        piece = buffer[: min(len(buffer), member.file_size - done)]
        if _pread_into(fd, piece, start + done) != len(piece):
            raise ValueError("is cut short")
        crc = crc32(piece, crc)
        done += len(piece)
    if member.CRC and crc != member.CRC:  # a zero CRC is a writer that did not compute one
        raise ValueError(f"fails its CRC check (recorded {member.CRC:08x}, computed {crc:08x})")


def load_torch(path: str | os.PathLike[str], *, map_location: Any = "cpu", mmap: bool = True) -> tuple[Any, bool]:
    """``torch.load`` a PyTorch file safely: checked (see the module), ``weights_only=True``, mapped if ``mmap``.

    Returns the loaded object and whether its tensors are memory-mapped (files written before PyTorch 1.6
    cannot be; they are read whole). Raises :class:`CheckpointError` with a one-line reason.
    """
    path = Path(path)
    kind = sniff(path)
    if kind == "safetensors":
        raise CheckpointError(f"{path}: a safetensors file, not a PyTorch one; open it with polyak.io.open_safetensors")
    zipped = kind == "zip"
    if zipped:
        check_zip(path)
    with open_regular(path) as f:
        before = identity(f.fileno())
    mapped = zipped and mmap
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as error:
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(error))
        detail = found.group(1) if found else one_line(error)
        raise CheckpointError(
            f"{path}: holds pickled Python objects, which polyak never unpickles ({detail}); save the tensors "
            "alone (torch.save(model.state_dict(), ...)) or as safetensors, or pick a state dict with --key"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, zipfile and OS errors on bad files
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({one_line(error)})"
        ) from None
    with open_regular(path) as f:
        if identity(f.fileno()) != before:
            raise CheckpointError(f"{path}: the file changed while it was being read; load it again")
    _refuse_unusual_tensors(loaded, path)
    return loaded, mapped


def _refuse_unusual_tensors(loaded: Any, path: Path) -> None:
    """Refuse sparse, quantized and nested tensors anywhere in ``loaded``: polyak averages dense tensors only."""
    stack: list[tuple[str, Any]] = [("", loaded)]
    while stack:
        where, obj = stack.pop()
        if isinstance(obj, Tensor):
            if obj.layout != torch.strided or obj.is_quantized or obj.is_nested:
                kind = "quantized" if obj.is_quantized else "nested" if obj.is_nested else str(obj.layout)
                raise CheckpointError(
                    f"{path}: tensor {where or '<whole file>'!r} is a {kind} tensor; polyak reads dense tensors "
                    "only — save it densely (tensor.to_dense()) or leave it out"
                )
        elif isinstance(obj, dict):
            stack.extend((f"{where}.{k}".lstrip("."), v) for k, v in obj.items())
        elif isinstance(obj, (list, tuple)):
            stack.extend((f"{where}.{i}".lstrip("."), v) for i, v in enumerate(obj))


def torch_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], *, mapped: bool, key: str | None = None
) -> TensorFile:
    """The tensors of a state dict from :func:`load_torch`; with ``mapped``, pages are released once read."""
    return _TorchTensors(Path(path), dict(tensors), key, mapped)


class _TorchTensors(TensorFile):
    def __init__(self, path: Path, tensors: dict[str, Tensor], key: str | None, mapped: bool) -> None:
        super().__init__(path, {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in tensors.items()}, key)
        self._tensors = tensors
        self._mapped = mapped

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        tensor = self._tensors[name]
        piece = tensor.reshape(-1)[start:stop]
        out = piece.clone() if out is None else out[: piece.numel()].copy_(piece)
        if self._mapped and tensor.is_contiguous():  # the piece is a view of the file's mapping
            _release(piece)
        return out


_libc = ctypes.CDLL(None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None


def _release(mapped: Tensor) -> None:
    """Hand the pages under ``mapped`` (a view of a private read-only file mapping) back to the OS.

    The data stays valid: touching it again re-reads the file. Never call this on anonymous memory.
    """
    nbytes = mapped.numel() * mapped.element_size()
    if _libc is None or nbytes == 0:
        return
    address = mapped.data_ptr()
    first = address - address % mmap.PAGESIZE
    _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(address + nbytes - first), mmap.MADV_DONTNEED)


class TorchWriter(TensorWriter):
    """Writes a plain dict of tensors for ``torch.load``; the tensors are gathered in memory, then saved at once."""

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec]) -> None:
        super().__init__(path, specs, list(specs))
        self._tensors: dict[str, Tensor] = {}

    def _put(self, name: str, start: int, flat: Tensor, keep: bool) -> None:
        spec = self.specs[name]
        if keep and start == 0 and flat.numel() == spec.numel:
            self._tensors[name] = flat.view(spec.shape)
            return
        if start == 0:
            self._tensors[name] = torch.empty(spec.shape, dtype=spec.dtype)
        self._tensors[name].view(-1)[start : start + flat.numel()].copy_(flat)

    def _finish(self) -> None:
        for name, spec in self.specs.items():  # empty tensors get no write
            self._tensors.setdefault(name, torch.empty(spec.shape, dtype=spec.dtype))
        tensors = {name: self._tensors[name] for name in self.names}
        self._tensors = {}
        with atomic_write(self.path) as f:
            torch.save(tensors, f)

    def abort(self, error: BaseException | None = None) -> None:
        self._tensors = {}
