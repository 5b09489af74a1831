"""The combination tester on FSDP2 (2 CPU ranks, gloo): EMA, MultiEMA and BEMA, pairwise over the options that
matter under sharding, each case run plain (in this process) and sharded (in one launch for all cases), both
judged against the float64 reference of the gathered iterates (see ``test_combinations.py``).

Under FSDP2 every parameter is a DTensor sharded on dim 0; the bad value of ``poison`` lands in rank 1's shard
only, so a skip must be agreed on by both ranks. Readbacks are ``swapped()`` (a sharded model cannot be
deep-copied) and the halfway ``state_dict()`` round trip, gathered on every rank.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from combo_engine import pairwise
from combo_fronts import FRONTS, model_for
from combo_run import drive, judge
from test_combinations import DEFAULT, FAULTS, PENDING, REFUSED, first_rule

from .combo_workers import combinations_job
from .harness import launch

pytestmark = pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7),
    reason="torch 2.6's FSDP2 all-gather fails on CPU ('Stream' object has no attribute 'record_event')",
)

CALLS = 8  # update() calls per case (the plain run has 24): every call gathers the model
AXES: dict[str, tuple[Any, ...]] = {
    "dtype": ("default", "bfloat16"),
    "rounding": ("nearest", "stochastic"),
    "nonfinite": ("propagate", "skip"),
    "frozen": ("average", "copy", "skip"),
    "model_dtype": ("float32", "bfloat16"),
    "poison": ("none", "mid"),  # inf in rank 1's shard at the fifth update
}


def _cases() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for front in ("EMA", "MultiEMA", "BEMA"):
        axes = {k: v for k, v in AXES.items() if k not in PENDING.get(front, {})}  # options it takes today
        for case in pairwise(axes, lambda c, front=front: first_rule(REFUSED, front, c) is None, seed=22):
            out.append((front, {**DEFAULT, **case}))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def sharded_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    ranks = launch(combinations_job, tmp_path_factory.mktemp("combinations"), timeout=300, cases=CASES, calls=CALLS)
    return ranks[0]["records"]


def _params() -> list[Any]:
    out = []
    for index, (front, case) in enumerate(CASES):
        label = ",".join(f"{k}={v}" for k, v in case.items() if DEFAULT.get(k) != v) or "defaults"
        for layout in ("plain", "fsdp2"):
            fault = first_rule(FAULTS, front, case)
            marks = [pytest.mark.xfail(strict=True, reason=fault)] if fault else []
            out.append(pytest.param(index, layout, id=f"{layout}-{front}-{label}", marks=marks))
    return out


@pytest.mark.parametrize(("index", "layout"), _params())
def test_combination_sharded_or_not(index: int, layout: str, request: pytest.FixtureRequest) -> None:
    front, case = CASES[index]
    if layout == "plain":
        torch.manual_seed(0)
        record = drive(FRONTS[front], case, make=model_for, calls=CALLS)
    else:
        record = request.getfixturevalue("sharded_records")[index]
    judge(FRONTS[front], case, record, refusal=None)
