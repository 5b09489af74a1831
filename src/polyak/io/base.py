"""What every checkpoint format shares: the error, tensor specs, lazy state dicts, safe opening, atomic writing."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import torch
from torch import Tensor

try:  # the same CRC-32 as zlib's, ~10x faster (optional: pip install 'polyak[fast]'); used by the format modules
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32  # noqa: F401

Format = Literal["safetensors", "pt"]
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, damaged, refused, or does not fit; the message is one line."""


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, for reports that must stay on one line."""
    text = str(error).strip().splitlines()
    return text[0].strip() if text else type(error).__name__


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that has not been read yet."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return f"shape {self.shape} {str(self.dtype).removeprefix('torch.')}"


class LazyStateDict(Mapping[str, Tensor]):
    """A read-only state dict whose tensors are produced on access, one at a time.

    Shapes and dtypes (``specs``) are known up front, so a writer can stream it to disk and a
    ``dict(lazy)`` or ``model.load_state_dict(lazy)`` materialises it. Each access computes the tensor anew.
    ``sources``: the files it reads, which a writer refuses to write over (inputs are read-only).
    """

    def __init__(
        self, specs: Mapping[str, TensorSpec], load: Callable[[str], Tensor], sources: Iterable[Path] = ()
    ) -> None:
        self.specs = dict(specs)
        self.sources = tuple(sources)
        self._load = load

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._load(name)

    def pieces(self, name: str) -> Iterator[Tensor]:
        """Tensor ``name`` as consecutive flat pieces, for streaming writers (default: one piece, the whole tensor).

        A piece may be a reused buffer: use it before asking for the next one.
        """
        yield self[name].reshape(-1)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} tensors, {sum(s.nbytes for s in self.specs.values())} bytes)"


class TensorFile(LazyStateDict):
    """The tensors of one file (or of one state dict inside a training checkpoint), read on demand.

    ``key`` is where the state dict sits in the file (``None``: the whole file); ``note`` says how it was
    chosen when there was a choice. ``file[name]`` reads a whole tensor; :meth:`read` reads a flat piece.
    """

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], key: str | None = None) -> None:
        super().__init__(specs, lambda name: self.read(name).view(self.specs[name].shape), [path])
        self.path = path
        self.key = key
        self.note: str | None = None

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Elements ``[start, stop)`` of tensor ``name``, flattened, as a CPU tensor that owns its memory.

        ``stop`` is clipped to the tensor's size. With ``out`` (a 1-D tensor of the same dtype, large enough) the
        elements are read into its start and that view is returned, so a loop can reuse one buffer.
        """
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- opening


def identity(fd: int) -> tuple[int, ...]:
    """Which file ``fd`` is, and which version of it: a replaced or rewritten file reads differently."""
    info = os.fstat(fd)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def regular_file(path: Path) -> IO[bytes]:
    """``path`` opened for unbuffered reading; anything but a regular file is refused (a FIFO or device would hang)."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a pipe, socket or device); give a checkpoint file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror})") from None
    f = os.fdopen(fd, "rb", buffering=0)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the checks
        f.close()
        raise CheckpointError(f"{path}: not a regular file (a pipe, socket or device); give a checkpoint file")
    os.set_blocking(fd, True)
    return f


@contextmanager
def open_regular(path: Path) -> Iterator[IO[bytes]]:
    """:func:`regular_file`, closed at the end of the block."""
    with regular_file(path) as f:
        yield f


def pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill ``buffer`` from ``offset`` of ``fd`` (short only at the end of the file); the number of bytes read."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def sniff(path: Path) -> Literal["safetensors", "zip", "pickle"]:
    """What a file holds, from its first bytes: ``"safetensors"``, ``"zip"`` (PyTorch) or ``"pickle"`` (old PyTorch)."""
    with open_regular(path) as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    what = "is empty" if not head else f"starts with {head[:8]!r}"
    raise CheckpointError(f"{path}: not a safetensors or PyTorch checkpoint (it {what})")


# ---------------------------------------------------------------------------------------------- writing


def output_format(path: str | os.PathLike[str]) -> Format:
    """``"pt"`` for ``.pt/.pth/.bin/.ckpt``, ``"safetensors"`` for ``.safetensors``; other suffixes are refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown output suffix {suffix or '(none)'!r}; name it .safetensors or .pt/.pth/.bin/.ckpt "
            "(or give the format explicitly)"
        )
    return "pt" if suffix in TORCH_SUFFIXES else "safetensors"


def _os_error(error: BaseException) -> OSError | None:
    """The OS error behind ``error``, if any (torch wraps a failed write in a RuntimeError)."""
    seen: BaseException | None = error
    while isinstance(seen, (OSError, RuntimeError)):
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a binary file that replaces ``path`` only when the block completes.

    The bytes go to a temporary file in the same folder, which is flushed, fsync-ed and renamed over
    ``path``, and the folder is fsync-ed. On any error (or a kill) ``path`` keeps its previous content; the
    temporary file is removed unless the process was killed. A ``path`` that is a symbolic link is written
    through (the file it points to is replaced; the link stays). A replaced file keeps its permission bits
    (and owner, where allowed); a new one gets ``0666 & ~umask``. OS errors become :class:`CheckpointError`.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        before: os.stat_result | None = os.stat(target)
    except OSError:
        before = None
    if before is not None and not stat.S_ISREG(before.st_mode):
        raise CheckpointError(f"{path}: exists and is not a regular file; polyak only replaces files")
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot create a file in {target.parent} ({error.strerror})") from None
    try:
        if before is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)
        else:
            os.chmod(temporary, stat.S_IMODE(before.st_mode))
            with suppress(OSError):
                os.chown(temporary, before.st_uid, before.st_gid)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        with suppress(OSError):
            os.unlink(temporary)
        cause = _os_error(error)
        if cause is not None:
            full = cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            reason = "disk full" if full else "write failed"
            raise CheckpointError(
                f"{path}: {reason} ({cause.strerror or cause}); nothing was changed — free space or write elsewhere"
            ) from None
        raise
    with suppress(OSError):  # make the rename itself durable; not possible on every platform
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class TensorWriter:
    """Writes tensors to one file atomically, in the order ``names``, whole or in consecutive flat pieces.

    :meth:`write` takes the data (any device, already in the announced dtype); the file appears at ``path``
    only on :meth:`commit`. As a context manager it commits on success and leaves ``path`` untouched on error.
    """

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], names: list[str]) -> None:
        self.path = path
        self.specs = dict(specs)
        self.names = names
        self._index = 0
        self._done = 0  # elements of the current tensor written so far

    def write(self, data: Tensor, *, keep: bool = False) -> None:
        """Append ``data``: the next tensor, or the next flat piece of it (empty data: no-op).

        ``keep``: the writer may hold on to ``data`` itself (a whole tensor the caller will not change).
        """
        if data.numel() == 0:
            return
        self._skip_full()
        if self._index == len(self.names):
            raise RuntimeError(f"{self.path}: all {len(self.names)} tensors are already written")
        name = self.names[self._index]
        spec = self.specs[name]
        if data.dtype != spec.dtype or data.numel() > spec.numel - self._done:
            raise RuntimeError(
                f"tensor {name!r}: expected {spec.dtype} data of at most {spec.numel - self._done} elements, "
                f"got {data.dtype} of {data.numel()}"
            )
        self._put(name, self._done, data.detach().to("cpu").reshape(-1), keep)
        self._done += data.numel()

    def _skip_full(self) -> None:
        while self._index < len(self.names) and self._done == self.specs[self.names[self._index]].numel:
            self._index, self._done = self._index + 1, 0

    def commit(self) -> None:
        """Check that every tensor was written in full, then put the file in place (atomically)."""
        self._skip_full()
        if self._index != len(self.names):
            error = RuntimeError(f"{self.path}: only {self._index} of {len(self.names)} tensors were written")
            self.abort(error)
            raise error
        self._finish()

    def _put(self, name: str, start: int, flat: Tensor, keep: bool) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def abort(self, error: BaseException | None = None) -> None:
        """Give up: remove the temporary file; ``path`` keeps its previous content."""
        raise NotImplementedError

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is None:
            self.commit()
        else:
            self.abort(error)
