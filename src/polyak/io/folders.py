"""Writing a folder that only adds: every folder writer of the package (exports, ``save_pretrained``) uses this.

The files are written into a fresh hidden folder beside the target (``.NAME.polyak-*``), fsync-ed, then moved
into place one by one with ``rename``: a new target folder appears whole, an existing one gains the new files
and keeps every other file it holds. A name the target already holds is refused unless ``overwrite``, and then
only that file is replaced (keeping its permission bits). Killed at any moment, each file is its old version
or its complete new one, never a mix; a killed write may leave its hidden folder beside the target.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .base import CheckpointError
from .outputs import Input, check_output

__all__ = ["check_names", "folder_writer"]


def check_names(directory: str | os.PathLike[str], names: Iterable[str], *, overwrite: bool = False) -> None:
    """Refuse (one line) writing ``names`` (relative paths) into ``directory`` where it holds any of them already,
    unless ``overwrite``; a name that is a folder there (or under a file there) is refused either way."""
    target = Path(os.path.realpath(directory))
    taken = []
    for name in sorted(names):
        where = target / name
        blocked = next((p for p in reversed(where.parents) if p.is_relative_to(target) and p.is_file()), None)
        if blocked is not None or (where.is_dir() and not where.is_symlink()):
            raise CheckpointError(
                f"{directory}: {name!r} cannot be written, {blocked or where} is in the way; move it or write "
                "to a new folder"
            )
        if where.exists() or where.is_symlink():
            taken.append(name)
    if taken and not overwrite:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise CheckpointError(
            f"{directory}: already holds {taken[0]!r}{more}, which this write would replace; pass overwrite=True "
            "(--overwrite) to replace those files only, or write to a new folder"
        )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder cannot be fsync-ed everywhere
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _files(building: Path) -> list[str]:
    """The files written under ``building``, as relative paths, after fsync-ing them and their folders."""
    names = []
    for root, folders, files in os.walk(building):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                _fsync(path)
            names.append(str(path.relative_to(building)))
        _fsync(Path(root))
        folders.sort()
    return sorted(names)


def _move_into(building: Path, target: Path, shown: str | os.PathLike[str], overwrite: bool) -> None:
    names = _files(building)
    if not target.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(building, 0o777 & ~umask)
        os.rename(building, target)  # the whole folder at once
        _fsync(target.parent)
        return
    check_names(shown, names, overwrite=overwrite)
    touched = set()
    for name in names:
        source, destination = building / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        with suppress(OSError):  # a replaced file keeps its permission bits (and owner, where allowed)
            before = os.stat(destination)
            os.chmod(source, stat.S_IMODE(before.st_mode))
            os.chown(source, before.st_uid, before.st_gid)
        os.replace(source, destination)
        touched.add(destination.parent)
    for folder in sorted(touched):
        _fsync(folder)


@contextmanager
def folder_writer(
    directory: str | os.PathLike[str], *, overwrite: bool = False, inputs: Iterable[Input] = ()
) -> Iterator[Path]:
    """A fresh folder beside ``directory`` to write into; when the block completes, its files move into
    ``directory`` (see the module). On error nothing is moved and the fresh folder is removed.

    Refused first (:class:`CheckpointError`): a ``directory`` that is a file, that is the current directory or
    holds it, or that is, is inside or holds one of ``inputs`` (see :func:`~polyak.io.check_output`). A symbolic
    link to a folder is written through.
    """
    check_output(directory, inputs, folder=True)
    target = Path(os.path.realpath(directory))
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a folder; give a folder path to write into")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.polyak-", dir=target.parent))
    except OSError as error:
        raise CheckpointError(f"{directory}: cannot create a folder in {target.parent} ({error.strerror})") from None
    try:
        yield building
        _move_into(building, target, directory, overwrite)
    finally:
        shutil.rmtree(building, ignore_errors=True)
