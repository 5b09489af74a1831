"""Safetensors files written atomically and read lazily, one tensor at a time, without the safetensors package.

The format is small: an 8-byte little-endian header length, a JSON header (``{name: {dtype, shape,
data_offsets}}`` plus string ``__metadata__``), then the raw little-endian bytes. The writer takes the names,
shapes and dtypes up front and then each tensor's bytes as they come, so a file of any size is written with
about one tensor in memory; it writes to a temporary file in the same directory, fsyncs it, renames it over the
target and fsyncs the directory, so a reader sees the old file or the whole new one. The reader reads one
tensor's bytes with ``readinto`` (no memory map), so reading a tensor costs that tensor's memory only.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from torch import Tensor

__all__ = ["AtomicWriter", "Entry", "read_header", "read_tensor"]

_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in a file: its dtype, shape and byte range (from the start of the data)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _check_host() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this big-endian host is not supported")


class AtomicWriter:
    """Writes a safetensors file piece by piece; the file appears at ``path`` only on :meth:`commit`.

    ``layout`` lists ``(name, shape, dtype)`` in file order; :meth:`write` then takes the data in that order,
    whole tensors or consecutive flat pieces of them (any device, already in the layout's dtype). As a
    context manager it commits on success and removes the temporary file on error.
    """

    def __init__(
        self,
        path: str | Path,
        layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
        metadata: dict[str, str],
    ) -> None:
        _check_host()
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, int]] = []  # name, dtype, bytes
        for name, shape, dtype in layout:
            if dtype not in _CODES:
                raise TypeError(
                    f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; "
                    f"supported: {', '.join(str(d) for d in _CODES)}"
                )
            size = dtype.itemsize
            for n in shape:
                size *= int(n)
            dims = [int(n) for n in shape]
            header[name] = {"dtype": _CODES[dtype], "shape": dims, "data_offsets": [offset, offset + size]}
            self._expected.append((name, dtype, size))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._file = os.fdopen(fd, "wb")
        self._file.write(len(encoded).to_bytes(8, "little"))
        self._file.write(encoded)
        self._index, self._left = 0, self._expected[0][2] if self._expected else 0

    def _skip_full(self) -> None:
        while self._index < len(self._expected) and self._left == 0:
            self._index += 1
            self._left = self._expected[self._index][2] if self._index < len(self._expected) else 0

    def write(self, data: Tensor) -> None:
        """Append ``data``: the next tensor of the layout, or the next flat piece of it (empty data: no-op)."""
        if data.numel() == 0:
            return
        self._skip_full()
        if self._index == len(self._expected):
            raise RuntimeError(f"{self.path}: all {len(self._expected)} tensors are already written")
        name, dtype, _ = self._expected[self._index]
        raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.dtype != dtype or raw.numel() > self._left:
            raise ValueError(
                f"tensor {name!r}: expected {dtype} data of at most {self._left} bytes, "
                f"got {data.dtype} of {raw.numel()} bytes"
            )
        self._file.write(raw.numpy().data)
        self._left -= raw.numel()

    def commit(self) -> None:
        """Flush, fsync and rename into place, then fsync the directory."""
        self._skip_full()
        if self._index != len(self._expected):
            raise RuntimeError(f"{self.path}: only {self._index} of {len(self._expected)} tensors were written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def abort(self) -> None:
        """Close and remove the temporary file."""
        self._file.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors (name -> :class:`Entry`, in file order) and the string metadata of a safetensors file."""
    path = Path(path)

    def bad(why: str) -> ValueError:
        return ValueError(f"{str(path)!r} is not a readable safetensors file: {why}")

    with path.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        data_size = path.stat().st_size - 8 - size
        if data_size < 0:
            raise bad(f"header length {size} exceeds the file size")
        try:
            header = json.loads(file.read(size))
        except ValueError as error:
            raise bad(f"header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise bad(f"entry {name!r} is malformed ({error!r})") from error
        count = 1
        for n in shape:
            count *= n
        if not (0 <= begin <= end <= data_size and end - begin == count * dtype.itemsize):
            raise bad(f"entry {name!r} has byte range {begin}..{end}, which does not fit its shape or the file")
        entries[name] = Entry(dtype, shape, begin, end)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def read_tensor(
    path: str | Path,
    entries: dict[str, Entry],
    name: str,
    start: int = 0,
    stop: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Tensor ``name`` of the file whose header :func:`read_header` returned, read on its own (CPU).

    With ``start`` / ``stop``, only the flat elements ``start:stop`` (a 1-D tensor). ``out``: a contiguous
    1-D CPU tensor of the entry's dtype and that many elements to read into (returned).
    """
    _check_host()
    entry = entries[name]
    size = entry.dtype.itemsize
    count = (entry.end - entry.begin) // size
    whole = start == 0 and stop is None
    stop = count if stop is None else stop
    if not 0 <= start <= stop <= count:
        raise ValueError(f"tensor {name!r} has {count} elements; cannot read elements {start}:{stop}")
    if out is None:
        tensor = torch.empty(entry.shape if whole else (stop - start,), dtype=entry.dtype)
    elif out.dtype != entry.dtype or out.shape != (stop - start,) or not out.is_contiguous() or out.is_cuda:
        raise ValueError(f"out must be a contiguous 1-D CPU {entry.dtype} tensor of {stop - start} elements")
    else:
        tensor = out
    with Path(path).open("rb") as file:
        file.seek(8 + int.from_bytes(file.read(8), "little") + entry.begin + start * size)
        view = tensor.reshape(-1).view(torch.uint8).numpy().data
        if file.readinto(view) != (stop - start) * size:
            raise ValueError(f"{str(path)!r}: tensor {name!r} is truncated")
    return tensor
