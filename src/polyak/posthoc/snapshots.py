"""Snapshot files of :class:`~polyak.posthoc.PostHocEMA` on disk: their name pattern, format and reading."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..io import SafetensorsFile
from ..rules import sigma_rel_to_gamma

__all__ = ["FORMAT", "PATTERN", "Snapshot", "find_snapshots", "version"]

FORMAT = "polyak.posthoc/1"
PATTERN = "phema-*.safetensors"


def version() -> str:
    """polyak's version, recorded in the files it writes."""
    from .. import __version__

    return __version__


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: its step (since averaging began), profiles, tensor names and layout."""

    path: Path
    step: int
    sigma_rels: tuple[float, ...]
    names: tuple[str, ...]
    copied: frozenset[str]
    aliases: dict[str, str]
    tensors: SafetensorsFile
    run: str | None = None  # the identity of the run that wrote it (None: written before runs had one)


def find_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshots (``phema-*.safetensors``) in ``directory``, by step; each file's header and checksums checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"snapshot directory {str(directory)!r} does not exist or is not a directory")
    snapshots = []
    for path in sorted(directory.glob(PATTERN)):
        tensors = SafetensorsFile(path)
        metadata = tensors.metadata
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{str(path)!r} is not a polyak snapshot (format {metadata.get('format')!r}, expected {FORMAT!r}); "
                "move it out of the snapshot directory"
            )
        try:
            snapshot = Snapshot(
                path,
                int(metadata["step"]),
                tuple(float(s) for s in json.loads(metadata["sigma_rels"])),
                tuple(str(n) for n in json.loads(metadata["names"])),
                frozenset(str(n) for n in json.loads(metadata["copied"])),
                {str(a): str(n) for a, n in json.loads(metadata["aliases"]).items()},
                tensors,
                metadata.get("run") or None,
            )
            if not 0 < snapshot.step < 2**63:
                raise ValueError(f"step {snapshot.step} is not a positive int64")
            for sigma_rel in snapshot.sigma_rels:
                sigma_rel_to_gamma(sigma_rel)
        except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as error:
            raise ValueError(f"{str(path)!r}: snapshot metadata is incomplete or malformed ({error})") from None
        keys = [f"{k}/{name}" for k in range(len(snapshot.sigma_rels)) for name in snapshot.names]
        missing = [key for key in keys if key not in tensors.specs]  # `in tensors` would read each tensor
        if missing:
            raise ValueError(f"{str(path)!r} lacks tensor {missing[0]!r} ({len(missing)} missing); it is not usable")
        snapshots.append(snapshot)
    return sorted(snapshots, key=lambda s: s.step)
