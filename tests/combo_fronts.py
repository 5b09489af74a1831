"""The combination tester's front ends (public API only), its driver (runs a case) and judge (checks the record).

Each front end says how it is built from a case, what it promises (which tensors are averaged, copied or left
alone, in which dtype they are kept, the weight of each update) and where its average can be read. The driver
runs a case on a plain, flat or sharded model and records what it saw; the judge replays the float64 reference
over the recorded iterates and compares. Driver and judge are apart so that an FSDP2 run, recorded on two
ranks, is judged in the parent process exactly as a plain one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from combo_engine import Average, ComboNet, Schedule, rounded, set_iterate, snapshot, spacing
from torch import Tensor, nn

import polyak

DTYPES = {"default": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POISON = {"first": float("nan"), "mid": float("inf"), "huge": 1e20}  # huge: finite, its square is not in float32
DECAY, TAU, MULTI, SIGMA_RELS = 0.9, 0.1, (0.9, 0.6), (0.05, 0.10)
PARAMS = ("lin.weight", "lin.bias", "bn.weight", "bn.bias", "signal")  # trainable: always averaged


def model_for(case: dict[str, Any]) -> nn.Module:
    model = ComboNet().to(DTYPES[case.get("model_dtype", "float32")])
    set_iterate(model, 0)
    if case.get("layout") == "flat":
        polyak.flatten_parameters(model)
    return model


class Front:
    """A polyak front end with a shadow (EMA-like): averages kept apart, read by swapping, copying, cloning."""

    live = False  # the average is a module from the start (a target network)
    switches = False
    name = "EMA"

    def weights(self, case: dict[str, Any]) -> list[Callable[[int, int], float]]:
        return [lambda t, d: 1.0 if d == t else 1.0 - DECAY**d]

    def options(self, case: dict[str, Any]) -> dict[str, Any]:
        """The constructor's keyword arguments: those of the case that differ from the defaults."""
        given = {
            "dtype": DTYPES[case["dtype"]],
            "rounding": case["rounding"],
            "nonfinite": case["nonfinite"],
            "buffers": case["buffers"],
            "frozen": case["frozen"],
            "lazy": case["lazy"],
            "device": "cpu" if case["device"] == "cpu" else None,
            "update_every": case["every"],
            "start_step": case["start"],
        }
        defaults = {"rounding": "nearest", "nonfinite": "propagate", "buffers": "average", "frozen": "copy"}
        defaults |= {"lazy": False, "update_every": 1, "start_step": 0}
        chosen = {k: v for k, v in given.items() if v is not None and defaults.get(k, object()) != v}
        return chosen | case.get("override", {})  # a bad value, to see it refused

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        return polyak.EMA(model, decay=DECAY, **self.options(case))

    def extra(self, case: dict[str, Any]) -> nn.Module | None:
        """A module the user builds for the averager (a target network), or None."""
        return None

    def modes(self, case: dict[str, Any]) -> dict[str, str]:
        """Which tensors are averaged, copied or left to the model: the README's selection rules."""
        float_buffers = case["buffers"]
        return {
            **dict.fromkeys(PARAMS, "average"),
            "frozen": case["frozen"],
            "bn.running_mean": float_buffers,
            "bn.running_var": float_buffers,
            "bn.num_batches_tracked": "skip" if case["buffers"] == "skip" else "copy",  # integers: copied
            "mask": "skip",  # non-persistent
        }

    def storage(self, case: dict[str, Any], mode: str) -> torch.dtype:
        """Storage dtype: copies keep the model's; averages the one asked for, else float32 or wider."""
        model_dtype = DTYPES[case["model_dtype"]]
        if mode == "copy":
            return model_dtype
        return DTYPES[case["dtype"]] or torch.promote_types(model_dtype, torch.float32)

    def averages(self, case: dict[str, Any]) -> int:
        return 1

    def schedule(self, case: dict[str, Any]) -> Schedule:
        modes = self.modes(case)
        storage = {name: self.storage(case, mode) for name, mode in modes.items()}
        storage["bn.num_batches_tracked"] = torch.int64
        averages = [Average(modes, storage) for _ in range(self.averages(case))]
        return self.schedule_of(case, averages)

    def schedule_of(self, case: dict[str, Any], averages: list[Average]) -> Schedule:
        return Schedule(
            averages,
            self.weights(case),
            start=case["start"],
            every=case["every"],
            live=self.live,
            lazy=case["lazy"],
            nonfinite=case["nonfinite"],
        )

    def poison_call(self, case: dict[str, Any]) -> int | None:
        """The update() call that gets the bad value: ``first`` is the first that reads the model after
        construction (a target's start at the step before ``start``), ``mid`` and ``huge`` the fifth update."""
        start, every = case.get("start", 0), case.get("every", 1)
        if case["poison"] == "first":
            return start if self.live and start else start + every
        return start + 5 * every if case["poison"] in ("mid", "huge") else None

    def members(self, averager: Any) -> list[Any]:
        return [averager]

    def readbacks(self, averager: Any, model: nn.Module, sharded: bool) -> list[tuple[str, int, str, dict]]:
        """(label, which average, what skipped tensors show, tensors) for every public way to read the average."""
        out = []
        for which, member in enumerate(self.members(averager)):
            out += self.read(member, model, sharded, which, {})
        return out

    def read(self, member: Any, model: nn.Module, sharded: bool, which: int, kw: dict) -> list:
        with member.swapped(model, **kw) as swapped:
            out = [(f"{which}.swapped", which, "now", snapshot(swapped))]
        if not sharded:  # a sharded model cannot be deep-copied
            out.append((f"{which}.averaged_model", which, "now", snapshot(member.averaged_model(**kw))))
            clone = copy.deepcopy(model)
            member.copy_to(clone, **kw)
            out.append((f"{which}.copy_to", which, "now", snapshot(clone)))
        return out

    def update(self, averager: Any, model: nn.Module) -> None:
        averager.update()

    def state_of(self, averager: Any) -> Any:
        return averager.state_dict()

    def load(self, averager: Any, state: Any) -> None:
        averager.load_state_dict(state)

    def counters(self, averager: Any) -> dict[str, int]:
        members = self.members(averager)
        return {"skipped": getattr(members[0], "skipped_updates", 0), "updates": members[0].num_updates}

    def output(self, schedule: Schedule, which: int, name: str, now: Tensor, stochastic: bool) -> tuple:
        return schedule.averages[which].expected(name, stochastic)


class SWA(Front):
    name = "SWA"

    def weights(self, case: dict[str, Any]) -> list[Callable[[int, int], float]]:
        return [lambda t, d: d / t]  # equal weights: 1 / (number of updates), the first copies

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        return polyak.SWA(model, **self.options(case))


class Multi(Front):
    name = "MultiEMA"

    def weights(self, case: dict[str, Any]) -> list[Callable[[int, int], float]]:
        return [lambda t, d, decay=decay: 1.0 if d == t else 1.0 - decay**d for decay in MULTI]

    def averages(self, case: dict[str, Any]) -> int:
        return len(MULTI)

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        return polyak.MultiEMA(model, decays=MULTI, **self.options(case))

    def members(self, averager: Any) -> list[Any]:
        return [averager[name] for name in averager]


class Switch(Front):
    name = "switch"
    switches = True

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        every = 2 * case["every"]
        return polyak.EMA(model, decay=DECAY, switch_every=every, switch_blend=case["blend"], **self.options(case))


class Target(Front):
    """``EMA(model, tau=..., target="copy")``: a live module that starts as the model and blends from the first
    update on (weight ``1 - (1 - tau)**delta``). The module keeps the model's dtype; the average is kept in the
    storage dtype (a float32 master for a bf16 model, or ``dtype=``), shown in the module's own dtype."""

    name = "target_copy"
    live = True
    tau = TAU

    def weights(self, case: dict[str, Any]) -> list[Callable[[int, int], float]]:
        return [lambda t, d: 1.0 - (1.0 - self.tau) ** d]

    def storage(self, case: dict[str, Any], mode: str) -> torch.dtype:
        return DTYPES[case["model_dtype"]] if mode == "copy" else super().storage(case, mode)

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        return polyak.EMA(model, tau=self.tau, target=extra if extra is not None else "copy", **self.options(case))

    def readbacks(self, averager: Any, model: nn.Module, sharded: bool) -> list[tuple[str, int, str, dict]]:
        return [("target", 0, "initial", snapshot(averager.target)), *super().readbacks(averager, model, sharded)]


class TargetModule(Target):
    name = "target_module"

    def extra(self, case: dict[str, Any]) -> nn.Module | None:
        module = ComboNet().to(DTYPES[case["model_dtype"]])
        set_iterate(module, 50)  # the user's values: kept where the target leaves a tensor alone
        return module


class HardCopy(Target):
    name = "hard_copy"
    tau = 1.0  # DQN: a copy every update_every steps


class BEMA(Front):
    """BEMA (the formula of ``polyak.bema``'s docstring): the EMA with ``beta_s = (rho + gamma s)**-kappa`` starts
    with the anchor at ``s = 0``; the output adds ``alpha_s (theta - theta_0)`` to averaged parameters (a frozen
    one too, when ``frozen="average"``); buffers and copies show the EMA's value."""

    name = "BEMA"
    live = True  # the EMA and the anchor exist from construction and are taken again at s = 0

    def weights(self, case: dict[str, Any]) -> list[Callable[[int, int], float]]:
        return [lambda t, d: min(1.0, (10.0 + t) ** -0.5)]

    def options(self, case: dict[str, Any]) -> dict[str, Any]:
        options = super().options(case)
        if "start_step" in options:
            options["burn_in"] = options.pop("start_step")
        return options

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        return polyak.BEMA(model, **self.options(case))

    def schedule_of(self, case: dict[str, Any], averages: list[Average]) -> Schedule:
        anchor = Average(averages[0].modes, averages[0].storage)  # theta_0
        return Schedule(averages, self.weights(case), start=case["start"], every=case["every"], live=True,
                        lazy=case["lazy"], nonfinite=case["nonfinite"], anchors=(anchor,))  # fmt: skip

    def output(self, schedule: Schedule, which: int, name: str, now: Tensor, stochastic: bool) -> tuple:
        ema, anchor = schedule.averages[0], schedule.anchors[0]
        value, tol = ema.expected(name, stochastic)
        if name not in (*PARAMS, "frozen") or ema.modes.get(name) != "average":
            return value, tol  # buffers and copies: the EMA's value
        dtype = ema.storage[name]
        base, _ = anchor.expected(name, stochastic)
        alpha = (10.0 + schedule.last) ** -0.2
        value = value + alpha * ((now if stochastic else rounded(now, dtype)) - base)
        scale = torch.maximum(ema.scale[name], now.abs().nan_to_num(0.0, 0.0, 0.0))
        return value, tol + 3 * spacing(dtype, scale)  # the anchor's rounding, three ops in the storage dtype


class PostHoc(Front):
    name = "PostHocEMA"

    def weights(self, case: dict[str, Any]) -> list[Callable[[int, int], float]]:
        # the rules' weights are checked against their formulas in test_rules.py; the tensors are computed here
        return [polyak.rules.PowerFunction(sigma_rel=s).weight for s in SIGMA_RELS]

    def averages(self, case: dict[str, Any]) -> int:
        return len(SIGMA_RELS)

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        return polyak.PostHocEMA(model, sigma_rels=SIGMA_RELS, **self.options(case))

    def readbacks(self, averager: Any, model: nn.Module, sharded: bool) -> list[tuple[str, int, str, dict]]:
        return [r for p in range(len(SIGMA_RELS)) for r in self.read(averager, model, sharded, p, {"profile": p})]

    def counters(self, averager: Any) -> dict[str, int]:
        return {"skipped": getattr(averager, "skipped_updates", 0), "updates": averager.num_updates}


class AveragedModel(Front):
    """``polyak.swa_utils.AveragedModel``: torch's signature and semantics (the copy keeps ``dtype`` or the model's,
    no promotion; ``use_buffers=False`` copies every buffer, non-persistent ones too), called once per step."""

    name = "AveragedModel"

    def weights(self, case: dict[str, Any]) -> list[Callable[[int, int], float]]:
        if case["avg_fn"] == "ema":
            return [lambda t, d: 1.0 if t == 1 else 0.2]
        return [lambda t, d: 1.0 / t]

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        utils = polyak.swa_utils
        kinds = {
            "default": {},
            "ema": {"multi_avg_fn": utils.get_ema_multi_avg_fn(0.8)},
            "swa": {"avg_fn": utils.get_swa_avg_fn()},
            "custom": {"avg_fn": lambda avg, new, n: avg + (new - avg) / (n + 1)},  # the user's own, torch's way
        }
        options = {"device": "cpu" if case["device"] == "cpu" else None, "dtype": DTYPES[case["dtype"]]}
        options |= {"use_buffers": case["use_buffers"], **kinds[case["avg_fn"]], **case.get("override", {})}
        return utils.AveragedModel(model, **options)

    def modes(self, case: dict[str, Any]) -> dict[str, str]:
        buffers = "average" if case["use_buffers"] else "copy"
        return {
            **dict.fromkeys((*PARAMS, "frozen"), "average"),
            "bn.running_mean": buffers,
            "bn.running_var": buffers,
            "bn.num_batches_tracked": "copy",
            "mask": "skip" if case["use_buffers"] else "copy",
        }

    def storage(self, case: dict[str, Any], mode: str) -> torch.dtype:
        return DTYPES[case["dtype"]] or DTYPES[case["model_dtype"]]

    def schedule_of(self, case: dict[str, Any], averages: list[Average]) -> Schedule:
        return Schedule(averages, self.weights(case))

    def readbacks(self, averager: Any, model: nn.Module, sharded: bool) -> list[tuple[str, int, str, dict]]:
        return [("module", 0, "initial", snapshot(averager.module))]

    def update(self, averager: Any, model: nn.Module) -> None:
        averager.update_parameters(model)

    def counters(self, averager: Any) -> dict[str, int]:
        return {"skipped": 0, "updates": int(averager.n_averaged)}


class TorchvisionEMA(AveragedModel):
    name = "ExponentialMovingAverage"

    def weights(self, case: dict[str, Any]) -> list[Callable[[int, int], float]]:
        return [lambda t, d: 1.0 if t == 1 else 1.0 - DECAY]

    def build(self, model: nn.Module, case: dict[str, Any], extra: nn.Module | None) -> Any:
        options = {"decay": DECAY, "device": "cpu" if case["device"] == "cpu" else None, "dtype": DTYPES[case["dtype"]]}
        return polyak.swa_utils.ExponentialMovingAverage(model, **(options | case.get("override", {})))

    def modes(self, case: dict[str, Any]) -> dict[str, str]:
        return super().modes({**case, "use_buffers": True})


FRONTS: dict[str, Front] = {
    f.name: f for f in (Front(), SWA(), Multi(), BEMA(), PostHoc(), Target(), TargetModule(), Switch(), HardCopy(),
                        AveragedModel(), TorchvisionEMA())
}  # fmt: skip
