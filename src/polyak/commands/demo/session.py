"""One demo session: every setting trained for every seed, then the table, its reading, both plots and the JSON
record written to the output folder."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import torch

from . import plots, report, selection
from .data import HELD_OUT, Dataset, mnist1d
from .recipe import BATCH_SIZE, CHANNELS, LEARNING_RATE, POSTHOC, RECALCULATED, SETTINGS, WIDTH
from .train import BN_BATCH, train

EVALUATIONS = 40  # test-set evaluations per run, for the plot (post-hoc EMA snapshots are taken at the same steps)
COLUMNS = 100  # the prose of the printed text (and of table.md) is filled to this width; the table is not


def session(seeds: int, steps: int, out: Path) -> str:
    """Train, write everything to ``out``; return the text to print (the table and its reading)."""
    data = mnist1d()
    results = _train_all(data, seeds, steps)
    return _write(results, data, seeds, steps, out)


def _train_all(data: Dataset, seeds: int, steps: int) -> report.Results:
    """Every setting for seeds 0..seeds-1, behind one progress bar on a terminal; elsewhere (output to a file or
    a pipe) one line per setting on stderr instead of the bar's updates."""
    from tqdm import tqdm

    threads = torch.get_num_threads()
    # The model is tiny: threads cost more than they give, and one thread keeps the numbers machine-independent.
    torch.set_num_threads(1)
    try:
        results: report.Results = {}
        # disable=None: no bar unless stderr is a terminal
        with tqdm(total=len(SETTINGS) * seeds * steps, unit="step", desc="polyak demo", disable=None) as bar:
            for k, setting in enumerate(SETTINGS, 1):
                if bar.disable:
                    print(
                        f"polyak demo: training {setting.name} ({k} of {len(SETTINGS)} settings, {seeds} x {steps} "
                        "steps)",
                        file=sys.stderr,
                        flush=True,
                    )
                bar.set_postfix_str(setting.name)
                results[setting.name] = [
                    train(data, setting, seed, steps, EVALUATIONS, bar.update) for seed in range(seeds)
                ]
        return results
    finally:
        torch.set_num_threads(threads)


def _write(results: report.Results, data: Dataset, seeds: int, steps: int, out: Path) -> str:
    """Write both plots, the JSON record and the table (with its reading) to ``out``; return the table's text."""
    recipe = (
        f"plain SGD lr {LEARNING_RATE} (decaying: cosine to 0), batch {BATCH_SIZE}, {steps} steps, seeds "
        f"0..{seeds - 1}; MLP {data.x.shape[1]}-{WIDTH}-{WIDTH}-{data.classes}; CNN: 2 conv layers of "
        f"{CHANNELS} channels with BatchNorm"
    )
    notes = (
        f"{report.warmup_note(steps)} BatchNorm statistics of an average are averaged with its "
        f"weights; '{RECALCULATED.strip()}' rows recompute them on the {len(data.y):,} training sequences "
        f"(batches of {BN_BATCH}). '{POSTHOC}': reconstructed from PostHocEMA snapshots, its width chosen on "
        f"the {HELD_OUT} held-out training sequences."
    )
    out.mkdir(parents=True, exist_ok=True)
    caption = f"{notes} Bands: ± std over seeds. Each y-axis starts 15 points below its lowest final accuracy."
    plots.curves(results, f"{data.source}\n{recipe}", caption, out / "accuracy.png")
    plots.sigma(results, f"{data.source}\n{recipe}", out / "sigma_rel.png")
    selection.plot((run.sweep for runs in results.values() for run in runs), out)
    over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    header = f"Test accuracy (%) at the end of training, {over}.\n{data.source}.\n{recipe}.\n{notes}"
    paragraphs = report.summaries(results, len(data.y_test))
    about = {
        "dataset": data.source,
        "recipe": recipe,
        "notes": notes,
        "methods": report.rows(results),
        "summaries": paragraphs,
    }
    report.record(results, about, out / "results.json")
    prose = [_filled(part) for part in (header, *paragraphs, report.NOISE_NOTE)]
    text = "\n\n".join([prose[0], report.table(results), *prose[1:]])
    (out / "table.md").write_text(text + "\n")
    return text


def _filled(text: str) -> str:
    """Each line of ``text`` filled to COLUMNS, words kept whole (a word longer than a line stays on its own)."""
    return "\n".join(
        textwrap.fill(line, COLUMNS, break_long_words=False, break_on_hyphens=False) for line in text.splitlines()
    )
