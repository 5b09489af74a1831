"""The benchmark's output: a Markdown table per shape, or the same as JSON, with the goal lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from .harness import Result
from .shapes import SHAPES

__all__ = ["ShapeReport", "as_json", "markdown"]


@dataclass
class ShapeReport:
    shape: str
    device: str
    tensors: int
    elements: int
    scaled: bool = False  # a --quick stand-in for the shape: the goals, set for the full shape, are not judged
    results: list[Result] = field(default_factory=list)

    @property
    def title(self) -> str:
        """The shape as run."""
        shape = SHAPES[self.shape]
        return shape.quick_title if self.scaled else shape.title


def markdown(reports: Sequence[ShapeReport], header: str, skipped: Sequence[str], goals: Sequence[str]) -> str:
    """One table per shape, the peers not installed, and the goal lines."""
    out = [header, ""]
    for report in reports:
        out += [
            f"### {report.title}: {report.tensors} tensors, {report.elements / 1e6:.2f}M averaged elements,"
            f" {report.results[0].rounds} rounds",
            "",
            "| implementation | ms/step | x floor (quartiles) | GB/s | aten ops | syncs | alloc MB | extra memory"
            " (x params) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report.results:
            name = f"{r.name} ({r.note})" if r.note else r.name
            out.append(
                f"| {name} | {r.ms:.2f} | {r.ratio:.2f} ({r.ratio_quartiles[0]:.2f}-{r.ratio_quartiles[1]:.2f}) |"
                f" {r.gb_per_s:.1f} | {r.ops:g} | {r.syncs:g} | "
                f"{r.alloc_mb:.1f} | {r.extra_memory:.2f} |"
            )
        out.append("")
    if skipped:
        out += [f"Not installed, skipped: {', '.join(skipped)}.", ""]
    out += ["Goals (ratios of medians over rounds, measured in the same run):", *goals]
    return "\n".join(out)


def as_json(reports: Sequence[ShapeReport], header: str, skipped: Sequence[str], goals: Sequence[str]) -> str:
    """The same content as :func:`markdown`, for machines."""
    data = {
        "machine": header,
        "skipped": list(skipped),
        "shapes": [
            {"shape": r.shape, "tensors": r.tensors, "elements": r.elements, "results": [vars(x) for x in r.results]}
            for r in reports
        ],
        "goals": list(goals),
    }
    return json.dumps(data, indent=1)
