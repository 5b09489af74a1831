"""Running one combination (the driver) and checking its record against the float64 reference (the judge)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from combo_engine import CALLS, Average, cloned, rounded, same, set_iterate, snapshot, spacing, tensors, wide
from combo_fronts import DTYPES, POISON, Front, model_for
from torch import Tensor, nn


def _attempt(update: Callable[[], None]) -> str:
    try:
        update()
    except RuntimeError as error:  # nonfinite="raise"; anything else fails the case where the judge sees it
        return f"raised: {error}"
    return "ok"


@torch.no_grad()
def _copy_values(target: nn.Module, source: nn.Module) -> None:
    theirs = tensors(source)
    for name, tensor in tensors(target).items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        other = theirs[name]
        local.copy_(other.to_local() if hasattr(other, "to_local") else other)


def drive(
    front: Front,
    case: dict[str, Any],
    make: Callable[[dict], nn.Module] = model_for,
    sharded: bool = False,
    calls: int = CALLS,
) -> dict:
    """Build the averager of ``case``, run ``calls`` steps, and record the iterates, outcomes and every readback.

    Halfway, ``state_dict()`` is loaded into a fresh averager of a fresh model (the twin), which then follows the
    same steps: at the end both must read back bit for bit alike.
    """
    model = make(case)
    extra = front.extra(case)
    record: dict[str, Any] = {"theta0": snapshot(model), "calls": []}
    record["initial"] = snapshot(extra) if extra is not None else record["theta0"]
    try:
        averager = front.build(model, case, extra)
    except (ValueError, TypeError) as error:
        record["refused"] = f"{type(error).__name__}: {error}"
        return record
    pairs: list[tuple[nn.Module, Any]] = [(model, averager)]
    record["twin"] = []

    def step(c: int, poison: float | None) -> str:
        for m, _ in pairs:
            set_iterate(m, c, poison)
        theta = snapshot(model)
        before = cloned(front.state_of(averager)) if poison is not None else None
        outcomes = [_attempt(lambda m=m, a=a: front.update(a, m)) for m, a in pairs]
        if outcomes[1:] and outcomes[1][:6] != outcomes[0][:6]:
            record["twin"].append(f"call {c}: {outcomes[1]} after resuming, {outcomes[0]} without")
        unchanged = before is None or same(before, front.state_of(averager))
        record["calls"].append((theta, outcomes[0], unchanged, snapshot(model) if front.switches else None))
        return outcomes[0]

    poison_at = front.poison_call(case)
    try:
        for c in range(1, calls + 1):
            if c == poison_at:
                if step(c, POISON[case["poison"]]) != "ok":
                    step(c, None)  # refused: the model is repaired and the step taken again
            else:
                step(c, None)
            if c == calls // 2:
                state = cloned(front.state_of(averager))
                twin_model = make(case)
                _copy_values(twin_model, model)
                twin = front.build(twin_model, case, front.extra(case))
                front.load(twin, state)
                pairs.append((twin_model, twin))
    except Exception as error:  # e.g. an option refused at the first update instead of at construction
        record["failed"] = f"call {len(record['calls']) + 1}: {type(error).__name__}: {error}"
        return record
    for m, _ in pairs:
        set_iterate(m, calls + 1)  # the model moves on: copies (last update) and skipped tensors (now) differ
    record["now"] = snapshot(model)
    record["readbacks"] = front.readbacks(averager, model, sharded)
    record["counters"] = front.counters(averager)
    twin_model, twin = pairs[1]
    kept = [name for name, mode in front.modes(case).items() if mode != "skip"]  # the rest is no part of the state
    resumed = front.readbacks(twin, twin_model, sharded)
    for (label, _, shows, mine), (_, _, _, theirs) in zip(record["readbacks"], resumed, strict=True):
        if shows == "initial":  # a module of the twin's own: what it leaves alone is its own
            mine, theirs = ({name: values[name] for name in kept} for values in (mine, theirs))
        if not same(mine, theirs):
            record["twin"].append(f"{label} differs after a state_dict round trip")
    if not same(snapshot(model), snapshot(twin_model)):
        record["twin"].append("the models differ after a state_dict round trip")
    return record


def _compare(got: Tensor, value: Tensor, tol: Tensor | None, stored: torch.dtype, what: str) -> None:
    """``got`` (as read, in its dtype) against the float64 ``value``: exactly, or within ``tol`` plus the
    rounding of a read into a coarser dtype; non-finite exactly where the reference is."""
    have = got.double()
    if tol is None:
        expect = rounded(value, got.dtype) if got.is_floating_point() else value
        bad = ~((have == expect) | (have.isnan() & expect.isnan()))
        assert not bad.any(), f"{what}: expected exactly {expect[bad][:4].tolist()}, got {have[bad][:4].tolist()}"
        return
    finite = torch.isfinite(value)
    assert not torch.isfinite(have[~finite]).any(), f"{what}: the reference is not finite here, the average is"
    if torch.finfo(got.dtype).eps > torch.finfo(stored).eps:  # read through a cast to nearest, which is monotone
        low, high = rounded(value - tol, got.dtype), rounded(value + tol, got.dtype)
        bad = finite & ~((low <= have) & (have <= high))
        tol = torch.maximum(high - value, value - low)
    else:
        bad = finite & ~((have - value).abs() <= tol)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values off; e.g. [{i}] got {have.flatten()[i].item():.8g}, "
            f"float64 reference {value.flatten()[i].item():.8g}, tolerance {tol.flatten()[i].item():.3g}"
        )


def _check_means(got: Tensor, value: Tensor, average: Average, what: str) -> None:
    """Stochastic rounding is unbiased: the row means of ``signal`` (whose elements take every phase of a bf16
    spacing) stay within ``Average.mean_bound`` of the float64 ones; an average rounded to nearest stalls."""
    bound = average.mean_bound("signal")
    means, reference = got.double().mean(1), value.mean(1)
    assert ((means - reference).abs() <= bound).all(), (
        f"{what}: row means {means.tolist()} against the float64 {reference.tolist()}: off by more than "
        f"{bound:.3g}, a biased rounding (the average stalls)"
    )


def judge(front: Front, case: dict[str, Any], record: dict, refusal: str | None) -> None:
    """Replay the float64 reference over ``record`` and check every outcome and readback."""
    where = f"{front.name} {case}"
    if refusal is not None:
        assert "refused" in record, f"{where}: accepted, but must be refused at construction ({refusal})"
        assert "\n" not in record["refused"], f"{where}: the refusal is not one line: {record['refused']!r}"
        return
    assert "refused" not in record, f"{where}: refused at construction: {record['refused']}"
    assert "failed" not in record, f"{where}: accepted at construction, then failed at {record['failed']}"
    schedule = front.schedule(case)
    schedule.construct(wide(record["theta0"]))
    stochastic = case.get("rounding") == "stochastic"
    for index, (theta, outcome, unchanged, after) in enumerate(record["calls"], start=1):
        t = schedule.step_time()
        expected = schedule.call(wide(theta))
        if expected == "raise":
            assert outcome.startswith("raised") and "lin.weight" in outcome, f"{where}: call {index}: {outcome}"
            assert "\n" not in outcome, f"{where}: call {index}: not one line: {outcome!r}"
            assert unchanged, f"{where}: call {index}: the refused update changed the averager's state"
        else:
            assert outcome == "ok", f"{where}: call {index} ({expected}): {outcome}"
        if after is not None:
            _check_switch(front, case, schedule, expected == "update" and t % (2 * case["every"]) == 0,
                          wide(theta), after, f"{where}: call {index}")  # fmt: skip
    now, initial, modes = wide(record["now"]), wide(record["initial"]), front.modes(case)
    for label, which, shows, values in record["readbacks"]:
        average = schedule.averages[which]
        for name, got in values.items():
            what = f"{where}: {label} {name}"
            if modes[name] == "skip":
                _compare(got, (now if shows == "now" else initial)[name], None, got.dtype, what)
                continue
            value, tol = front.output(schedule, which, name, now[name], stochastic)
            _compare(got, value, tol, average.storage[name], what)
            if name == "signal" and modes[name] == "average" and stochastic and average.storage[name] == torch.bfloat16:
                _check_means(got, value, average, what)
    counters = record["counters"]
    assert counters["updates"] == schedule.updates, f"{where}: {counters} updates, reference {schedule.updates}"
    allowed = {schedule.skipped, schedule.skipped + schedule.start_skips}  # a skipped target start may count
    assert counters["skipped"] in allowed, f"{where}: skipped_updates {counters['skipped']}, expected {allowed}"
    assert not record["twin"], f"{where}: {record['twin']}"


def _check_switch(front: Front, case: dict, schedule: Any, due: bool, theta: dict, after: dict, where: str) -> None:
    """Switch EMA: after a due update the model is ``theta + blend (average - theta)`` in its averaged tensors
    (``blend = 1``: the average itself); otherwise the update leaves the model alone."""
    average, blend, model_dtype = schedule.averages[0], case["blend"], DTYPES[case["model_dtype"]]
    for name, got in after.items():
        if not due or average.modes.get(name) != "average" or average.exact is None:
            _compare(got, theta[name], None, got.dtype, f"{where}: model {name}")
            continue
        value, tol = average.expected(name, case["rounding"] == "stochastic")
        stored = average.storage[name]
        if blend != 1.0:
            value = theta[name] + blend * (value - theta[name])
            tol = tol + spacing(stored, average.scale[name]) + spacing(model_dtype, average.scale[name])
        _compare(got, value, tol, stored, f"{where}: model {name} after the switch")
