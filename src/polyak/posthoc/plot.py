"""The picture of a width selection: score against ``sigma_rel``, the choice, the tracked widths, the reach."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .fit import MAX_FIT_ERROR

if TYPE_CHECKING:
    from .selection import Selection

__all__ = ["plot_selection"]


def plot_selection(selection: Selection, path: Path, score: str = "score") -> None:
    """Write ``selection`` as a PNG to ``path``: each candidate's score against its ``sigma_rel`` (log axis), the
    chosen width starred, the tracked widths as dotted lines, widths the snapshots cannot express shaded and the
    candidates left out for that marked on the axis. Live averages without a width are drawn by name."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FormatStrFormatter, FuncFormatter
    except ImportError as error:
        raise ImportError("Selection.plot needs matplotlib: pip install 'polyak[plot]'") from error

    figure = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = figure.subplots()
    scores, chosen = selection.scores, selection.chosen
    better = "lower" if selection.mode == "min" else "higher"
    if all(key in selection.widths for key in scores):
        points = sorted((selection.widths[key], score) for key, score in scores.items())
        ax.plot([x for x, _ in points], [y for _, y in points], "o-", color="tab:blue", label="score of a candidate")
        x = selection.widths[chosen]
        ax.plot([x], [scores[chosen]], "*", markersize=16, color="tab:red", label=f"chosen: σrel {x:g}")
        ax.axvline(x, color="tab:red", linestyle="--", linewidth=1.0)
        for k, width in enumerate(selection.tracked):
            label = f"tracked: σrel {', '.join(f'{w:g}' for w in selection.tracked)}" if k == 0 else None
            ax.axvline(width, color="black", linestyle=":", linewidth=1.4, label=label)
        left_out = selection.left_out
        everything = [x for x, _ in points] + list(selection.tracked) + list(left_out)
        low, high = min(everything) / 1.4, max(everything) * 1.4
        if selection.reach is not None:
            reach_low, reach_high = selection.reach
            label = f"not expressible (fit error > {MAX_FIT_ERROR:g})"
            for start, stop in ((low, reach_low), (reach_high, high)):
                ax.axvspan(start, stop, color="0.85", zorder=0, linewidth=0, label=label if start == low else None)
        if left_out:
            ax.plot(
                list(left_out), [0.03] * len(left_out), "x", color="tab:gray", markersize=9,
                transform=ax.get_xaxis_transform(), label="left out: not expressible",
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        shown = ("2", "3", "5") if high / low < 30 else ("3",)  # minor labels only where they fit

        def minor(value: float, _: object) -> str:
            text = f"{value:.1g}"
            return text if text.lstrip("0.").startswith(shown) else ""

        ax.xaxis.set_minor_formatter(FuncFormatter(minor))
        ax.tick_params(axis="x", which="both", labelsize="small")
        ax.set_xlabel("σrel: EMA width relative to training length (log scale)")
    else:
        keys = list(scores)
        ax.plot(range(len(keys)), [scores[k] for k in keys], "o-", color="tab:blue", label="score of an average")
        at = keys.index(chosen)
        ax.plot([at], [scores[chosen]], "*", markersize=16, color="tab:red", label=f"chosen: {chosen}")
        ax.set_xticks(range(len(keys)), [str(k) for k in keys])
        ax.set_xlabel("average")
    ax.set_ylabel(f"{score} ({better} is better)")
    where = f" at step {selection.step}" if selection.step is not None else ""
    ax.set_title(f"EMA width chosen on validation data{where}", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=110)
