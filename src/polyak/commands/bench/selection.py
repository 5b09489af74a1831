"""``polyak bench --select``: choosing the EMA width with :func:`polyak.posthoc.select` against the hand-written loop.

On the GPT-2-like bench model (:class:`~polyak.commands.bench.models.GPT2Shape`, smaller than GPT-2 small by
default so that a run takes about a minute on a 2-core CPU), a :class:`~polyak.PostHocEMA` follows a random walk
of its weights with snapshots; then, ``rounds`` times in turn, for the same candidate widths:

* the hand-written loop: for each width, ``reconstruct`` it to a file, load the file into a copy of the model,
  evaluate, delete the file (what users write today);
* ``select(directory, model, evaluate, sigma_rels=widths)``;
* the evaluations alone (one ``evaluate`` per width), the part both must pay.

``evaluate`` is a GPT-2 forward pass (causal attention, GELU MLP, tied head) over ``batch`` sequences of
``context`` tokens, returning the loss. The goal: select <= 0.6x the loop, in seconds per round (medians).
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...io import open_safetensors
from ...posthoc import reconstruct, select
from ...posthoc.tracker import PostHocEMA
from .models import GPT2Shape

__all__ = ["GOAL", "measure", "report"]

GOAL = 0.6  # selection time as a fraction of the hand-written loop's


def gpt2_loss(model: GPT2Shape, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """Next-token cross-entropy of a GPT-2 forward pass over ``ids`` (batch x tokens) with ``model``'s tensors."""
    batch, length = ids.shape
    x = model.wte(ids) + model.wpe(torch.arange(length))
    blocks: list[Any] = list(model.blocks)  # models._Block: attn, attn_proj, fc, fc_proj, ln_1, ln_2
    for block in blocks:
        q, k, v = block.attn(block.ln_1(x)).view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + block.attn_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        x = x + block.fc_proj(nn.functional.gelu(block.fc(block.ln_2(x))))
    logits = model.lm_head(model.ln_f(x))
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _snapshots(model: GPT2Shape, directory: Path, snapshots: int, every: int) -> None:
    """A PostHocEMA (sigma_rel 0.05, 0.10) following a random walk of the weights, a snapshot every ``every``."""
    tracker = PostHocEMA(model, directory=directory, snapshot_every=every)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(snapshots * every):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator), alpha=1e-3)
            tracker.update()


def _loop(directory: Path, model: nn.Module, evaluate: Callable[[nn.Module], float], widths: list[float]) -> float:
    """The hand-written selection: reconstruct each width to a file, load it into a copy, evaluate, compare."""
    scratch = Path(tempfile.mkdtemp(prefix="polyak-select-loop-"))
    probe = copy.deepcopy(model)
    scores = {}
    try:
        for width in widths:
            path = scratch / f"ema-{width}.safetensors"
            reconstruct(directory, [width], [path])
            probe.load_state_dict(dict(open_safetensors(path)))
            scores[width] = evaluate(probe)
            path.unlink()
    finally:
        shutil.rmtree(scratch)
    return min(scores, key=scores.__getitem__)


def measure(
    *,
    layers: int = 4,
    width: int = 256,
    vocab: int = 8192,
    context: int = 128,
    snapshots: int = 8,
    every: int = 10,
    widths: int = 12,
    batch: int = 2,
    rounds: int = 3,
    threads: int = 1,
) -> dict[str, Any]:
    """Seconds per round of the hand-written loop, ``select`` and the evaluations alone (medians and each round)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2Shape(vocab=vocab, context=context, width=width, layers=layers)
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(1))
    heads = max(1, width // 64)

    def evaluate(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return gpt2_loss(m, ids, heads).item()  # type: ignore[arg-type]

    directory = Path(tempfile.mkdtemp(prefix="polyak-select-bench-"))
    try:
        _snapshots(model, directory, snapshots, every)
        candidates = [float(f"{w:.3g}") for w in np.geomspace(0.035, 0.2, widths)]
        times: dict[str, list[float]] = {"loop": [], "select": [], "evaluations": []}
        for _ in range(rounds):  # interleaved, so that a busy machine slows all three alike
            started = time.perf_counter()
            by_loop = _loop(directory, model, evaluate, candidates)
            times["loop"].append(time.perf_counter() - started)
            started = time.perf_counter()
            chosen = select(directory, model, evaluate, sigma_rels=candidates).chosen
            times["select"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for _ in candidates:
                evaluate(model)
            times["evaluations"].append(time.perf_counter() - started)
            if chosen != by_loop:
                raise RuntimeError(f"select chose sigma_rel {chosen}, the hand-written loop {by_loop}")
    finally:
        shutil.rmtree(directory)
        torch.set_num_threads(previous)
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "snapshots": snapshots,
        "widths": len(candidates),
        "rounds": times,
        "median": medians,
        "ratio": medians["select"] / medians["loop"],
        "goal": GOAL,
    }


def report(figures: dict[str, Any]) -> str:
    """The figures of :func:`measure` as text: each round, the medians, the ratio and its goal."""
    median, rounds = figures["median"], figures["rounds"]
    lines = [
        f"width selection on GPT2Shape ({figures['parameters'] / 1e6:.2f}M parameters), {figures['widths']} widths, "
        f"{figures['snapshots']} snapshots of 2 profiles, {torch.get_num_threads()} thread(s)",
        *(
            f"round {i + 1}: loop {loop:.2f} s, select {sel:.2f} s, evaluations alone {ev:.2f} s"
            for i, (loop, sel, ev) in enumerate(
                zip(rounds["loop"], rounds["select"], rounds["evaluations"], strict=True)
            )
        ),
        f"median: hand-written loop {median['loop']:.2f} s, select {median['select']:.2f} s, of which the "
        f"{figures['widths']} evaluations take {median['evaluations']:.2f} s",
        f"select / loop = {figures['ratio']:.2f}x; goal <= {figures['goal']:g}x: "
        + ("met" if figures["ratio"] <= figures["goal"] else "NOT met"),
    ]
    return "\n".join(lines)
