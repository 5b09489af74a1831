"""What a demo run shows: the table of final test accuracy, its reading in words, the plot and a JSON record."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .train import LAST, Curves

Results = dict[str, list[Curves]]  # setting name -> one Curves per seed


def finals(runs: list[Curves]) -> dict[str, list[float]]:
    """Final test accuracy (%) of each method, one value per seed."""
    return {name: [run.accuracy[name][-1] for run in runs] for name in runs[0].accuracy}


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(results: Results) -> str:
    """A Markdown table: one row per method, one column per setting, mean ± std over seeds."""
    columns = {setting: finals(runs) for setting, runs in results.items()}
    methods = list(next(iter(columns.values())))
    rows = [["method", *columns], ["---"] * (len(columns) + 1)]
    rows += [[method, *(_cell(column[method]) for column in columns.values())] for method in methods]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows
    )


NOISE_NOTE = (
    "Noise level: the larger of two standard errors of the mean gain over seeds and one standard error of the "
    "last iterate's accuracy on the test set; a gain within it is not told apart from chance. The best average "
    "is picked after the fact, which flatters it slightly."
)


def noise_level(gains: list[float], accuracy: float, test_size: int) -> float:
    """Points below which a gain is not told apart from chance.

    The larger of two standard errors of the mean gain over seeds (none with one seed) and one standard
    error of an accuracy of ``accuracy`` % measured on ``test_size`` examples.
    """
    over_seeds = 2.0 * statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else 0.0
    p = accuracy / 100.0
    return max(over_seeds, 100.0 * math.sqrt(p * (1.0 - p) / test_size))


def verdict(setting: str, runs: list[Curves], test_size: int) -> str:
    """One sentence: does the best average beat the last iterate in this setting, by more than the noise?"""
    final = finals(runs)
    last = final.pop(LAST)
    gains = {name: [a - b for a, b in zip(values, last, strict=True)] for name, values in final.items()}
    best = max(gains, key=lambda name: statistics.fmean(gains[name]))
    gain = statistics.fmean(gains[best])
    noise = noise_level(gains[best], statistics.fmean(last), test_size)
    measured = f"{gain:+.1f} points over the last iterate (noise level {noise:.1f})"
    if gain > noise:
        return f"{setting}: averaging helps: {best} is {measured}."
    if gain < -noise:
        return f"{setting}: averaging hurts: even the best average, {best}, is {measured}."
    return f"{setting}: averaging gives no clear gain: the best average, {best}, is {measured}."


def plot(results: Results, title: str, path: Path) -> None:
    """Mean test accuracy over training (over seeds), one panel per setting, written as a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(results), 4.2), layout="constrained")
    axes = figure.subplots(1, len(results), sharey=True, squeeze=False)[0]
    for ax, (setting, runs) in zip(axes, results.items(), strict=True):
        for name in runs[0].accuracy:
            mean = np.mean([run.accuracy[name] for run in runs], axis=0)
            style = {"color": "black", "linewidth": 1.0, "alpha": 0.7} if name == LAST else {"linewidth": 1.6}
            ax.plot(runs[0].steps, mean, label=name, **style)
        ax.set_title(setting)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy (%), mean of {len(next(iter(results.values())))} seeds")
    axes[-1].legend(loc="lower right", fontsize="small")
    figure.suptitle(title, fontsize="medium")
    figure.savefig(path, dpi=120)


def record(results: Results, about: Mapping[str, object], path: Path) -> None:
    """Every evaluation of every run as JSON: ``settings[setting][method][seed][i]`` (%, null before an
    average starts) at optimizer step ``steps[i]``."""
    settings = {
        setting: {
            name: [[None if math.isnan(v) else v for v in run.accuracy[name]] for run in runs]
            for name in runs[0].accuracy
        }
        for setting, runs in results.items()
    }
    steps = next(iter(results.values()))[0].steps
    path.write_text(json.dumps({**about, "steps": steps, "settings": settings}, indent=1) + "\n")
