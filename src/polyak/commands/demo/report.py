"""What a demo run shows in words and numbers: the table of final test accuracy, its reading, a JSON record."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path

from .recipe import DIRECT_SIGMA_RELS, LAST, METHODS, POSTHOC, RECALCULATED
from .train import Curves

Results = dict[str, list[Curves]]  # setting name -> one Curves per seed
MISSING = "—"  # a table cell for a row that does not apply to a setting


def chosen(runs: list[Curves]) -> int:
    """Index of the swept width that ``polyak.posthoc.select`` chose on the held-out split in most runs (the
    smaller among equals); the test set plays no part."""
    picks = [s.sigma_rels.index(s.chosen) for s in (run.sweep for run in runs) if s is not None]
    return max(sorted(set(picks)), key=picks.count)


def finals(runs: list[Curves]) -> dict[str, list[float]]:
    """Final test accuracy (%) of each row, one value per seed (the post-hoc row: at the width each run chose)."""
    values = {name: [run.accuracy[name][-1] for run in runs] for name in runs[0].accuracy}
    if runs[0].sweep is not None:
        values[POSTHOC] = [s.test[s.sigma_rels.index(s.chosen)] for s in (r.sweep for r in runs) if s is not None]
    return values


def _cell(values: list[float] | None) -> str:
    if values is None:
        return MISSING
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def rows(results: Results) -> list[str]:
    """Every row of the table, in order: the last iterate, the averages, then rows only some settings have."""
    return list(dict.fromkeys(name for runs in results.values() for name in finals(runs)))


def table(results: Results) -> str:
    """A Markdown table: one row per method, one column per setting, mean ± std over seeds (— where a row does
    not apply: BatchNorm recalculation needs BatchNorm, the post-hoc sweep runs in one setting)."""
    columns = {setting: finals(runs) for setting, runs in results.items()}
    methods = rows(results)
    cells = [["method", *columns], ["---"] * (len(columns) + 1)]
    cells += [[method, *(_cell(column.get(method)) for column in columns.values())] for method in methods]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in cells
    )


NOISE_NOTE = (
    "Noise level: the larger of two standard errors of the mean difference over seeds and one standard error "
    "of an accuracy measured on the test set; a difference within it is not told apart from chance. The best "
    "average is picked after the fact, which flatters it slightly."
)


def noise_level(gains: list[float], accuracy: float, test_size: int) -> float:
    """Points below which a gain is not told apart from chance.

    The larger of two standard errors of the mean gain over seeds (none with one seed) and one standard
    error of an accuracy of ``accuracy`` % measured on ``test_size`` examples.
    """
    over_seeds = 2.0 * statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else 0.0
    p = accuracy / 100.0
    return max(over_seeds, 100.0 * math.sqrt(p * (1.0 - p) / test_size))


def _signed(value: float, digits: int) -> str:
    """``value`` with its sign, rounded to ``digits`` decimals; a value that rounds to zero reads +0.0, not -0.0."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def _differences(after: list[float], before: list[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


def _reading(gain: float, noise: float) -> str:
    return "helps" if gain > noise else "hurts" if gain < -noise else "makes no clear difference"


def verdict(setting: str, runs: list[Curves], test_size: int) -> str:
    """One sentence: does the best average beat the last iterate in this setting, by more than the noise?"""
    final = finals(runs)
    last = final.pop(LAST)
    gains = {name: _differences(values, last) for name, values in final.items()}
    best = max(gains, key=lambda name: statistics.fmean(gains[name]))
    gain = statistics.fmean(gains[best])
    noise = noise_level(gains[best], statistics.fmean(last), test_size)
    measured = f"{_signed(gain, 1)} points over the last iterate (noise level {noise:.1f})"
    if gain > noise:
        return f"{setting}: averaging helps: {best} is {measured}."
    if gain < -noise:
        return f"{setting}: averaging hurts: even the best average, {best}, is {measured}."
    return f"{setting}: averaging gives no clear gain: the best average, {best}, is {measured}."


def recalculation_verdict(setting: str, runs: list[Curves], test_size: int) -> str | None:
    """One sentence: does recomputing BatchNorm statistics (``update_bn``) beat keeping the averaged ones?
    None for a setting without such rows."""
    final = finals(runs)
    pairs = [(name.removesuffix(RECALCULATED), name) for name in final if name.endswith(RECALCULATED)]
    if not pairs:
        return None
    parts, readings = [], []
    for base, recalculated in pairs:
        gains = _differences(final[recalculated], final[base])
        gain = statistics.fmean(gains)
        noise = noise_level(gains, statistics.fmean(final[base]), test_size)
        parts.append(f"{base} by {_signed(gain, 1)} points (noise level {noise:.1f})")
        readings.append(_reading(gain, noise))
    if len(set(readings)) == 1:
        reading = f"recalculating {readings[0]}"
    else:
        reading = "; ".join(f"for {base} recalculating {r}" for (base, _), r in zip(pairs, readings, strict=True))
    return (
        f"{setting}: recomputing the BatchNorm statistics of an average with update_bn on the training data, "
        f"instead of keeping those averaged with its weights, changes {' and '.join(parts)}: {reading}."
    )


def posthoc_summary(setting: str, runs: list[Curves], test_size: int) -> str | None:
    """A paragraph on the post-hoc sweep: reconstruction against direct tracking, and the chosen width.
    None for a setting without a sweep."""
    sweeps = [run.sweep for run in runs if run.sweep is not None]
    if not sweeps:
        return None
    sigmas = sweeps[0].sigma_rels
    worst = max(max(s.profile_errors) for s in sweeps)
    final = finals(runs)
    agreement, apart = [], []
    for sigma, row in DIRECT_SIGMA_RELS.items():
        i = sigmas.index(sigma)
        differences = _differences([s.test[i] for s in sweeps], final[row])
        noise = noise_level(differences, statistics.fmean(final[row]), test_size)
        spread = f" ± {statistics.stdev(differences):.2f}" if len(differences) > 1 else ""
        largest = max(abs(d) for d in differences)
        if abs(statistics.fmean(differences)) > noise:
            apart.append(f"{sigma:g}")
        agreement.append(
            f"σrel {sigma:g} {_signed(statistics.fmean(differences), 2)}{spread} points (largest {largest:.2f}, "
            f"noise level {noise:.1f})"
        )
    picks = ", ".join(f"{s.chosen:g}" for s in sweeps)
    test_means = [statistics.fmean(s.test[i] for s in sweeps) for i in range(len(sigmas))]
    on_test = max(range(len(sigmas)), key=test_means.__getitem__)
    last = statistics.fmean(final[LAST])
    over = f"mean over {len(sweeps)} seeds" if len(sweeps) > 1 else "one seed"
    saved = " and ".join(f"{s:g}" for s in sweeps[0].saved_sigma_rels)
    reading = (
        f"they differ by more than the noise at σrel {', '.join(apart)}"
        if apart
        else "they agree within the noise level"
    )
    return (
        f"Post-hoc EMA ({setting}): PostHocEMA kept {sweeps[0].snapshots} snapshots of the widths σrel "
        f"{saved} in each run; after training, {len(sigmas)} widths from "
        f"σrel {sigmas[0]:g} to {sigmas[-1]:g} were reconstructed from them (weight profiles fitted to within "
        f"{100 * worst:.1f}%). Reconstructed minus directly tracked test accuracy, {over}: {'; '.join(agreement)}: "
        f"{reading}. "
        f"Chosen in each run by polyak.posthoc.select on the held-out split (training sequences never trained on), "
        f"the widths (σrel {picks}) give {_cell(final[POSTHOC])}% test accuracy, "
        f"{_signed(statistics.fmean(final[POSTHOC]) - last, 1)} points over the last iterate; "
        f"the best width on the test set itself, σrel {sigmas[on_test]:g} ({test_means[on_test]:.1f}%), is "
        "picked after seeing the test set, which flatters it."
    )


def warmup_note(steps: int) -> str:
    """How the warmed-up EMA rows' decays grow, and what each reaches in a run of ``steps`` updates (one per
    optimizer step), computed from their rules; rows whose decays agree at every update are named as one."""
    parts: list[str] = []
    schedules: dict[tuple[float, ...], list[str]] = {}
    for method in METHODS:
        rule = method.warmup
        if rule is None:
            continue
        reached = next(j for j in itertools.count(1) if rule.decay_at(j) >= rule.decay)
        if reached <= steps:
            parts.append(f"{method.name} reaches {rule.decay:g} after {reached:,} updates")
        else:
            final = rule.decay_at(steps)
            parts.append(f"{method.name} ends at {final:.4f} (it would reach {rule.decay:g} after {reached:,})")
        schedules.setdefault(tuple(rule.decay_at(j) for j in range(1, steps + 1)), []).append(method.name)
    note = (
        "EMA d warms up: decay min(d, (1+n)/(10+n)) after n updates (RationalWarmup), so it follows the weights "
        f"from the start. Over this run's {steps:,} updates {'; '.join(parts)}."
    )
    for names in schedules.values():
        if len(names) > 1:
            note += f" {' and '.join(names)} are the same average in this run."
    return note


def summaries(results: Results, test_size: int) -> list[str]:
    """The reading of the table: one paragraph of verdicts, then one on the post-hoc sweep (if any)."""
    sentences = [verdict(name, runs, test_size) for name, runs in results.items()]
    sentences += [s for name, runs in results.items() if (s := recalculation_verdict(name, runs, test_size))]
    paragraphs = ["\n".join(sentences)]  # one verdict per line
    paragraphs += [p for name, runs in results.items() if (p := posthoc_summary(name, runs, test_size))]
    return paragraphs


def record(results: Results, about: Mapping[str, object], path: Path) -> None:
    """Every evaluation of every run as JSON: ``settings[setting][method][seed][i]`` (%, null before an
    average starts) at optimizer step ``steps[i]``; ``posthoc[setting]`` holds each seed's sweep."""
    settings = {
        setting: {
            name: [[None if math.isnan(v) else v for v in run.accuracy[name]] for run in runs]
            for name in runs[0].accuracy
        }
        for setting, runs in results.items()
    }
    posthoc = {
        setting: {
            "sigma_rels": runs[0].sweep.sigma_rels,
            "chosen_on_held_out": [run.sweep.chosen for run in runs if run.sweep is not None],
            "test": [run.sweep.test for run in runs if run.sweep is not None],
            "held_out": [run.sweep.held_out for run in runs if run.sweep is not None],
            "profile_errors": [run.sweep.profile_errors for run in runs if run.sweep is not None],
        }
        for setting, runs in results.items()
        if runs[0].sweep is not None
    }
    steps = next(iter(results.values()))[0].steps
    path.write_text(json.dumps({**about, "steps": steps, "settings": settings, "posthoc": posthoc}, indent=1) + "\n")
