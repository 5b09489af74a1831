"""The update kernels of the shadow: the tensor operations that fold a model into its average.

Only :mod:`polyak.shadow` calls them. A same-dtype group is one ``_foreach_lerp_`` (or one ``lerp_`` over a
flat range when both sides tile one storage); a model of another dtype or device is staged through a small
buffer (:class:`CastLerp`) so that the model is read once and no full-size temporary is made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import pairwise

import torch
from torch import Tensor

__all__ = [
    "CastLerp",
    "StochasticLerp",
    "all_finite",
    "batches",
    "copy_all",
    "foreach_lerp",
    "merge_runs",
    "round_stochastically_",
]

# A cast/offload update stages the model in chunks of this many elements (4 MiB in float32). Measured on a 2 MiB-L2,
# 32 MiB-L3 CPU (bf16 ResNet-50 into a float32 average, 1 thread): 64 Ki elements 3.5x the floor, 256 Ki 1.75x,
# 1 Mi 1.16-1.20x, 4 Mi 1.26x: the staged buffer needs to stay in L3, and fewer batches cost less Python.
_CHUNK = 1 << 20
# Seed of the fixed pattern of low bits that stochastic rounding XORs with a fresh draw per batch and update.
_PATTERN_SEED = 0x5EED


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
    them (1e96), so a norm is inf or NaN exactly when the tensor holds inf or NaN. float64 squares could
    overflow: for float64 (and the real and imaginary parts of complex128), the max-abs norm, which never
    accumulates (but is slower on CPU).
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


def foreach_lerp(shadows: list[Tensor], models: list[Tensor], weight: float | Tensor) -> None:
    """``_foreach_lerp_`` by a float or a 0-d tensor; a tensor goes per tensor (as a Scalar it would sync)."""
    if isinstance(weight, Tensor):
        torch._foreach_lerp_(shadows, models, [weight] * len(shadows))
    else:
        torch._foreach_lerp_(shadows, models, weight)


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
    """``numel`` elements of ``first``'s storage, starting ``skip`` elements into ``first``, as a 1-d tensor.

    It shares the storage but is not a view (``_base`` is None), so nothing mistakes it for a whole buffer.
    """
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(first.untyped_storage(), first.storage_offset() + skip, (numel,), (1,))


def _tiled(models: Sequence[Tensor], batch: Sequence[tuple[int, int, int]], sizes: Sequence[int]) -> bool:
    """True when the pieces ``(index, start, stop)`` of ``models`` follow each other in one storage."""
    return models[batch[0][0]].is_contiguous() and all(
        b == sizes[i] and c == 0 and _adjacent(models[i], models[j]) for (i, _, b), (j, c, _) in pairwise(batch)
    )


def merge_runs(watched: list[Tensor], shadows: list[Tensor], models: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Merge consecutive pairs whose shadows and model tensors both tile one storage into one flat pair.

    A model laid out by :func:`polyak.flatten_parameters` becomes a single pair per group: one kernel per
    update. The model tensors of merged runs are added to ``watched`` so that a changed layout is
    noticed and the plan rebuilt.
    """
    merged_shadows: list[Tensor] = []
    merged_models: list[Tensor] = []
    start = 0
    for stop in range(1, len(shadows) + 1):
        if (
            stop < len(shadows)
            and _adjacent(shadows[stop - 1], shadows[stop])
            and _adjacent(models[stop - 1], models[stop])
        ):
            continue
        if stop - start == 1:
            merged_shadows.append(shadows[start])
            merged_models.append(models[start])
        else:
            numel = sum(t.numel() for t in models[start:stop])
            merged_shadows.append(_flat(shadows[start], numel))
            merged_models.append(_flat(models[start], numel))
            watched.extend(models[start:stop])
        start = stop
    return merged_shadows, merged_models


def _offloaded(shadow: Tensor, model: Tensor) -> bool:
    """True when the shadow is in host memory and the model on a GPU: copies can overlap the CPU's lerps."""
    return shadow.device.type == "cpu" and model.device.type == "cuda"


class CastLerp:
    """Lerp of shadows from model tensors of another dtype or device, staged through a small buffer.

    Reads the model once and the shadow once, with no full-size temporary: batches of whole tensors (or
    pieces of large ones) are copied into a reusable buffer of at most ``_CHUNK`` elements, then each batch
    is one lerp over the contiguous range of the shadow's flat buffer that it covers. A batch whose model
    tensors tile one storage (see :func:`polyak.flatten_parameters`) is staged with one copy. For a shadow
    offloaded to the CPU, two pinned buffers alternate: batch b+1 is copied from the GPU (non-blocking) while
    the CPU lerps batch b; GPU memory holds at most one chunk in transit (a dtype conversion on the way).
    """

    def __init__(self, shadows: Sequence[Tensor], models: Sequence[Tensor], staging: torch.dtype | None = None) -> None:
        self.shadows = list(shadows)
        self.models = list(models)
        sizes = [s.numel() for s in shadows]
        self.overlap = _offloaded(shadows[0], models[0])
        cuda = models[0].device.type == "cuda"
        self.events = [torch.cuda.Event() for _ in range(2)] if self.overlap and cuda else []
        # A tensor that is not contiguous (a channels_last weight, or its adopted average) is staged whole: a flat
        # piece of it would first be copied whole by reshape, once per piece.
        unsplittable = max(
            (
                n
                for s, m, n in zip(shadows, models, sizes, strict=True)
                if not (s.is_contiguous() and m.is_contiguous())
            ),
            default=0,
        )
        capacity = max(min(sum(sizes), _CHUNK), unsplittable)
        self.scratches = [
            torch.empty(
                capacity, dtype=staging or shadows[0].dtype, device=shadows[0].device, pin_memory=self.overlap and cuda
            )
            for _ in range(2 if self.overlap else 1)
        ]
        # Views into one flat buffer, back to back (adopted tensors are not views: handled tensor by tensor).
        flat = shadows[0]._base
        contiguous = all(s._base is flat for s in shadows) and all(
            a.storage_offset() + a.numel() == b.storage_offset() for a, b in pairwise(shadows)
        )
        # Each batch: the shadow range (one tensor) or pieces (a list), the staged range and its views per
        # tensor, the model pieces (tensor index, start, stop, whole tensor?), and the model range when the
        # pieces tile one storage (its tensors are then watched by the plan).
        self.batches: list[
            tuple[Tensor | list[Tensor], Tensor, list[Tensor], list[tuple[int, int, int, bool]], Tensor | None]
        ] = []
        self.watched: list[Tensor] = []
        for number, batch in enumerate(batches(sizes, max(capacity, 1))):
            scratch = self.scratches[number % len(self.scratches)]
            views: list[Tensor] = []
            targets: list[Tensor] = []
            pieces: list[tuple[int, int, int, bool]] = []
            offset = 0
            for i, a, b in batch:
                whole = (a, b) == (0, sizes[i])
                view = scratch[offset : offset + b - a]
                views.append(view.as_strided(shadows[i].shape, shadows[i].stride()) if whole else view)
                targets.append(shadows[i] if whole else shadows[i].view(-1)[a:b])
                pieces.append((i, a, b, whole))
                offset += b - a
            if contiguous and flat is not None:
                start = shadows[batch[0][0]].storage_offset() + batch[0][1]
                target: Tensor | list[Tensor] = flat.view(-1)[start : start + offset]
            else:
                target = targets
            source = None
            if len(batch) > 1 and _tiled(self.models, batch, sizes):
                source = _flat(self.models[batch[0][0]], offset, batch[0][1])
                self.watched.extend(self.models[i] for i, _, _ in batch)
            self.batches.append((target, scratch[:offset], views, pieces, source))

    def run(self, weight: float | Tensor, keep: Tensor | None = None) -> None:
        """Lerp every batch by ``weight``; a weight of exactly 1.0 copies (exact, and safe on garbage).

        With ``keep`` (a 0-d bool tensor, True to apply), a False flag stages the shadow's own values in place
        of the model's, so the lerp leaves the shadow bit for bit as it was, whatever the model holds.
        """
        for number in range(len(self.batches)):
            self._stage(number, non_blocking=self.overlap)
            if not self.overlap:
                self._fold(number, weight, keep)
                continue
            if self.events:
                self.events[number % 2].record()
            if number:  # lerp the previous batch while this one is in flight
                self._fold(number - 1, weight, keep)
        if self.overlap and self.batches:
            self._fold(len(self.batches) - 1, weight, keep)

    def _stage(self, number: int, non_blocking: bool = False) -> None:
        """Copy the model's part of batch ``number`` into the staging buffer."""
        _, staged, views, pieces, source = self.batches[number]
        if source is not None:
            staged.copy_(source, non_blocking=non_blocking)
        else:
            models = self.models
            sources = [models[i] if whole else models[i].reshape(-1)[a:b] for i, a, b, whole in pieces]
            torch._foreach_copy_(views, sources, non_blocking=non_blocking)

    def _fold(self, number: int, weight: float | Tensor, keep: Tensor | None) -> None:
        """Lerp (or copy, for a weight of 1.0) the staged batch ``number`` into the shadow."""
        target, staged, views, _, _ = self.batches[number]
        if self.events:
            self.events[number % 2].synchronize()  # its copy from the GPU has landed
        if keep is not None and isinstance(target, Tensor):
            torch.where(keep, staged, target, out=staged)
        elif keep is not None:
            for view, piece in zip(views, target, strict=True):
                torch.where(keep, view, piece, out=view)
        _fold_staged(target, staged, views, weight)

    def run_shared(self, casts: Sequence[CastLerp], weights: Sequence[float | Tensor]) -> None:
        """Stage each batch of the model once (in this scratch) and fold it into the shadows of every cast.

        ``casts`` (this one among them) pair shadows of identical layout with the same model tensors. The
        copies are not overlapped with the lerps here (an offloaded shadow waits for each staged batch).
        """
        for number, (_, staged, views, _, _) in enumerate(self.batches):
            self._stage(number)
            for cast, weight in zip(casts, weights, strict=True):
                _fold_staged(cast.batches[number][0], staged, views, weight)


def _fold_staged(target: Tensor | list[Tensor], staged: Tensor, views: list[Tensor], weight: float | Tensor) -> None:
    """Lerp a staged batch into its shadow range (or pieces) by ``weight``; exactly 1.0 copies."""
    copy = isinstance(weight, float) and weight == 1.0
    if isinstance(target, Tensor):
        target.copy_(staged) if copy else target.lerp_(staged, weight)
    elif copy:
        torch._foreach_copy_(target, views)
    else:
        foreach_lerp(target, views, weight)


def round_stochastically_(target: Tensor, wide: Tensor, bits: Tensor) -> None:
    """Write float32 ``wide`` into bfloat16 ``target``, rounding up with probability (distance to the value below) /
    (bf16 spacing): unbiased. ``bits`` holds uniform integers in [0, 2**16), one per value; ``wide`` is overwritten.

    The 16 low bits of a float32 pattern are exactly what bfloat16 drops, so adding uniform bits there and
    truncating rounds stochastically, in the magnitude (the sign bit is apart), for normal and subnormal values;
    infinities stay infinite and NaNs stay NaN unless their payload lies only in the low bits.
    """
    pattern = wide.view(torch.int32)
    pattern.add_(bits).bitwise_and_(-(1 << 16))
    target.copy_(wide)  # exact: nothing is left below bfloat16's precision


class StochasticLerp(CastLerp):
    """Lerp of bfloat16 shadows toward model tensors (any dtype), in float32, rounded back stochastically.

    Staged like :class:`CastLerp` (in float32): each batch of the shadow is widened into a float32 scratch,
    lerped there and written back with :func:`round_stochastically_`. An average that round-to-nearest would
    freeze (increments under half a bf16 spacing are lost) keeps moving, by the right amount on average.

    The random low bits of a batch are a fixed random pattern XOR one 16-bit draw from ``generator`` per batch
    and update: each value's bits are uniform and independent from one update to the next (all that
    unbiasedness needs), for one integer operation instead of a random number per value (20 to 50 times
    dearer on a CPU). Values of one batch share the draw, so their rounding errors are not independent of each
    other within an update. Scratch: the float32 staging buffer, a float32 copy of the batch's average and the
    pattern (int32), each of up to ``_CHUNK`` elements (12 MiB in all).
    """

    def __init__(self, shadows: Sequence[Tensor], models: Sequence[Tensor], generator: torch.Generator) -> None:
        wrong = next((s for s in shadows if s.dtype != torch.bfloat16), None)
        if wrong is not None:
            raise ValueError(f"stochastic rounding writes bfloat16 averages, got a {wrong.dtype} tensor")
        super().__init__(shadows, models, staging=torch.float32)
        if any(not isinstance(target, Tensor) for target, *_ in self.batches):
            raise ValueError("stochastic rounding needs the average's own flat storage, not adopted tensors")
        capacity, device = self.scratches[0].numel(), shadows[0].device
        self.generator = generator
        self.draws = torch.empty(len(self.batches), dtype=torch.int32, device=device)
        pattern = torch.randint(
            0, 1 << 16, (capacity,), dtype=torch.int32, generator=torch.Generator().manual_seed(_PATTERN_SEED)
        ).to(device)
        wide = torch.empty(capacity, device=device)
        sizes = [staged.numel() for _, staged, *_ in self.batches]
        self.pieces = [(wide[:n], pattern[:n], self.draws[i]) for i, n in enumerate(sizes)]

    def run(self, weight: float | Tensor, keep: Tensor | None = None) -> None:
        """Lerp every batch by ``weight`` and round stochastically; ``keep`` as in :meth:`CastLerp.run`."""
        self.draws.random_(0, 1 << 16, generator=self.generator)
        super().run(weight, keep)

    def _fold(self, number: int, weight: float | Tensor, keep: Tensor | None) -> None:
        target, staged, _, _, _ = self.batches[number]
        if self.events:
            self.events[number % 2].synchronize()
        wide, pattern, draw = self.pieces[number]
        wide.copy_(target)  # type: ignore[arg-type]  # a flat range (checked in __init__)
        if keep is not None:  # a lerp toward the shadow's own value is exact, and exact values round to themselves
            torch.where(keep, staged, wide, out=staged)
        wide.lerp_(staged, weight)
        bits = torch.bitwise_xor(pattern, draw, out=staged.view(torch.int32))  # the staged values are used up
        round_stochastically_(target, wide, bits)  # type: ignore[arg-type]


def copy_all(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``torch._foreach_copy_`` that accepts empty lists (a shadow may hold no tensor at all)."""
    if targets:
        torch._foreach_copy_(targets, sources)
