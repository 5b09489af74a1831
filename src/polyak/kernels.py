"""The kernels: the tensor operations that fold a model into its K averages, and write averages into a model.

:class:`Fold` is the one place where tensors are averaged. It takes one group of model tensors (one device and
dtype) and the K averages that follow them, and on each update reads every model element once:

- one average of the model's own dtype and device, rounded to nearest, unguarded: one ``_foreach_lerp_``
  (one ``lerp_`` over a flat range where both sides tile one storage, see :func:`polyak.flatten_parameters`);
- K averages of the model's own dtype and device, to nearest, unguarded: the model is read in chunks of at most
  ``CHUNK`` elements, and each chunk is folded into all K averages while it is in cache;
- anything else (a cast, an offloaded average, stochastic rounding, a non-finite guard): each chunk is first
  staged through a reused buffer, then folded into all K averages. Memory beyond the averages does not grow with K.

A weight of exactly 1.0 copies (exact, and safe on garbage); 0.0 leaves that average untouched (BEMA's anchor).
:func:`mix_into` writes a combination of the model and its averages into the model (copy, blend, extrapolation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

__all__ = ["CHUNK", "Fold", "Mix", "RandomBits", "all_finite", "batches", "copy_all", "merge_runs", "mix_into"]

# Model elements staged per chunk (4 MiB in float32). Measured on a 2 MiB-L2, 32 MiB-L3 CPU (bf16 ResNet-50 into a
# float32 average, 1 thread): 64 Ki elements 3.5x the floor, 256 Ki 1.75x, 1 Mi 1.16-1.20x, 4 Mi 1.26x; K=3
# averages of 32 Mi float32 elements: 1 Mi chunks 24.4 ms against 31.8 ms for three passes.
CHUNK = 1 << 20
# Stochastic rounding (see RandomBits): the seed of the fixed random table or keys, and the odd multipliers of the
# multiply-xorshift hash.
_PATTERN_SEED = 0x5EED
_MIX = (0x2C1B3C6D, 0x297A2D39)

Weight = float | Tensor


def batches(sizes: Sequence[int], capacity: int) -> Iterator[list[tuple[int, int, int]]]:
    """Pack tensors of the given sizes, in order, into batches of at most ``capacity`` elements.

    Yields lists of ``(tensor index, start, stop)``; a tensor larger than ``capacity`` is split into pieces.
    """
    batch: list[tuple[int, int, int]] = []
    used = 0
    for index, n in enumerate(sizes):
        for a in range(0, n, capacity):
            b = min(n, a + capacity)
            if batch and used + b - a > capacity:
                yield batch
                batch, used = [], 0
            batch.append((index, a, b))
            used += b - a
    if batch:
        yield batch


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-d bool tensor on the tensors' device: every value of every tensor is finite. No host sync.

    ``tensors`` share one floating or complex dtype. Exact whatever the magnitudes: each tensor's 2-norm is
    accumulated in float64, where the square of float32's largest value (1.2e77) cannot overflow, nor 2**63 of
    them, so a norm is inf or NaN exactly when the tensor holds inf or NaN. float64 squares could overflow: for
    float64 (and complex128's parts), the max-abs norm, which never accumulates.
    """
    if tensors[0].dtype == torch.complex128:
        tensors = [torch.view_as_real(t) for t in tensors]
    if tensors[0].dtype != torch.float64:
        wide = torch.complex128 if tensors[0].is_complex() else torch.float64
        norms = torch._foreach_norm(tensors, 2, dtype=wide)
    else:
        nonempty = [t for t in tensors if t.numel()]  # the max of nothing is an error
        if not nonempty:
            return torch.ones((), dtype=torch.bool, device=tensors[0].device)
        norms = torch._foreach_norm(nonempty, math.inf)
    return torch.stack(norms).lt(math.inf).all()  # a norm is >= 0, or NaN (and NaN < inf is False)


def copy_all(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``torch._foreach_copy_`` that accepts empty lists (an average may hold no tensor at all)."""
    if targets:
        torch._foreach_copy_(targets, sources)


def _adjacent(a: Tensor, b: Tensor) -> bool:
    """True when contiguous ``b`` starts where contiguous ``a`` ends, in the same storage and dtype."""
    return (
        a.dtype == b.dtype
        and a.is_contiguous()
        and b.is_contiguous()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() + a.numel() == b.storage_offset()
    )


def _flat(first: Tensor, numel: int, skip: int = 0) -> Tensor:
    """``numel`` elements of ``first``'s storage, starting ``skip`` elements into ``first``, as a 1-d tensor
    (sharing the storage, but not a view: ``_base`` is None, so nothing mistakes it for a whole buffer)."""
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(first.untyped_storage(), first.storage_offset() + skip, (numel,), (1,))


def _tiled(models: Sequence[Tensor], batch: Sequence[tuple[int, int, int]], sizes: Sequence[int]) -> bool:
    """True when the pieces ``(index, start, stop)`` of ``models`` follow each other in one storage."""
    return models[batch[0][0]].is_contiguous() and all(
        b == sizes[i] and c == 0 and _adjacent(models[i], models[j]) for (i, _, b), (j, c, _) in pairwise(batch)
    )


def merge_runs(targets: list[Tensor], models: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Merge consecutive pairs whose targets and model tensors both tile one storage into one flat pair: a model
    laid out by :func:`polyak.flatten_parameters` becomes a single pair per group, one kernel per update."""
    merged: tuple[list[Tensor], list[Tensor]] = ([], [])
    start = 0
    for stop in range(1, len(targets) + 1):
        if (
            stop < len(targets)
            and _adjacent(targets[stop - 1], targets[stop])
            and _adjacent(models[stop - 1], models[stop])
        ):
            continue
        if stop - start == 1:
            merged[0].append(targets[start])
            merged[1].append(models[start])
        else:
            numel = sum(t.numel() for t in models[start:stop])
            merged[0].append(_flat(targets[start], numel))
            merged[1].append(_flat(models[start], numel))
        start = stop
    return merged


def _lerp(targets: list[Tensor], sources: list[Tensor], weight: Weight) -> None:
    """``_foreach_lerp_`` by a float or a 0-d tensor (as a Scalar a tensor would sync); exactly 1.0 copies."""
    if isinstance(weight, Tensor):
        torch._foreach_lerp_(targets, sources, [weight] * len(targets))
    elif weight == 1.0:
        torch._foreach_copy_(targets, sources)
    else:
        torch._foreach_lerp_(targets, sources, weight)


def round_stochastically_(target: Tensor, wide: Tensor, bits: Tensor) -> None:
    """Write float32 ``wide`` into bfloat16 ``target``, rounding up with probability (distance to the value below)
    / (bf16 spacing): unbiased. ``bits`` holds uniform integers in [0, 2**16), one per value; ``wide`` is overwritten.

    The 16 low bits of a float32 pattern are exactly what bfloat16 drops, so adding uniform bits there and
    truncating rounds stochastically, in the magnitude (the sign bit is apart), for normal and subnormal values;
    infinities stay infinite and NaNs stay NaN unless their payload lies only in the low bits.
    """
    pattern = wide.view(torch.int32)
    pattern.add_(bits).bitwise_and_(-(1 << 16))
    target.copy_(wide)  # exact: nothing is left below bfloat16's precision


def _offloaded(average: Tensor, model: Tensor) -> bool:
    """True when the average is in host memory and the model on a GPU: copies can overlap the CPU's folds."""
    return average.device.type == "cpu" and model.device.type == "cuda"


@dataclass
class _Batch:
    """One chunk: each average's range (one flat tensor, or pieces), the range the averages read and its
    per-tensor views (the staged range; unstaged, the model's own range when it tiles one storage, else empty, and
    the model's pieces), the model's pieces, and the model's range when they tile one storage."""

    targets: list[Tensor | list[Tensor]]
    staged: Tensor
    views: list[Tensor]
    reads: list[Tensor]
    source: Tensor | None


class Fold:
    """Folds one group of model tensors into K averages: ``average_k <- average_k + w_k (model - average_k)``.

    Args:
        averages: K lists of average tensors, each list parallel to ``models`` (one device and dtype for all).
        models: the model tensors (one device and dtype), read once per update.
        generator: stochastic rounding into bfloat16 averages, drawing from this stream (None: to nearest).
        guard: the update may be skipped on the device (``keep`` in :meth:`run`).

    Staged (see the module docstring), scratch is one chunk in the staging dtype (the averages', float32 when
    rounding stochastically), plus, for stochastic rounding, a float32 chunk and :class:`RandomBits` (two to three
    chunks of int32; 16-20 MiB in all). For an average offloaded to host memory, two pinned chunks alternate:
    chunk b+1 is copied from the GPU while the CPU folds chunk b.
    """

    def __init__(
        self,
        averages: Sequence[Sequence[Tensor]],
        models: Sequence[Tensor],
        *,
        generator: torch.Generator | None = None,
        guard: bool = False,
    ) -> None:
        self.averages = [list(a) for a in averages]
        self.models = list(models)
        first, model = self.averages[0][0], self.models[0]
        self.device = first.device
        self.generator = generator
        same = first.dtype == model.dtype and first.device == model.device
        self.direct = len(self.averages) == 1 and same and generator is None and not guard
        if self.direct:
            self.pairs = merge_runs(self.averages[0], self.models)
            return
        self.staging = not (same and generator is None and not guard)  # else the averages read the model itself
        self.overlap = _offloaded(first, model)
        cuda = model.device.type == "cuda"  # a CPU stand-in for the GPU (tests) has no events to wait on
        self.events = [torch.cuda.Event() for _ in range(2)] if self.overlap and cuda else []
        sizes = [m.numel() for m in self.models]
        # A tensor that is not contiguous (a channels_last weight or its adopted average) is staged whole: a flat
        # piece of it would first be copied whole by reshape, once per piece.
        unsplittable = max(
            (
                n
                for n, i in zip(sizes, range(len(sizes)), strict=True)
                if not (self.models[i].is_contiguous() and all(a[i].is_contiguous() for a in self.averages))
            ),
            default=0,
        )
        capacity = max(min(sum(sizes), CHUNK), unsplittable, 1)
        staging = torch.float32 if generator is not None else first.dtype
        pinned = self.overlap and cuda
        self.scratches = [
            torch.empty(capacity if self.staging else 0, dtype=staging, device=first.device, pin_memory=pinned)
            for _ in range(2 if self.overlap else 1)
        ]
        self.batches = [self._batch(number, batch, sizes) for number, batch in enumerate(batches(sizes, capacity))]
        if generator is not None:
            self.wide = torch.empty(capacity, device=first.device)
            self.bits = RandomBits(capacity, (len(self.averages), len(self.batches)), first.device)

    def _batch(self, number: int, batch: list[tuple[int, int, int]], sizes: list[int]) -> _Batch:
        scratch = self.scratches[number % len(self.scratches)]
        template = self.averages[0]
        views: list[Tensor] = []
        pieces: list[tuple[int, int, int, bool]] = []
        offset = 0
        for i, a, b in batch:
            whole = (a, b) == (0, sizes[i])
            view = scratch[offset : offset + b - a]
            views.append(view.as_strided(template[i].shape, template[i].stride()) if whole and self.staging else view)
            pieces.append((i, a, b, whole))
            offset += b - a
        reads = [self.models[i] if whole else self.models[i].reshape(-1)[a:b] for i, a, b, whole in pieces]
        source = None
        if len(batch) > 1 and _tiled(self.models, batch, sizes):
            source = _flat(self.models[batch[0][0]], offset, batch[0][1])
        targets: list[Tensor | list[Tensor]] = []
        for average in self.averages:
            flat = average[0]._base
            contiguous = flat is not None and all(t._base is flat for t in average)
            contiguous = contiguous and all(
                x.storage_offset() + x.numel() == y.storage_offset() for x, y in pairwise(average)
            )
            if contiguous and flat is not None and (self.staging or source is not None):
                start = average[batch[0][0]].storage_offset() + batch[0][1]
                targets.append(flat.view(-1)[start : start + offset])
            else:  # adopted tensors (a live target's own), or unstaged pieces of the model: tensor by tensor
                targets.append([average[i] if whole else average[i].view(-1)[a:b] for i, a, b, whole in pieces])
        if self.generator is not None and any(not isinstance(t, Tensor) for t in targets):
            raise ValueError("stochastic rounding needs the average's own flat storage, not adopted tensors")
        if self.staging:
            return _Batch(targets, scratch[:offset], views, reads, source)
        return _Batch(targets, source if source is not None else scratch, reads, reads, source)

    def run(self, weights: Sequence[Weight], keep: Tensor | None = None) -> None:
        """Fold the model into every average by its weight; with ``keep`` (a 0-d bool tensor), a False flag
        leaves every average bit for bit as it was, whatever the model holds (decided on the device)."""
        if self.direct:
            if isinstance(weights[0], Tensor) or weights[0] != 0.0:
                _lerp(*self.pairs, weights[0])
            return
        if self.generator is not None:
            self.bits.draw(self.generator)
        for number in range(len(self.batches)):
            if self.staging:
                self._stage(number)
            if not self.overlap:
                self._fold(number, weights, keep)
                continue
            if self.events:
                self.events[number % 2].record()
            if number:  # fold the previous batch while this one is in flight
                self._fold(number - 1, weights, keep)
        if self.overlap and self.batches:
            self._fold(len(self.batches) - 1, weights, keep)

    def _stage(self, number: int) -> None:
        """Copy the model's part of batch ``number`` into its staging buffer (the one read of the model)."""
        batch = self.batches[number]
        if batch.source is not None:
            batch.staged.copy_(batch.source, non_blocking=self.overlap)
        else:
            torch._foreach_copy_(batch.views, batch.reads, non_blocking=self.overlap)

    def _fold(self, number: int, weights: Sequence[Weight], keep: Tensor | None) -> None:
        """Fold the staged batch ``number`` into each average (or copy, for a weight of 1.0)."""
        batch = self.batches[number]
        if self.events:
            self.events[number % 2].synchronize()  # its copy from the GPU has landed
        for k, (target, weight) in enumerate(zip(batch.targets, weights, strict=True)):
            if not isinstance(weight, Tensor) and weight == 0.0:
                continue
            copy = not isinstance(weight, Tensor) and weight == 1.0  # exact, and blind to what the average held
            if self.generator is not None and not copy:
                self._round(batch, self.bits(batch.staged.numel(), k, number), target, weight, keep)  # type: ignore[arg-type]  # flat
                continue
            staged, views = batch.staged, batch.views
            if keep is not None:  # the average's own values where the flag is False: the lerp then keeps them
                staged, views = self._guarded(batch, target, keep)
            if not isinstance(target, Tensor):
                _lerp(target, views, weight)
                continue
            if copy:
                target.copy_(staged)
            else:
                target.lerp_(staged, weight)

    def _guarded(self, batch: _Batch, target: Tensor | list[Tensor], keep: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The staged batch with ``target``'s values where ``keep`` is False, in place. One flag serves the whole
        update, so a False flag writes each average's own values over the chunk in turn, and a True one leaves the
        model's there for every average."""
        if isinstance(target, Tensor):
            torch.where(keep, batch.staged, target, out=batch.staged)
        else:
            for view, piece in zip(batch.views, target, strict=True):
                torch.where(keep, view, piece, out=view)
        return batch.staged, batch.views

    def _round(self, batch: _Batch, bits: Tensor, target: Tensor, weight: Weight, keep: Tensor | None) -> None:
        """Fold in float32 and write back into the bfloat16 average with stochastic rounding by ``bits``."""
        n = batch.staged.numel()
        wide, staged = self.wide[:n], batch.staged
        wide.copy_(target)
        if keep is not None:  # a lerp toward the average's own value is exact, and exact values round to themselves
            torch.where(keep, staged, wide, out=staged)  # in place, as in _guarded
        wide.lerp_(staged, weight)
        round_stochastically_(target, wide, bits)


class RandomBits:
    """Uniform integers in [0, 2**16) for stochastic rounding, one per value of a chunk of at most ``capacity``
    values, from one draw per chunk and average (``shape``: averages x chunks) of the stream.

    In host memory, where a draw is read without a sync: a window into a fixed table whose every ``period``
    consecutive entries hold each 16-bit value equally often, at an offset drawn uniformly in [0, period). Each
    value's bits are then exactly uniform, the values of a chunk read distinct entries, so they round nearly
    independently, and no pass over the chunk is spent making them. On a GPU (``hashed``), where reading a draw
    would sync: a multiply-xorshift hash of each value's fixed random key plus the draw, six passes.
    """

    def __init__(self, capacity: int, shape: tuple[int, int], device: torch.device, *, hashed: bool | None = None):
        self.hashed = device.type != "cpu" if hashed is None else hashed
        keys = torch.Generator().manual_seed(_PATTERN_SEED)
        self.draws = torch.empty(shape, dtype=torch.int32, device=device)
        if not self.hashed:
            self.period = 1 << max(16, (capacity - 1).bit_length())
            balanced = torch.randperm(self.period, generator=keys).remainder_(1 << 16).to(torch.int32)
            self.table = balanced.repeat(2)[: capacity + self.period]
            self.offsets: list[list[int]] = []
            return
        pattern = torch.randint(-(2**31), 2**31 - 1, (capacity,), dtype=torch.int32, generator=keys)
        self.pattern = pattern.to(device)
        self.bits = torch.empty(capacity, dtype=torch.int32, device=device)
        self.mixing = torch.empty(capacity, dtype=torch.int32, device=device)

    def draw(self, generator: torch.Generator) -> None:
        """This update's draws, one per chunk and average."""
        if not self.hashed:
            self.offsets = self.draws.random_(0, self.period, generator=generator).tolist()
        else:
            self.draws.random_(-(2**31), 2**31 - 1, generator=generator)

    def __call__(self, n: int, average: int, chunk: int) -> Tensor:
        """The bits of ``n`` values of chunk ``chunk`` of average ``average``, for this update."""
        if not self.hashed:
            offset = self.offsets[average][chunk]
            return self.table[offset : offset + n]
        bits, mixing = self.bits[:n], self.mixing[:n]
        torch.add(self.pattern[:n], self.draws[average, chunk], out=bits)  # int32 arithmetic wraps around
        bits.mul_(_MIX[0])
        torch.bitwise_right_shift(bits, 15, out=mixing)
        bits.bitwise_xor_(mixing).mul_(_MIX[1])
        torch.bitwise_right_shift(bits, 16, out=bits)
        return bits.bitwise_and_(0xFFFF)


@dataclass(frozen=True)
class Mix:
    """A value written into the model: ``model * self.model + sum_k average_k * self.averages[k]``."""

    model: float
    averages: tuple[float, ...]

    @classmethod
    def copy(cls, index: int, count: int) -> Mix:
        """Average number ``index`` of ``count``, as it is."""
        return cls(0.0, tuple(1.0 if k == index else 0.0 for k in range(count)))


@torch.no_grad()
def mix_into(models: list[Tensor], averages: Sequence[list[Tensor]], mix: Mix) -> None:
    """Write ``mix`` of ``models`` and their K ``averages`` into ``models``, in place.

    A plain copy of one average is one ``_foreach_copy_`` (cast to the model's dtype); any other mix is computed in
    the averages' precision, at least float32 (one temporary of their size), and cast back.
    """
    if not models:
        return
    used = [(k, c) for k, c in enumerate(mix.averages) if c != 0.0]
    if mix.model == 0.0 and len(used) == 1 and used[0][1] == 1.0:
        torch._foreach_copy_(models, averages[used[0][0]])
        return
    first = averages[0]
    wide = [torch.promote_types(a.dtype, torch.float32) for a in first]
    if mix.model != 0.0:
        result = [m.to(a.device, w, copy=True) for m, a, w in zip(models, first, wide, strict=True)]
        torch._foreach_mul_(result, mix.model)
    else:  # no share of the model: whatever it holds (NaN included) does not enter
        result = [torch.zeros_like(a, dtype=w) for a, w in zip(first, wide, strict=True)]
    for k, c in used:
        torch._foreach_add_(result, [a.to(w) for a, w in zip(averages[k], wide, strict=True)], alpha=c)
    torch._foreach_copy_(models, result)
