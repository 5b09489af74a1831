"""Training with ``torch.distributed``: DDP buffers, BatchNorm statistics, sharded (FSDP2 / DTensor) averages.

Under DDP every rank holds the same parameters, so every rank's average of them is the same; nothing is
needed. Buffers (BatchNorm running statistics) are different on every rank after each step, so an average
of them is per rank unless :func:`sync_buffers` is called before each update.

Under FSDP2 (``fully_shard``) or with DTensor parameters, the average of a sharded parameter is kept as a
DTensor with the same mesh and placements, over a local shard in the shadow's flat buffer: the update reads
and writes local shards only (no collective), each rank stores its share, and ``state_dict()`` returns
DTensors that ``torch.distributed.checkpoint`` saves sharded and reshards on load. :func:`full_state_dict`
gathers the full average for export.

Under DeepSpeed ZeRO-3 the average of a parameter is this rank's partition of it (see :mod:`polyak.storage.zero3`), a
plain tensor: the update needs no collective, ``state_dict()`` is per rank, and ``full_state_dict(state,
model=model)`` gathers it. Where a tensor's data lives is decided by its adapter in :mod:`polyak.storage`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .module_tensors import walk
from .storage import engine_of
from .storage.dtensor import is_dtensor
from .storage.zero3 import is_partitioned, partition

__all__ = ["all_reduce_batchnorm_stats", "full_model_state_dict", "full_state_dict", "sync_buffers"]


# ---------------------------------------------------------------------- public helpers


def _world(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized; call torch.distributed.init_process_group() first "
            "(on a single process there is nothing to synchronise)"
        )
    return dist.get_world_size(group)


def _unflatten_into(tensors: list[Tensor], flat: Tensor) -> None:
    """Copy the consecutive pieces of ``flat`` back into ``tensors``."""
    pieces = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [piece.view_as(t) for piece, t in zip(pieces, tensors, strict=True)])


@torch.no_grad()
def sync_buffers(
    module: nn.Module, op: Literal["mean", "broadcast"] = "mean", *, src: int = 0, group: Any = None
) -> None:
    """Make ``module``'s buffers identical on every rank, in place: call it before ``averager.update(model)``.

    Under DDP the parameters agree across ranks but BatchNorm running statistics do not (each rank updates
    them from its own batch; DDP copies rank 0's only at the start of the next forward), so an average of
    buffers drifts apart per rank. Calling this before every update keeps the averages identical, at the
    cost of one collective per dtype per call. Alternatives: leave buffer averages per rank (the default),
    save rank 0's, or recompute BatchNorm statistics after training.

    Args:
        module: the model (a DDP wrapper is fine). DTensor buffers are left alone (already consistent).
        op: ``"mean"`` averages floating buffers over ranks (integer buffers, e.g. ``num_batches_tracked``,
            are the same on every rank and left alone); ``"broadcast"`` copies every buffer from rank ``src``.
        src: the global rank that broadcasts (``op="broadcast"`` only).
        group: the process group (default: the whole world).
    """
    if op not in ("mean", "broadcast"):
        raise ValueError(f"op must be 'mean' or 'broadcast', got {op!r}")
    world = _world(group)
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for buffer in module.buffers():
        if is_dtensor(buffer) or (op == "mean" and not buffer.is_floating_point()):
            continue
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for tensors in groups.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if op == "mean":
            dist.all_reduce(flat, group=group)
            flat /= world
        else:
            dist.broadcast(flat, src, group=group)
        _unflatten_into(tensors, flat)


@torch.no_grad()
def all_reduce_batchnorm_stats(
    module: nn.Module,
    count: float = 1.0,
    *,
    between_ranks: bool = True,
    unbiased: bool = False,
    group: Any = None,
) -> None:
    """Pool the BatchNorm running statistics of all ranks, in place, so every rank ends with the same ones.

    Each rank's ``running_mean`` m_r and ``running_var`` v_r stand for ``count`` (n_r) samples or batches;
    N = sum(n_r). The pooled mean is sum(n_r * m_r) / N. The pooled variance is, with ``between_ranks=True``
    (default), the variance of all samples together: the mean of the variances plus the variance of the
    means across ranks,

        var = (sum(n_r * v_r) + sum(n_r * (m_r - mean)**2)) / N                    (unbiased=False)
        var = (sum((n_r - 1) * v_r) + sum(n_r * (m_r - mean)**2)) / (N - 1)        (unbiased=True)

    exact when each v_r is the population (or, ``unbiased=True``, sample) variance of the rank's n_r samples.
    With ``between_ranks=False`` it is the weighted mean of the variances, sum(n_r * v_r) / N: what
    ``update_bn`` (an average of per-batch statistics, as torch's) computes in one process over the batches
    of all ranks, with ``count`` the rank's number of batches (or samples, for ``weighting="sample"``).
    ``num_batches_tracked`` becomes the sum over ranks. Works on any norm layer with running statistics
    (BatchNorm, InstanceNorm with ``track_running_stats``); two collectives in all.

    Args:
        module: the model (a DDP wrapper is fine).
        count: this rank's weight n_r (> 0; > 1 with ``unbiased``). The default weighs ranks equally.
        between_ranks: add the spread of the rank means to the variance (see above).
        unbiased: ``running_var`` holds sample variances, divided by n_r - 1 (``between_ranks=True`` only).
        group: the process group (default: the whole world).
    """
    if unbiased and not between_ranks:
        raise ValueError("unbiased=True applies to between_ranks=True only (a mean of variances needs no correction)")
    if not (isinstance(count, (int, float)) and count > (1 if unbiased else 0)):
        raise ValueError(
            f"count must be this rank's number of samples (or batches), > {1 if unbiased else 0}"
            f"{' with unbiased=True' if unbiased else ''}; got {count!r}"
        )
    _world(group)
    norms: list[tuple[Tensor, Tensor, Tensor | None]] = [
        (m.running_mean, m.running_var, m.num_batches_tracked)
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        and isinstance(m.running_mean, Tensor)
        and isinstance(m.running_var, Tensor)
    ]
    if not norms:
        return
    f64 = torch.float64
    device = norms[0][0].device
    sizes = [mean.numel() for mean, _, _ in norms]
    # First collective: N, sum(n_r * m_r) and the batch counters.
    first = torch.cat(
        [torch.tensor([float(count)], dtype=f64, device=device)]
        + [count * mean.to(f64) for mean, _, _ in norms]
        + [(nb if nb is not None else torch.zeros(())).to(device, f64).reshape(1) for _, _, nb in norms]
    )
    dist.all_reduce(first, group=group)
    total = first[0]
    means = (first[1 : 1 + sum(sizes)] / total).split(sizes)
    # Second collective: the within-rank and between-rank sums of squares.
    within = count - 1 if unbiased else count
    spread = count if between_ranks else 0.0
    second = torch.cat(
        [
            within * var.to(f64) + spread * (mean.to(f64) - pooled) ** 2
            for (mean, var, _), pooled in zip(norms, means, strict=True)
        ]
    )
    dist.all_reduce(second, group=group)
    variances = (second / (total - 1 if unbiased else total)).split(sizes)
    for (mean, var, nb), pooled_mean, pooled_var, batches in zip(
        norms, means, variances, first[1 + sum(sizes) :], strict=True
    ):
        mean.copy_(pooled_mean)
        var.copy_(pooled_var)
        if nb is not None:
            nb.copy_(batches.round())


def full_state_dict(
    state: Mapping[str, Any], *, model: nn.Module | None = None, rank0_only: bool = True, cpu_offload: bool = True
) -> dict[str, Any]:
    """``state`` (e.g. ``averager.state_dict()``) with every sharded tensor gathered into a full tensor, for export.

    DTensors (FSDP2) are gathered by themselves. Under DeepSpeed ZeRO-3 the stored tensors are plain partitions,
    so pass the ``model`` (the engine, or ``engine.module``): an entry named like one of its partitioned
    parameters is gathered into that parameter's full shape. A collective: every rank must call it, with states
    of the same structure. Nested dicts are followed; other values are kept (plain tensors as they are on rank 0,
    e.g. replicated buffers). Tensors are gathered one at a time, so the peak extra memory is one full tensor
    per rank.

    Args:
        state: a state dict, possibly nested.
        model: the ZeRO-3 model the average follows (needed only under ZeRO-3).
        rank0_only: return the result on rank 0 only and ``{}`` on the other ranks (default).
        cpu_offload: move the result's tensors to the CPU (default).

    Example: ``weights = full_state_dict(ema.state_dict()["shadow"], model=model)`` holds, on rank 0, the
    averaged weights by name, ready for ``unsharded_model.load_state_dict(weights, strict=False)``,
    ``save_pretrained(..., state_dict=weights)`` or ``torch.save``.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict (a state dict), got {type(state).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the average follows, got {type(model).__name__}")
    keep = not rank0_only or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    partitioned = _partitioned_by_name(model) if model is not None else {}
    done: dict[int, Any] = {}  # tied names hold one tensor: gathered once

    def gather(name: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: gather(str(key), item) for key, item in value.items()}
        if not isinstance(value, Tensor):
            return value
        if id(value) not in done:
            done[id(value)] = gather_tensor(name, value)
        return done[id(value)]

    def gather_tensor(name: str, value: Tensor) -> Tensor | None:
        param = partitioned.get(name)
        if param is not None and value.shape != partition(param).shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.shape)}, but this rank's partition of the model's "
                f"ZeRO-3 parameter holds {tuple(partition(param).shape)}; pass the state of this rank, made with "
                "the same world size"
            )
        full = engine_of(param if param is not None else value).gather(value, param)
        if not keep:
            return None  # gathered for rank 0's sake; dropped at once
        return full.cpu() if cpu_offload else full

    result = gather("", state)
    return result if keep else {}


def full_model_state_dict(model: nn.Module, *, rank0_only: bool = True, cpu_offload: bool = True) -> dict[str, Any]:
    """``model``'s own state (parameters and persistent buffers) with every ZeRO-3 partition and DTensor gathered
    into a full tensor, one at a time: e.g. inside ``averager.swapped(model)``, the averaged model for export.

    A collective, like :func:`full_state_dict`; tied tensors appear under each name (the same tensor).
    """
    aliases: dict[str, str] = {}
    found, _ = walk(model, aliases)
    state = {
        f.name: partition(f.tensor) if is_partitioned(f.tensor) else f.tensor.detach() for f in found if f.persistent
    }
    state |= {alias: state[name] for alias, name in aliases.items() if name in state}
    return full_state_dict(state, model=model, rank0_only=rank0_only, cpu_offload=cpu_offload)


def _partitioned_by_name(model: nn.Module) -> dict[str, Tensor]:
    """The model's partitioned ZeRO-3 parameters by qualified name (tied ones under each name)."""
    aliases: dict[str, str] = {}
    found, _ = walk(model, aliases)
    by_name = {f.name: f.tensor for f in found if is_partitioned(f.tensor)}
    return by_name | {alias: by_name[name] for alias, name in aliases.items() if name in by_name}
