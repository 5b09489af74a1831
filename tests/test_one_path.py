"""The one path's structural guarantees, counted at the ATen dispatcher and in the watcher, never timed.

- K averages read the model once: a ``MultiEMA`` (K=3) folds each chunk of the model (at most ``CHUNK``
  elements, a cache's worth) into all K averages before it reads the next chunk, so each model element comes from
  memory once per update, in float32 (the averages read the chunk in place) and bfloat16 (the chunk is cast once).
- Changes to other modules cost an averager nothing: torch's ``AveragedModel`` beside it, a module whose
  ``.data`` is assigned every step, a layer added elsewhere: zero re-checks of the averager's own model; a change
  to its own model is still noticed.
- What polyak installs into torch goes when the last averager goes.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import polyak
import polyak.kernels


class ModelReads(TorchDispatchMode):
    """Records, operation by operation, which elements of the model's (contiguous) tensors it reads: written
    outputs and views aside, as ranges in one numbering of all the model's elements."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.starts: dict[int, tuple[str, int]] = {}
        self.total = 0
        for name, p in model.named_parameters():
            self.starts[p.untyped_storage().data_ptr()] = (name, self.total)
            self.total += p.numel()
        self.read: Counter[str] = Counter()  # elements read, per model tensor
        self.ops: list[list[tuple[int, int]]] = []  # per operation that reads the model: its ranges

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return func(*args, **(kwargs or {}))  # a view reads no data
        written = {i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write}
        ranges = []
        for index, value in enumerate(args):
            if index in written:
                continue
            for tensor in tree_leaves(value):
                if isinstance(tensor, Tensor) and tensor.numel():
                    found = self.starts.get(tensor.untyped_storage().data_ptr())
                    if found is not None:
                        self.read[found[0]] += tensor.numel()
                        low = found[1] + tensor.storage_offset()
                        ranges.append((low, low + tensor.numel()))
        if ranges:
            self.ops.append(ranges)
        return func(*args, **(kwargs or {}))

    def widest_window(self) -> int:
        """The most distinct model elements read from the first read of any one element to its last: a chunk's
        size when each chunk is folded into every average before the next, the whole model for separate passes."""
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for number, ranges in enumerate(self.ops):
            for low, high in ranges:
                for element in range(low, high):
                    first.setdefault(element, number)
                    last[element] = number
        widest = 0
        for span in {(first[e], last[e]) for e in first}:
            seen = {e for ranges in self.ops[span[0] : span[1] + 1] for low, high in ranges for e in range(low, high)}
            widest = max(widest, len(seen))
        return widest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_ema_of_three_reads_each_model_chunk_once(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = 1000  # several chunks in this small model (CHUNK itself is 1 Mi elements)
    monkeypatch.setattr(polyak.kernels, "CHUNK", chunk)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).to(dtype)
    multi = polyak.MultiEMA(model, decays=(0.9, 0.99, 0.999))
    multi.update()
    multi.update()  # plans and kernels exist
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with ModelReads(model) as reads:
        multi.update()
    reads_per_element = 3 if dtype == torch.float32 else 1  # in place by each average / cast once into float32
    assert dict(reads.read) == {name: reads_per_element * p.numel() for name, p in model.named_parameters()}
    assert reads.widest_window() <= chunk
    separate = [polyak.EMA(model, decay=d) for d in (0.9, 0.99, 0.999)]  # the window can fail: three full passes
    for ema in separate:
        ema.update()
        ema.update()
    with ModelReads(model) as reads:
        for ema in separate:
            ema.update()
    assert dict(reads.read) == {name: 3 * p.numel() for name, p in model.named_parameters()}
    assert reads.widest_window() == reads.total


def test_foreign_events_cost_no_recheck_and_own_changes_are_noticed() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = polyak.EMA(model, decay=0.9)
    other = nn.Linear(4, 4)
    averaged = torch.optim.swa_utils.AveragedModel(other)  # torch's: assigns its n_averaged buffer every update
    assigned = nn.Linear(4, 4)
    for step in range(5):
        averaged.update_parameters(other)
        assigned.weight.data = torch.randn(4, 4)  # a BYOL-style target update by .data
        assigned.register_buffer("extra", torch.zeros(step + 1))  # a buffer added elsewhere
        ema.update()
    assert ema.shadow.rechecks == 0
    before = ema.shadow.tensors()["0.weight"].double().clone()
    model[0].weight.data = torch.randn(4, 4)  # its own model: followed
    ema.update()
    assert ema.shadow.rechecks == 1
    expected = before + 0.1 * (model[0].weight.detach().double() - before)
    torch.testing.assert_close(ema.shadow.tensors()["0.weight"].double(), expected, rtol=0, atol=1e-6)


def test_what_polyak_installs_goes_with_the_last_averager() -> None:
    gc.collect()
    before = polyak.watch.installed()
    data = torch.Tensor.__dict__.get("data")
    ema = polyak.EMA(nn.Linear(2, 2), decay=0.9)
    assert polyak.watch.installed()
    del ema
    gc.collect()
    if not before:  # no other averager of this process is alive
        assert not polyak.watch.installed()
        assert torch.Tensor.__dict__.get("data") is data  # torch's own again
    unwatched = polyak.EMA(nn.Linear(2, 2), decay=0.9, watch=False)
    unwatched.update()
    assert unwatched.shadow.rechecks == 0


def test_a_fresh_process_gets_torchs_own_functions_back_after_its_last_averager() -> None:
    """In a process of its own (no averager of another test alive): the hooks stay while any averager lives and
    go with the last one, leaving torch's own ``Tensor.data`` and ``Module._apply``."""
    code = """
import gc, torch, polyak
from torch import nn
data, apply = torch.Tensor.__dict__.get("data"), nn.Module.__dict__["_apply"]
first = polyak.EMA(nn.Linear(2, 2), decay=0.9)
second = polyak.EMA(nn.Linear(2, 2), decay=0.9)
del first
gc.collect()
assert polyak.watch.installed(), "the second averager still watches"
del second
gc.collect()
assert not polyak.watch.installed(), "installed after the last averager went"
assert torch.Tensor.__dict__.get("data") is data and nn.Module.__dict__["_apply"] is apply
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_unwatched_averager_follows_a_change_after_check() -> None:
    """``watch=False`` installs nothing; ``check()`` then looks at the model again (a re-cast is followed)."""
    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.5, watch=False)
    ema.update()
    first = model.weight.detach().double().clone()
    model.double()
    ema.check()
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update()
    weight = ema.state_dict()["shadow"]["weight"]
    assert weight.dtype == torch.float32  # the float32 average stays float32 for a float64 model
    torch.testing.assert_close(weight.double(), first + 0.5 * (2.0 - first), rtol=0, atol=1e-6)
