"""Speed goals: a contender's ratio over a reference's, measured in the same run, against a limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .report import ShapeReport

__all__ = ["FLOOR", "Goal", "goal_lines"]

FLOOR = "floor: one lerp_ over a flat buffer"  # the first contender: every ratio in the table is to it


@dataclass(frozen=True)
class Goal:
    """``subject``'s time is at most ``limit`` times ``reference``'s, on ``shapes`` (default: every shape).

    ``on_cpu`` says, after "NOT met" on a CPU, why the goal can be out of reach there. A goal that is not
    ``judged`` prints its ratio and limit with no verdict, in the words ``label`` and ``against``.
    """

    subject: str
    reference: str
    limit: float
    shapes: tuple[str, ...] = ()
    on_cpu: str = ""
    judged: bool = True
    label: str = ""  # how the line names the subject (default: its name)
    against: str = ""  # how the line names the reference (default: its name, or "the floor")

    def line(self, report: ShapeReport, ratio: float) -> str:
        """The goal line for one shape."""
        label = self.label or self.subject
        if not self.judged:
            return f"- {report.shape}, {label}: {ratio:.2f} {self.against} (goal {self.limit})"
        verdict = "met" if ratio <= self.limit else "NOT met"
        if ratio > self.limit and report.device == "cpu":
            verdict += self.on_cpu
        against = self.against or ("the floor" if self.reference == FLOOR else self.reference)
        return f"- {report.shape}, {label}: {ratio:.2f}x {against} (goal <= {self.limit}x): {verdict}"


def goal_lines(reports: Sequence[ShapeReport], goals: Sequence[Goal]) -> list[str]:
    """Every goal that applies, shape by shape, then any polyak row that syncs or allocates."""
    lines = []
    for report in reports:
        by_name = {r.name: r for r in report.results}
        if report.scaled:
            lines.append(f"- {report.shape}: not judged, the goals are for the full shape (run without --quick)")
        for goal in goals if not report.scaled else ():
            applies = not goal.shapes or report.shape in goal.shapes
            if applies and goal.subject in by_name and goal.reference in by_name:
                lines.append(goal.line(report, by_name[goal.subject].ratio / by_name[goal.reference].ratio))
        for r in report.results:
            if r.name.startswith("polyak") and (r.syncs or r.alloc_mb):
                lines.append(f"- {report.shape}, {r.name}: {r.syncs} syncs and {r.alloc_mb} MB allocated per update")
    return lines
