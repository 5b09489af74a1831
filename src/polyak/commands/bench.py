"""``polyak bench``: the cost of one averaging update, against the memory-bandwidth floor and other libraries.

An EMA update reads the model once and reads and writes the average once. The floor is one ``lerp_`` over a
single contiguous float32 buffer with as many elements as the model averages: no update can move less memory.
Every implementation is timed between two runs of the floor, in an order that rotates from round to round,
and reported as the median over rounds of its time over the floors' geometric mean, with the quartiles, so
load that changes over seconds cancels out. Operations, host syncs and allocations are counted at the ATen
dispatcher; memory is what the implementation keeps alive, found by scanning the live tensors.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib.util
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..ema import EMA
from ..flat import flatten_parameters
from .bench_models import RL_SHAPES, SHAPES

__all__ = ["Census", "Contender", "configure", "contenders", "measure", "run"]

DECAY = 0.999
_SAMPLE_S = 0.05  # shortest timed sample, in seconds
Step = Callable[[], None]


@dataclass
class Contender:
    """One implementation: ``build(model)`` returns the call made after each optimizer step."""

    name: str
    build: Callable[[nn.Module], Step]
    prepare: Callable[[nn.Module], nn.Module] = lambda model: model  # the model it runs on (not counted)
    calls: int = 1  # calls per round; the time reported is per call (per optimizer step)
    note: str = ""
    average_bytes: int = 4  # bytes per averaged element (2 for a bfloat16 average), for the GB/s column
    shapes: tuple[str, ...] = ()  # the shapes it runs on (default: every shape)


@dataclass
class Result:
    """Measurements of one contender on one model shape."""

    name: str
    ms: float  # median time per call (per optimizer step), in milliseconds
    ratio: float  # median over rounds of time / floor time
    ratio_quartiles: tuple[float, float]  # the spread of that ratio over rounds
    rounds: int  # timed rounds
    gb_per_s: float  # the update's minimum traffic divided by its time
    ops: float  # ATen operations per call
    syncs: float  # host synchronisations (_local_scalar_dense) per call
    alloc_mb: float  # new tensor memory per call, in MB (10^6 bytes)
    extra_memory: float  # memory kept alive by the implementation, as a multiple of the model's parameter bytes
    note: str = ""


@dataclass
class ShapeReport:
    shape: str
    device: str
    tensors: int
    elements: int
    scaled: bool = False  # a --quick stand-in for the shape: the goals, set for the full shape, are not judged
    results: list[Result] = field(default_factory=list)

    @property
    def title(self) -> str:
        """The shape as run."""
        _, _, full, quick = SHAPES[self.shape]
        return quick if self.scaled else full


# ---------------------------------------------------------------------- contenders


def _flat_pair(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Two contiguous float32 buffers with as many elements as the model averages."""
    numel = _averaged_elements(model)
    device = next(model.parameters()).device
    return torch.zeros(numel, device=device), torch.ones(numel, device=device)


def _floor(model: nn.Module) -> Step:
    average, target = _flat_pair(model)

    def step() -> None:
        average.lerp_(target, 1 - DECAY)

    return step


def _floor_bf16(model: nn.Module) -> Step:
    """The floor of a bfloat16 model with a bfloat16 average: one ``lerp_`` over flat bf16 buffers."""
    average, target = (t.to(torch.bfloat16) for t in _flat_pair(model))

    def step() -> None:
        average.lerp_(target, 1 - DECAY)

    return step


def _cast(dtype: torch.dtype, flat: bool = False) -> Callable[[nn.Module], nn.Module]:
    """A copy of the model in ``dtype`` (laid out by ``flatten_parameters`` when ``flat``)."""

    def prepare(model: nn.Module) -> nn.Module:
        duplicate = copy.deepcopy(model).to(dtype)
        if flat:
            flatten_parameters(duplicate)
        return duplicate

    return prepare


def _copy(model: nn.Module) -> Step:
    destination, source = _flat_pair(model)

    def step() -> None:
        destination.copy_(source)

    return step


def _tensors(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The model's distinct state tensors, detached: the floating ones (averaged) and the others (copied)."""
    unique = {id(t): t.detach() for t in model.state_dict(keep_vars=True).values()}.values()
    return [t for t in unique if t.is_floating_point()], [t for t in unique if not t.is_floating_point()]


def _bare_foreach(model: nn.Module) -> Step:
    """What polyak's default update does at the least: one ``_foreach_lerp_`` over the averaged tensors (and one
    ``_foreach_copy_`` of the integer buffers), with no Python around it."""
    floats, others = _tensors(model)
    averages, copies = [t.clone() for t in floats], [t.clone() for t in others]

    def step() -> None:
        torch._foreach_lerp_(averages, floats, 1 - DECAY)
        if copies:
            torch._foreach_copy_(copies, others)

    return step


def _target_pairs(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(online, target) parameter pairs with a deep-copied target network, as RL libraries keep one."""
    target = copy.deepcopy(model)
    return list(zip(model.parameters(), target.parameters(), strict=True))


def _sb3_polyak_update(model: nn.Module) -> Step:
    """stable-baselines3's ``polyak_update`` (re-implemented from its documented loop): per tensor,
    ``target.mul_(1 - tau)`` then ``torch.add(target, online, alpha=tau, out=target)`` on ``.data``."""
    pairs, tau = _target_pairs(model), 1 - DECAY

    def step() -> None:
        with torch.no_grad():
            for online, target in pairs:
                target.data.mul_(1 - tau)
                torch.add(target.data, online.data, alpha=tau, out=target.data)

    return step


def _torchrl_soft_update(model: nn.Module) -> Step:
    """TorchRL's ``SoftUpdate`` (re-implemented from its documented rule target = eps * target + (1 - eps) *
    online): one ``lerp_`` per tensor; its TensorDict traversal is not included."""
    pairs, eps = _target_pairs(model), DECAY

    def step() -> None:
        for online, target in pairs:
            target.data.lerp_(online.data, 1 - eps)

    return step


def _lightly_update_momentum(model: nn.Module) -> Step:
    """lightly's ``update_momentum`` (re-implemented from its documented rule): per parameter,
    ``ema.data = ema.data * m + param.data * (1 - m)`` under ``no_grad`` (two temporaries per tensor)."""
    pairs, m = _target_pairs(model), DECAY

    def step() -> None:
        with torch.no_grad():
            for online, target in pairs:
                target.data = target.data * m + online.data * (1.0 - m)

    return step


def _polyak(**options: Any) -> Callable[[nn.Module], Step]:
    return lambda model: EMA(model, decay=DECAY, **options).update


def _flat_copy(model: nn.Module) -> nn.Module:
    duplicate = copy.deepcopy(model)
    flatten_parameters(duplicate)
    return duplicate


def _averaged_model(multi: bool) -> Callable[[nn.Module], Step]:
    def build(model: nn.Module) -> Step:
        from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

        if multi:
            average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
        else:
            average = AveragedModel(model, avg_fn=get_ema_avg_fn(DECAY), use_buffers=True)
        return lambda: average.update_parameters(model)

    return build


@functools.cache
def _timm_model_ema_v3() -> type | None:
    """timm's ``ModelEmaV3``, loaded from its own file: ``import timm`` needs torchvision, the file only torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    file_spec = importlib.util.spec_from_file_location("_polyak_bench_timm_model_ema", path)
    if file_spec is None or file_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except (ImportError, OSError):  # another timm version may import more than torch there
        return None
    return getattr(module, "ModelEmaV3", None)


def _timm(model: nn.Module) -> Step:
    average = _timm_model_ema_v3()(model, decay=DECAY)  # type: ignore[misc]
    return lambda: average.update(model)


def _ema_pytorch(model: nn.Module) -> Step:
    from ema_pytorch import EMA as LucidrainsEMA

    average = LucidrainsEMA(model, beta=DECAY, update_after_step=0, update_every=1)
    return average.update


def _torch_ema(model: nn.Module) -> Step:
    from torch_ema import ExponentialMovingAverage

    average = ExponentialMovingAverage(model.parameters(), decay=DECAY)
    return average.update


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def contenders() -> tuple[list[Contender], list[str]]:
    """The implementations to time (floor first) and the names of those skipped because not installed."""
    every = 4
    chosen = [
        Contender("floor: one lerp_ over a flat buffer", _floor),
        Contender("copy_ of the same buffer (bandwidth reference)", _copy),
        Contender("bare _foreach_lerp_ over the same tensors", _bare_foreach),
        Contender("polyak EMA", _polyak()),
        Contender("polyak EMA, flatten_parameters", _polyak(), prepare=_flat_copy),
        Contender("polyak EMA, bf16 model, fp32 average", _polyak(), _cast(torch.bfloat16), note="vs the fp32 floor"),
        Contender("polyak EMA, fp16 model, fp32 average", _polyak(), _cast(torch.float16), note="vs the fp32 floor"),
        Contender(
            "polyak EMA, bf16 model (flatten_parameters), fp32 average",
            _polyak(),
            _cast(torch.bfloat16, flat=True),
            note="vs the fp32 floor",
        ),
        Contender("floor, bf16: one lerp_ over a flat bf16 buffer", _floor_bf16, average_bytes=2),
        Contender(
            "polyak EMA, bf16 model, bf16 average",
            _polyak(dtype=torch.bfloat16),
            _cast(torch.bfloat16),
            note="rounds to nearest: stalls",
            average_bytes=2,
        ),
        Contender(
            "polyak EMA, bf16 model, bf16 average, stochastic rounding",
            _polyak(dtype=torch.bfloat16, rounding="stochastic"),
            _cast(torch.bfloat16),
            average_bytes=2,
        ),
        Contender(f"polyak EMA, update_every={every} (per step)", _polyak(update_every=every), calls=every),
        Contender("torch AveragedModel, per-tensor avg_fn", _averaged_model(multi=False)),
        Contender("stable-baselines3 polyak_update", _sb3_polyak_update, note="re-implemented", shapes=RL_SHAPES),
        Contender("TorchRL SoftUpdate", _torchrl_soft_update, note="re-implemented", shapes=RL_SHAPES),
        Contender("lightly update_momentum", _lightly_update_momentum, note="re-implemented", shapes=RL_SHAPES),
        Contender("torch AveragedModel, get_ema_multi_avg_fn", _averaged_model(multi=True)),
    ]
    optional = [
        ("timm ModelEmaV3", "timm", _timm, ""),
        ("ema-pytorch EMA", "ema_pytorch", _ema_pytorch, ""),
        ("torch_ema", "torch_ema", _torch_ema, "parameters only"),
    ]
    skipped = []
    for name, module, build, note in optional:
        if _installed(module) and (module != "timm" or _timm_model_ema_v3() is not None):
            chosen.append(Contender(name, build, note=note))
        else:
            skipped.append(name)
    return chosen, skipped


# ---------------------------------------------------------------------- measuring


def _averaged_elements(model: nn.Module) -> int:
    """Elements of the floating tensors polyak averages by default (parameters and persistent buffers)."""
    state = model.state_dict(keep_vars=True)
    unique = {id(t): t for t in state.values() if t.is_floating_point()}
    return sum(t.numel() for t in unique.values())


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _live_storages() -> dict[int, int]:
    """Data pointer -> bytes of every storage that a live Python tensor refers to."""
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), Tensor) and obj.device.type != "meta":  # type() avoids lazy proxies
            try:
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a fake tensor left by torch.compile's tracing: it holds no memory
                continue
    return found


class Census(TorchDispatchMode):
    """Counts ATen operations, host syncs and newly allocated tensor bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.allocated = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if "_local_scalar_dense" in str(func):
            self.syncs += 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                inputs.add(t.untyped_storage().data_ptr())
                self.allocated += t.untyped_storage().nbytes()
        return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: nn.Module, chosen: Sequence[Contender], repeats: int, budget_s: float) -> list[Result]:
    """Time ``chosen`` on ``model`` (the first is the floor), interleaved; ``repeats`` <= 0 fits ``budget_s``."""
    device = next(model.parameters()).device
    numel = _averaged_elements(model)
    steps: list[Step] = []
    counts: list[tuple[float, float, float, float]] = []
    traffic: list[int] = []
    subjects = [contender.prepare(model) for contender in chosen]
    gc.collect()
    live = _live_storages()
    for contender, subject in zip(chosen, subjects, strict=True):
        dtype_bytes = next(subject.parameters()).element_size()
        traffic.append(numel * (8 if contender.build is _copy else dtype_bytes + 2 * contender.average_bytes))
        step = contender.build(subject)
        for _ in range(2 * contender.calls):  # warm up: first calls copy the model, plans are built
            step()
        gc.collect()
        before, live = live, _live_storages()
        kept = sum(size for ptr, size in live.items() if ptr not in before)
        with Census() as census:
            for _ in range(contender.calls):
                step()
        n = contender.calls
        extra = kept / _parameter_bytes(subject)
        counts.append((census.ops / n, census.syncs / n, census.allocated / n / 1e6, extra))
        steps.append(step)
    _synchronize(device)

    calls = [contender.calls for contender in chosen]

    def timed(i: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls[i]):
            steps[i]()
        _synchronize(device)
        return (time.perf_counter() - start) / calls[i]

    # A sample lasts at least _SAMPLE_S, so that a time slice lent to another process is a small part of it.
    for i, contender in enumerate(chosen):
        calls[i] = contender.calls * max(1, math.ceil(_SAMPLE_S / max(timed(i) * contender.calls, 1e-9)))

    # Each contender is timed between two floor runs and compared with their geometric mean, so load that
    # changes over seconds cancels out; the order rotates from round to round.
    times: list[list[float]] = [[] for _ in chosen]
    ratios: list[list[float]] = [[1.0]] + [[] for _ in chosen[1:]]
    start = time.perf_counter()
    r = 0
    while r < max(repeats, 1):
        floor_before = timed(0)
        times[0].append(floor_before)
        for k in range(1, len(chosen)):
            i = 1 + (k - 1 + r) % (len(chosen) - 1)
            elapsed, floor_after = timed(i), timed(0)
            times[i].append(elapsed)
            times[0].append(floor_after)
            ratios[i].append(elapsed / math.sqrt(floor_before * floor_after))
            floor_before = floor_after
        if r == 0 and repeats <= 0:  # the first round tells how many fit the budget
            repeats = int(min(50, max(5, budget_s / (time.perf_counter() - start))))
        r += 1
    results = []
    for contender, series, ratio, (ops, syncs, alloc, extra), nbytes in zip(
        chosen, times, ratios, counts, traffic, strict=True
    ):
        median = statistics.median(series)
        results.append(
            Result(
                contender.name,
                median * 1e3,
                statistics.median(ratio),
                _quartiles(ratio),
                r,
                nbytes / median / 1e9,
                ops,
                syncs,
                alloc,
                extra,
                contender.note,
            )
        )
    return results


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4)
    return low, high


# ---------------------------------------------------------------------- goals and output

# (shapes ("*": every shape), contender, what it is compared with, the goal as a ratio to that)
_FLOOR = "floor: one lerp_ over a flat buffer"
_BARE = "bare _foreach_lerp_ over the same tensors"
_BF16_FLOOR = "floor, bf16: one lerp_ over a flat bf16 buffer"
_ROUNDED = "polyak EMA, bf16 model, bf16 average, stochastic rounding"
GOALS = [
    ("*", "polyak EMA", _BARE, 1.10),
    ("*", "polyak EMA, flatten_parameters", _FLOOR, 1.10),
    (("resnet50", "gpt2"), "polyak EMA, bf16 model, fp32 average", _FLOOR, 1.15),
    (("many",), "polyak EMA, bf16 model, fp32 average", _FLOOR, 1.5),
    (("resnet50", "gpt2"), "polyak EMA, fp16 model, fp32 average", _FLOOR, 1.15),
    (("many",), "polyak EMA, fp16 model, fp32 average", _FLOOR, 1.5),
    ("*", _ROUNDED, _BF16_FLOOR, 1.2),
]
# Why a goal can be out of reach on a CPU, said beside "NOT met".
_CPU_CAST = (
    " (CPU has no lerp that reads a 16-bit model into a float32 average: the conversion into the staging buffer"
    " is a pass of its own; on many small tensors it is one copy per tensor)"
)
_CPU_LIMITS = {
    "polyak EMA, bf16 model, fp32 average": _CPU_CAST,
    "polyak EMA, fp16 model, fp32 average": _CPU_CAST,
    _ROUNDED: " (on a CPU the widen, lerp, add-bits, truncate and narrow are passes of their own)",
}


def _goal_lines(reports: Sequence[ShapeReport]) -> list[str]:
    lines = []
    for report in reports:
        by_name = {r.name: r for r in report.results}
        if report.scaled:
            lines.append(f"- {report.shape}: not judged, the goals are for the full shape (run without --quick)")
        for shapes, name, reference, goal in GOALS if not report.scaled else ():
            if (shapes == "*" or report.shape in shapes) and name in by_name and reference in by_name:
                ratio = by_name[name].ratio / by_name[reference].ratio
                verdict = "met" if ratio <= goal else "NOT met"
                if ratio > goal and report.device == "cpu":
                    verdict += _CPU_LIMITS.get(name, "")
                against = "the floor" if reference == _FLOOR else reference
                lines.append(f"- {report.shape}, {name}: {ratio:.2f}x {against} (goal <= {goal}x): {verdict}")
        polyak = by_name["polyak EMA"]
        every = next(r for r in report.results if "update_every" in r.name)
        if not report.scaled:
            lines.append(
                f"- {report.shape}, update_every=4: {every.ratio / polyak.ratio:.2f} of an every-step update per step "
                "(goal 0.25)"
            )
        for r in report.results:
            if r.name.startswith("polyak") and (r.syncs or r.alloc_mb):
                lines.append(f"- {report.shape}, {r.name}: {r.syncs} syncs and {r.alloc_mb} MB allocated per update")
    return lines


def _markdown(reports: Sequence[ShapeReport], header: str, skipped: Sequence[str]) -> str:
    out = [header, ""]
    for report in reports:
        out += [
            f"### {report.title}: {report.tensors} tensors, {report.elements / 1e6:.2f}M averaged elements,"
            f" {report.results[0].rounds} rounds",
            "",
            "| implementation | ms/step | x floor (quartiles) | GB/s | aten ops | syncs | alloc MB | extra memory"
            " (x params) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report.results:
            name = f"{r.name} ({r.note})" if r.note else r.name
            out.append(
                f"| {name} | {r.ms:.2f} | {r.ratio:.2f} ({r.ratio_quartiles[0]:.2f}-{r.ratio_quartiles[1]:.2f}) |"
                f" {r.gb_per_s:.1f} | {r.ops:g} | {r.syncs:g} | "
                f"{r.alloc_mb:.1f} | {r.extra_memory:.2f} |"
            )
        out.append("")
    if skipped:
        out += [f"Not installed, skipped: {', '.join(skipped)}.", ""]
    out += ["Goals (ratios of medians over rounds, measured in the same run):", *_goal_lines(reports)]
    return "\n".join(out)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyak bench``."""
    parser.add_argument("--quick", action="store_true", help="small model shapes and few repeats (seconds)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="model shapes")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per shape (default: fit the budget)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed rounds per shape (default 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="where the models live, e.g. cuda (default cpu)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")


def run(args: argparse.Namespace) -> int:
    """Benchmark every shape; print the table (or JSON)."""
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chosen, skipped = contenders()
    reports = []
    for shape in args.shapes:
        full, quick, _, _ = SHAPES[shape]
        scaled = args.quick and quick is not None
        torch.manual_seed(0)
        model = (quick() if scaled else full()).to(device)  # type: ignore[misc]  # quick is set when scaled
        repeats = args.repeats or (5 if args.quick else 0)
        tensors = len({id(t) for t in model.state_dict(keep_vars=True).values()})
        report = ShapeReport(shape, device.type, tensors, _averaged_elements(model), scaled)
        here = [c for c in chosen if not c.shapes or shape in c.shapes]
        report.results = measure(model, here, repeats, args.budget)
        reports.append(report)
        del model
        gc.collect()
    machine = f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    header = f"polyak bench on {device.type} ({machine}), torch {torch.__version__}, decay {DECAY}"
    if args.quick:
        header += " (--quick: small stand-ins for the large shapes, where per-call overhead dominates, and few rounds)"
    if args.json:
        data = {
            "machine": header,
            "skipped": skipped,
            "shapes": [
                {
                    "shape": r.shape,
                    "tensors": r.tensors,
                    "elements": r.elements,
                    "results": [vars(x) for x in r.results],
                }
                for r in reports
            ],
            "goals": _goal_lines(reports),
        }
        print(json.dumps(data, indent=1))
    else:
        print(_markdown(reports, header, skipped))
    return 0
