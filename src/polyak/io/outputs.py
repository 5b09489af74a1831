"""Inputs are read-only: an output that is, is inside, or holds one of its command's inputs is refused.

Every writer of the package asks :func:`check_output` before it writes anything. Paths are compared resolved
(symbolic links followed, ``./`` and ``..`` removed) and by identity (``st_dev``/``st_ino`` of the path and of
each of its parents), so a symbolic link, a hard link or a bind mount of an input does not slip through.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .base import CheckpointError

__all__ = ["Input", "check_output"]

Input = tuple[str, "str | os.PathLike[str]"]  # (what it is, for messages: "the reference folder"; its path)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _relation(output: str | os.PathLike[str], given: str | os.PathLike[str]) -> str | None:
    """How ``output`` stands to ``given``: ``"is"``, ``"is inside"``, ``"holds"``, or None (apart)."""
    out, into = Path(os.path.realpath(output)), Path(os.path.realpath(given))
    out_id, into_id = _identity(out), _identity(into)
    if out == into or (out_id is not None and out_id == into_id):
        return "is"
    if into in out.parents or (into_id is not None and into_id in {_identity(p) for p in out.parents}):
        return "is inside"
    if out in into.parents or (out_id is not None and out_id in {_identity(p) for p in into.parents}):
        return "holds"
    return None


def check_output(output: str | os.PathLike[str], inputs: Iterable[Input] = (), *, folder: bool = False) -> None:
    """Refuse (:class:`CheckpointError`, one line) an ``output`` that is, is inside, or holds one of ``inputs``.

    ``inputs``: ``(what, path)`` pairs, ``what`` naming the input in the message ("the reference folder").
    ``folder``: ``output`` is a folder to write into; then it may not be the current directory or hold it
    either (an export into ``.`` would mix its files with the user's).
    """
    for what, path in inputs:
        relation = _relation(output, path)
        if relation is not None:
            raise CheckpointError(
                f"{output}: {relation} {what} ({path}), an input of this command; inputs are read-only, "
                "so write the output to another path"
            )
    if folder and _relation(output, os.curdir) in ("is", "holds"):
        raise CheckpointError(
            f"{output}: is the current directory or holds it; write the folder to a new path (e.g. model-ema/), never "
            "into the directory you work in"
        )
