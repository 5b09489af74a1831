"""The demo's two figures: test accuracy over training (one panel per setting), and post-hoc EMA's accuracy
against the EMA width chosen after training. Spread over seeds is drawn as a band of ± one standard deviation."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from .recipe import DIRECT_SIGMA_RELS, LAST, RECALCULATED
from .report import Results, chosen, finals

# Each method keeps one colour, drawn solid, in every panel; its row with recomputed BatchNorm statistics
# ("+ update_bn") has the same colour, dashed.
STYLES: dict[str, dict[str, Any]] = {
    LAST: {"color": "black", "linewidth": 1.0},
    "EMA 0.99": {"color": "tab:blue"},
    "EMA 0.999": {"color": "tab:orange"},
    "SWA (last 25%)": {"color": "tab:green"},
    "power EMA σrel 0.05": {"color": "tab:red"},
    "power EMA σrel 0.10": {"color": "tab:purple"},
    "BEMA": {"color": "tab:brown"},
}


def style(name: str) -> dict[str, Any]:
    """Colour, line style and width of row ``name``."""
    base = name.removesuffix(RECALCULATED)
    look = {"linewidth": 1.6, "linestyle": "-", **STYLES.get(base, {"color": "tab:gray"})}
    if base != name:
        look.update(linestyle="--", linewidth=2.0)
    return look


def _mean_std(values: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds (axis 0); NaN where an average has not started."""
    array = np.asarray(values, dtype=np.float64)
    spread = array.std(axis=0, ddof=1) if len(array) > 1 else np.zeros(array.shape[1])
    return array.mean(axis=0), spread


def curves(results: Results, title: str, caption: str, path: Path) -> None:
    """Mean test accuracy over training with a ± std band, one panel per setting, one legend, as a PNG.

    Each y-axis starts 15 points below the panel's lowest final accuracy, so that the averages' differences
    show; the first steps of training (from chance, 10%) fall below it.
    """
    from matplotlib.figure import Figure

    columns = 2 if len(results) > 1 else 1
    rows = math.ceil(len(results) / columns)
    figure = Figure(figsize=(6.2 * columns, 3.6 * rows + 1.9), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    seen: dict[str, Any] = {}
    for ax, (setting, runs) in zip(axes, results.items(), strict=False):
        steps = runs[0].steps
        highest = 0.0
        for name in runs[0].accuracy:
            mean, spread = _mean_std([run.accuracy[name] for run in runs])
            look = style(name)
            (line,) = ax.plot(steps, mean, label=name, **look)
            ax.fill_between(steps, mean - spread, mean + spread, color=look["color"], alpha=0.12, linewidth=0)
            seen.setdefault(name, line)
            highest = max(highest, float(np.nanmax(mean + spread)))
        lowest = min(min(values) for values in finals(runs).values())
        ax.set_ylim(max(0.0, lowest - 15.0), min(100.0, highest + 1.0))
        ax.set_title(setting, fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(results) :]:
        ax.set_visible(False)
    figure.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=3, fontsize="small")
    figure.suptitle(_wrapped(f"{title}\n{caption}", figure.get_figwidth()), fontsize="small")
    figure.savefig(path, dpi=110)


def sigma(results: Results, title: str, path: Path) -> None:
    """Test accuracy of post-hoc EMA against σrel (reconstructed after training), with the widths tracked
    directly during training as separate points and the width chosen on the held-out split marked."""
    from matplotlib.figure import Figure

    swept = {setting: runs for setting, runs in results.items() if runs[0].sweep is not None}
    figure = Figure(figsize=(6.6 * len(swept), 5.2), layout="constrained")
    axes = figure.subplots(1, len(swept), squeeze=False)[0]
    for ax, (setting, runs) in zip(axes, swept.items(), strict=True):
        sweeps = [run.sweep for run in runs if run.sweep is not None]
        sigmas = np.asarray(sweeps[0].sigma_rels)
        test, test_spread = _mean_std([s.test for s in sweeps])
        held_out, held_out_spread = _mean_std([s.held_out for s in sweeps])
        ax.plot(sigmas, test, "o-", color="tab:red", label="reconstructed after training: test set")
        ax.fill_between(sigmas, test - test_spread, test + test_spread, color="tab:red", alpha=0.15, linewidth=0)
        ax.plot(sigmas, held_out, "s:", color="tab:gray", label="reconstructed: held-out split (used to choose)")
        ax.fill_between(
            sigmas, held_out - held_out_spread, held_out + held_out_spread, color="tab:gray", alpha=0.12, linewidth=0
        )
        final = finals(runs)
        for k, (width, row) in enumerate(DIRECT_SIGMA_RELS.items()):
            direct, direct_spread = _mean_std([[v] for v in final[row]])
            ax.errorbar(
                [width], direct, yerr=direct_spread, fmt="D", markersize=9, markerfacecolor="none",
                markeredgewidth=1.8, color="black", capsize=4,
                label="tracked directly during training: test set" if k == 0 else None,
            )  # fmt: skip
        best = sigmas[chosen(runs)]
        ax.axvline(best, color="tab:blue", linestyle="--", label=f"chosen on the held-out split: σrel {best:g}")
        last = float(np.mean(final[LAST]))
        ax.axhline(last, color="black", linewidth=1.0, alpha=0.6, label=f"last iterate: {last:.1f}%")
        ax.set_xscale("log")
        ax.set_xticks(sigmas, [f"{s:g}" for s in sigmas], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel("σrel: EMA width relative to training length (log scale)")
        ax.set_ylabel(f"accuracy at step {runs[0].steps[-1]} (%)")
        ax.set_title(
            f"Post-hoc EMA, {setting}: {sweeps[0].snapshots} snapshots of σrel "
            f"{' and '.join(f'{s:g}' for s in sweeps[0].saved_sigma_rels)} per run\n"
            f"mean ± std over {len(sweeps)} seeds",
            fontsize="medium",
        )
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    figure.suptitle(_wrapped(title, figure.get_figwidth()), fontsize="small")
    figure.savefig(path, dpi=110)


def _wrapped(text: str, width_inches: float) -> str:
    """``text`` broken into lines that fit a figure ``width_inches`` wide in matplotlib's "small" font."""
    return "\n".join(textwrap.fill(line, int(width_inches * 14)) for line in text.splitlines())
