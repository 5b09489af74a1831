"""Every front end x every option, pairwise, against a float64 reference written here (issue 22).

Front ends (public API only, ``combo_fronts.py``): ``EMA``, ``SWA``, ``MultiEMA``, ``BEMA``, ``PostHocEMA``, live
targets ``EMA(target="copy")`` and ``EMA(target=module)``, ``EMA(switch_every=...)``, hard copies
``EMA(tau=1.0, target="copy", update_every=N)``, and ``polyak.swa_utils``' ``AveragedModel`` and
``ExponentialMovingAverage`` (torch's signatures: their own, smaller axes).

Axes (``COMMON``): storage ``dtype`` (default / float32 / bfloat16 / float16), ``rounding``, ``nonfinite``,
``buffers``, ``frozen``, ``lazy``, offload (``device="cpu"``: on a CPU machine only acceptance and equal results),
``layout`` (plain or ``polyak.flatten_parameters``; FSDP2 in ``distributed/test_combinations_fsdp.py``), the
model's dtype, ``update_every``, ``start_step``, and a bad value put into the model (``poison``: NaN at the first
read after construction, i.e. the first update or a target's start; inf at the fifth update; 1e20 there, finite
though its square is not in float32). The model (``combo_engine.ComboNet``) has a Linear, a BatchNorm (float
buffers, an int64 counter), a frozen parameter, a non-persistent buffer and a ``signal`` that moves by less than a
bf16 spacing per step, so that a low-precision average rounded to nearest visibly stalls.

Each case runs 24 steps, loads ``state_dict()`` into a fresh averager halfway (which must continue bit for bit),
and compares every public readback (``swapped``, ``averaged_model``, ``copy_to``, ``.target``, ``multi[name]``,
``.module``) with the reference: averaged tensors within bounds derived in ``combo_engine.Average``, copied and
skipped ones exactly, stochastic rounding also by the unbiasedness of row means.

Pairwise rule: for each front end, the cases hold every pair of values of any two axes at least once (a greedy,
seeded generator: ``combo_engine.pairwise``), plus a few triples (``SEEDS``), except pairs refused by design
(``REFUSED``: each is a case of its own that must be refused at construction, in one line, lazy or not). Values
a front end does not take yet (``PENDING``) are left out of its first cases, so that these stay green today, and
covered by later ones. Where main disagrees with the reference or the refusal rule, ``FAULTS`` marks the exact
cases as strict expected failures, one reason per fault: delete its line when the redesign fixes it.

To add an option or a front end: give its values to ``COMMON`` (or its own ``AXES`` entry), say what it promises
in ``combo_fronts`` (the selection ``modes``, the ``storage`` dtype, the update ``weights``, its readbacks) and
add any refusal to ``REFUSED``. Every new option and front end joins this tester. ``-m fuzz`` adds 200 random
cases (all axes at random) beyond the pairwise ones.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from combo_engine import Average, Schedule, iterate, matches, pairs_of, pairwise, rounded, spacing
from combo_fronts import FRONTS, model_for
from combo_run import drive, judge

# swa_utils keeps torch's default (the model's dtype) and warns that a bf16 average stalls: what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore:averaging parameters in torch.bfloat16:UserWarning")

COMMON: dict[str, tuple[Any, ...]] = {
    "dtype": ("default", "float32", "bfloat16", "float16"),
    "rounding": ("nearest", "stochastic"),
    "nonfinite": ("propagate", "skip", "raise"),
    "buffers": ("average", "copy", "skip"),
    "frozen": ("average", "copy", "skip"),
    "lazy": (False, True),
    "device": ("same", "cpu"),
    "layout": ("plain", "flat"),
    "model_dtype": ("float32", "bfloat16"),
    "every": (1, 3),
    "start": (0, 3),
    "poison": ("none", "first", "mid", "huge"),
}
TORCH_STYLE = {k: COMMON[k] for k in ("dtype", "device", "layout", "model_dtype", "poison")}
AXES = {name: COMMON for name in FRONTS} | {
    "switch": COMMON | {"blend": (1.0, 0.5)},
    "AveragedModel": TORCH_STYLE | {"avg_fn": ("default", "ema", "swa", "custom"), "use_buffers": (False, True)},
    "ExponentialMovingAverage": TORCH_STYLE,
}
DEFAULT = {name: values[0] for axes in AXES.values() for name, values in axes.items()}

POLYAK = frozenset(name for name in FRONTS if name not in ("AveragedModel", "ExponentialMovingAverage"))
TARGETS = frozenset({"target_copy", "target_module", "hard_copy"})
BLENDS = TARGETS - {"hard_copy"}
SHADOWS = frozenset({"EMA", "SWA", "MultiEMA", "switch"})  # the EMA path with a lazy option today
LOW = ("default", "float32", "float16")

# Expected outcome of each front end x option; what is not refused is supported (and the case generated):
#
#   front end         dtype      rounding=stochastic      lazy=True   device="cpu"   the other options
#   all of polyak's   all        only with dtype=bf16     yes         yes            all values
#   target_copy       all        only with dtype=bf16     refused     yes            all values
#   target_module     all        only with dtype=bf16     refused     yes            all values
#   hard_copy         all        only with dtype=bf16     refused     yes            all values
#   swa_utils.*       all        -- torch's signatures: dtype, device, use_buffers, avg_fn / multi_avg_fn --
#
# A live target module keeps the model's dtype and device; ``dtype=`` and ``device=`` say where its average (the
# master) is kept, and it is copied into the module after every update.
#
# Refused by design, at construction: (front ends, option values that together trigger it, why).
REFUSED = [
    (POLYAK, {"rounding": ("stochastic",), "dtype": LOW}, "stochastic rounding writes bfloat16 averages"),
    (TARGETS, {"lazy": (True,)}, "a target module exists from the start: nothing to allocate late"),
]

# Values a front end does not take yet: covered by the cases after its first ones (see the module docstring).
PENDING: dict[str, dict[str, tuple[Any, ...]]] = {}

# Where the library disagrees with the reference or the refusal rule: strict expected failures, one reason per
# fault, each line deleted when fixed. The one-path redesign fixed every fault this tester found on the old main
# (MultiEMA dropping stochastic rounding, a lazy or live start left unchecked, a bf16 target stalling, options
# checked late, BEMA and PostHocEMA without nonfinite, rounding and lazy).
FAULTS: list[tuple[frozenset[str], dict[str, tuple[Any, ...]], str]] = []
# The same for the refusals: what is accepted at construction (or refused with no named error) though it must not be.
REFUSAL_FAULTS: list[tuple[frozenset[str], dict[str, tuple[Any, ...]], str]] = []


# Triples worth a case of their own wherever allowed (pairs alone need not meet them): a bad first read of a lazy
# averager or a target's start, and stochastic rounding on each path (MultiEMA's depends on nonfinite).
SEEDS = [
    *({"lazy": True, "nonfinite": n, "poison": "first"} for n in ("skip", "raise")),
    *({"start": 3, "nonfinite": n, "poison": "first", "model_dtype": "float32"} for n in ("skip", "raise")),
    *({"rounding": "stochastic", "dtype": "bfloat16", "nonfinite": n} for n in ("propagate", "skip")),
    {"model_dtype": "bfloat16", "dtype": "default", "every": 3},
]


def first_rule(rules: list, front: str, case: dict[str, Any]) -> str | None:
    """The reason of the first rule that applies to ``case`` of ``front``, or None."""
    return next((why for fronts, when, why in rules if front in fronts and matches(when, case)), None)


def _generate(front: str, seed: int = 22) -> list[dict[str, Any]]:
    """The pairwise cases of ``front``: first without its pending values, then the pairs those add."""
    pending = PENDING.get(front, {})

    def allowed(case: dict[str, Any]) -> bool:
        return first_rule(REFUSED, front, case) is None

    def current(case: dict[str, Any]) -> bool:
        return allowed(case) and not any(case.get(k) in v for k, v in pending.items())

    first = pairwise(AXES[front], current, seed, seeds=SEEDS)
    return first + pairwise(AXES[front], allowed, seed, covered=first, seeds=[s for s in SEEDS if not current(s)])


def _param(front: str, case: dict[str, Any], reason: str | None = None, faults: list | None = None) -> Any:
    label = ",".join(f"{k}={v}" for k, v in case.items() if DEFAULT.get(k) != v) or "defaults"
    fault = first_rule(FAULTS if faults is None else faults, front, case)
    marks = [pytest.mark.xfail(strict=True, reason=fault)] if fault else []
    return pytest.param(front, case, *([reason] if reason else []), id=f"{front}-{label}", marks=marks)


GENERATED = {front: [{**DEFAULT, **case} for case in _generate(front)] for front in FRONTS}
CASES = [_param(front, case) for front, cases in GENERATED.items() for case in cases]
REFUSALS = [
    _param(front, {**DEFAULT, **{k: v[0] for k, v in when.items()}, **lazy}, why, REFUSAL_FAULTS)
    for fronts, when, why in REFUSED
    for front in sorted(fronts)
    for lazy in ({}, {"lazy": True})
    if not (lazy and (front in TARGETS or front in PENDING))
]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # stochastic rounding seeds its stream from torch.initial_seed()


@pytest.mark.parametrize(("front", "case"), CASES)
def test_combination(front: str, case: dict[str, Any]) -> None:
    judge(FRONTS[front], case, drive(FRONTS[front], case), refusal=None)


@pytest.mark.parametrize(("front", "case", "reason"), REFUSALS)
def test_refused_at_construction(front: str, case: dict[str, Any], reason: str) -> None:
    judge(FRONTS[front], case, drive(FRONTS[front], case), refusal=reason)


BAD = {"dtype": torch.int64, "rounding": "up", "nonfinite": "sometimes", "buffers": "bogus", "frozen": "skp"}
BAD |= {"update_every": 0, "start_step": -1}
BAD_TORCH = {"AveragedModel": {"dtype": torch.int64, "use_buffers": "yes"}, "ExponentialMovingAverage": {"decay": 1.5}}
BAD_CASES = [
    _param(front, {**DEFAULT, "lazy": lazy, "bad": option}, faults=REFUSAL_FAULTS)
    for front in sorted(POLYAK)
    for option in BAD
    for lazy in ((False,) if front in TARGETS or front in PENDING else (False, True))
] + [_param(front, {**DEFAULT, "bad": option}) for front, bad in BAD_TORCH.items() for option in bad]


@pytest.mark.parametrize(("front", "case"), BAD_CASES)
def test_a_bad_value_is_refused_at_construction_naming_it(front: str, case: dict[str, Any]) -> None:
    option, spec = case["bad"], FRONTS[front]
    with pytest.raises((ValueError, TypeError)) as error:
        spec.build(model_for(case), {**case, "override": {option: BAD_TORCH.get(front, BAD)[option]}}, spec.extra(case))
    named = "burn_in" if (front, option) == ("BEMA", "start_step") else option  # BEMA's name for the start
    assert "\n" not in str(error.value) and named in str(error.value), str(error.value)


def test_every_allowed_pair_is_covered() -> None:
    for front, cases in GENERATED.items():
        axes = AXES[front]
        held = set().union(*(pairs_of({k: c[k] for k in axes}) for c in cases))
        wanted = {p for p in pairs_of_all(axes) if first_rule(REFUSED, front, dict(p)) is None}
        assert wanted <= held, (front, sorted(wanted - held, key=repr)[:5])


def pairs_of_all(axes: dict[str, tuple[Any, ...]]) -> set:
    names = sorted(axes)
    return {((a, x), (b, y)) for i, a in enumerate(names) for b in names[i + 1 :] for x in axes[a] for y in axes[b]}


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_the_signal_makes_a_stall_visible(storage: torch.dtype, every: int) -> None:
    """The tester can fail: an average rounded to nearest in ``storage`` lags float64 by more than a float32 master
    read through a cast (rounded to nearest: one of the two neighbours) may, and drifts in its row means by more than
    the judge allows a stochastically rounded one; so a front end that keeps a target in the model's low precision
    or drops ``rounding="stochastic"`` is caught."""
    average = Average({"signal": "average"}, {"signal": storage})
    schedule = Schedule([average], [lambda t, d: 1.0 if d == t else 1.0 - 0.9**d], every=every)
    schedule.construct(iterate(0))
    for t in range(1, 25):
        schedule.call(iterate(t))
    exact, near = average.exact["signal"], average.near["signal"]  # type: ignore[index]
    tol = average.arithmetic("signal") + spacing(torch.float32, average.scale["signal"])  # a float32 master's
    outside = (near < rounded(exact - tol, storage)) | (rounded(exact + tol, storage) < near)
    assert outside.any()  # what a float32 master read through a cast to ``storage`` may show, a stall leaves
    drift = float((near.mean(1) - exact.mean(1)).abs().max())
    if storage == torch.bfloat16:
        assert drift > average.mean_bound("signal")  # stochastic rounding


@pytest.mark.fuzz
@pytest.mark.parametrize("number", range(200))
def test_random_combination(number: int) -> None:
    rng = random.Random(number)
    front = sorted(FRONTS)[number % len(FRONTS)]
    case = {**DEFAULT, **{k: rng.choice(v) for k, v in AXES[front].items()}}
    refusal, fault = first_rule(REFUSED, front, case), first_rule(FAULTS + REFUSAL_FAULTS, front, case)
    if fault:
        pytest.skip(f"known fault: {fault}")
    judge(FRONTS[front], case, drive(FRONTS[front], case), refusal=refusal)
