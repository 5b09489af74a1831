"""Exact resume across processes, refusal of foreign states, and safe reading of state files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_job import CASES, model_for, run
from torch import nn

import polyak

SPLIT, TOTAL = 7, 20


def saved_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def saved_file_bytes(state: dict, path: Path) -> bytes:
    """The bytes ``torch.save(state, path)`` writes (the archive's inner folder is named after the file)."""
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)
    return path.read_bytes()


def test_resume_in_a_new_process_is_bit_exact(tmp_path: Path):
    """TOTAL steps in one process == SPLIT steps, save, load in another process, the rest: same bytes."""
    job = Path(__file__).with_name("resume_job.py")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(job.parent), *sys.path])}
    for phase in ("first", "second"):
        subprocess.run(
            [sys.executable, str(job), phase, str(tmp_path), str(SPLIT), str(TOTAL)],
            check=True,
            env=environment,
            timeout=300,
        )
    for case, make in CASES.items():
        torch.manual_seed(0)
        model = model_for(case)
        whole = make(model)
        run(case, whole, model, range(TOTAL))
        expected = saved_file_bytes(whole.state_dict(), tmp_path / "whole" / f"{case}.final.pt")
        assert (tmp_path / f"{case}.final.pt").read_bytes() == expected, case
        if not isinstance(whole, polyak.Averager):  # swa_utils: the file is a module state dict
            assert torch.load(tmp_path / f"{case}.final.pt", weights_only=True)["n_averaged"] == TOTAL
            continue
        resumed = polyak.load_state(tmp_path / f"{case}.final.pt")
        assert resumed["step"] == TOTAL and resumed["num_updates"] == whole.num_updates, case
        if case == "ema-skip-nonfinite":
            assert resumed["skipped_updates"] == whole.skipped_updates == 2
        # the file holds what the uninterrupted run holds, bit for bit (also for -0.0 and NaN payloads)
        for name, value in whole.shadow.tensors().items():
            other = resumed["shadow"][name]
            assert torch.equal(value.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), (case, name)


def test_loading_into_another_model_rule_or_policy_changes_nothing():
    model = model_for("")
    source = polyak.EMA(model, decay=0.9)
    source.update()
    state = source.state_dict()
    targets = {
        "rule=": polyak.EMA(model_for(""), decay=0.99),
        "kind=": polyak.SWA(model_for("")),
        "policy=": polyak.EMA(model_for(""), decay=0.9, dtype=torch.float64),
        "start_step=": polyak.EMA(model_for(""), decay=0.9, start_step=1),
        r"'0.weight' has shape \(4, 5\).*holds shape \(4, 6\)": polyak.EMA(
            nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3).to(torch.bfloat16), nn.Linear(3, 2)),
            decay=0.9,
            frozen="copy",
            buffers="average",
        ),
        "missing": polyak.EMA(nn.Sequential(nn.Linear(5, 4)), decay=0.9),
    }
    for message, target in targets.items():
        target.update()
        target.update()
        before = {k: v.clone() for k, v in target.shadow.tensors().items()}
        counters = (target.step, target.num_updates, target.last_update_step)
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(state)
        assert (target.step, target.num_updates, target.last_update_step) == counters, message
        assert all(torch.equal(v, before[k]) for k, v in target.shadow.tensors().items()), message


@pytest.mark.parametrize(
    ("key", "value"), [("step", None), ("num_updates", -1), ("last_update_step", 1.5), ("step", True)]
)
def test_damaged_counters_are_refused_before_anything_changes(key, value):
    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.9)
    ema.update()
    state = ema.state_dict()
    state["shadow"] = {k: torch.full_like(v, 7.0) for k, v in state["shadow"].items()}
    if value is None:
        del state[key]
    else:
        state[key] = value
    target = polyak.EMA(nn.Linear(3, 2), decay=0.9)
    before = {k: v.clone() for k, v in target.shadow.tensors().items()}
    with pytest.raises(ValueError, match=rf"{key}=.*expected an int in \[0, 2\*\*63\)"):
        target.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in target.shadow.tensors().items())


def test_state_holds_only_tensors_and_plain_values(tmp_path: Path):
    ema = polyak.EMA(model_for(""), rule=polyak.rules.PowerFunction(sigma_rel=0.05), nonfinite="skip")
    ema.update()
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    assert torch.load(path, weights_only=True)["rule"] == ema.rule.config()
    assert polyak.load_state(path)["shadow"].keys() == ema.shadow.tensors().keys()


class Payload:
    """An arbitrary object: unpickling it would run code that weights_only refuses."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "pickle", "not-a-state"])
def test_bad_files_give_one_line_errors(tmp_path: Path, damage: str):
    ema = polyak.EMA(nn.Linear(3, 2), decay=0.9)
    ema.update()
    good = saved_bytes(ema.state_dict())
    path = tmp_path / "ema.pt"
    contents = {
        "truncated": good[: len(good) // 2],
        "garbage": os.urandom(256),
        "empty": b"",
        "pickle": saved_bytes({"format": "polyak.averager/1", "x": Payload()}),
        "not-a-state": saved_bytes({"weight": torch.zeros(2)}),
    }
    path.write_bytes(contents[damage])
    with pytest.raises(ValueError) as info:
        polyak.load_state(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__  # no chained torch traceback
    expected = "is not a polyak averager state" if damage == "not-a-state" else "truncated, corrupt or holds objects"
    assert expected in message


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no averager state at"):
        polyak.load_state(tmp_path / "nowhere.pt")
