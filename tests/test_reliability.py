"""Never touch what the user did not hand over, never mix runs or ranks (issue 23, items 3-5; issue 25, item 7).

- A live target (or the average) never shares memory with the online model: refused at construction, and at the
  next update after a change that makes them share (both sides are watched), naming the tensor.
- A PostHocEMA run has an identity: a second run refuses a folder holding another run's snapshots, a resumed run
  continues there, and reconstruction refuses a folder holding two runs.
- ``averaged_model()`` is an eval-mode, frozen copy in the model's dtype (or ``dtype=``), for every front end.

References are float64 arithmetic written here, never polyak's own output.
"""

from __future__ import annotations

import copy
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import polyak

DECAY = 0.5


def net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)


class Tied(nn.Module):
    """An embedding tied to the output layer (as language models do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def train(model: nn.Module, amount: float = 1.0) -> None:
    """A stand-in for an optimizer step: every floating tensor moves, in place."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(amount)


# ---------------------------------------------------------------------- item 3: aliasing refused at construction


def _shares_module(online: nn.Module) -> tuple[nn.Module, str]:
    target = copy.deepcopy(online)
    target[0] = online[0]  # an encoder reused by reference
    return target, "'0.weight'"


def _shares_parameter(online: nn.Module) -> tuple[nn.Module, str]:
    target = copy.deepcopy(online)
    target[2].weight = online[2].weight
    return target, "'2.weight'"


def _shares_buffer(online: nn.Module) -> tuple[nn.Module, str]:
    target = copy.deepcopy(online)
    target[1].running_var = online[1].running_var
    return target, "'1.running_var'"


def _shares_integer_buffer(online: nn.Module) -> tuple[nn.Module, str]:
    target = copy.deepcopy(online)
    target[1].num_batches_tracked = online[1].num_batches_tracked
    return target, "'1.num_batches_tracked'"


def _shares_a_slice(online: nn.Module) -> tuple[nn.Module, str]:
    target = copy.deepcopy(online)
    target[0].bias = nn.Parameter(online[0].weight.detach()[2])  # a row of another tensor, at an offset
    return target, "'0.bias' shares its memory with the online model's '0.weight'"


def _shares_as_strided(online: nn.Module) -> tuple[nn.Module, str]:
    target = copy.deepcopy(online)
    target[2].bias = nn.Parameter(online[0].weight.detach().as_strided((2,), (5,), 5))  # a diagonal's tail
    return target, "'2.bias' shares its memory with the online model's '0.weight'"


def _shares_numpy_memory(online: nn.Module) -> tuple[nn.Module, str]:
    memory = np.zeros(40, dtype=np.float32)  # one allocation, wrapped twice: two storages, the same bytes
    online[0].weight = nn.Parameter(torch.from_numpy(memory[:16]).view(4, 4))
    target = copy.deepcopy(online)
    target[0].weight = nn.Parameter(torch.from_numpy(memory[12:28]).view(4, 4))  # overlaps in 4 elements
    return target, "'0.weight'"


@pytest.mark.parametrize(
    "share",
    [
        _shares_module,
        _shares_parameter,
        _shares_buffer,
        _shares_integer_buffer,
        _shares_a_slice,
        _shares_as_strided,
        _shares_numpy_memory,
    ],
)
def test_a_target_sharing_memory_with_the_model_is_refused(share):
    online = net()
    target, named = share(online)
    before = state(online)
    with pytest.raises(ValueError, match="shares its memory with the online model") as error:
        polyak.EMA(online, decay=DECAY, target=target)
    assert named in one_line(error)
    assert "copy.deepcopy(model)" in str(error.value)
    assert unchanged(online, before)


def test_a_target_tied_to_the_models_tied_weight_is_refused():
    online = Tied()
    target = copy.deepcopy(online)
    target.embed.weight = online.embed.weight  # the target's own tie, made to the online model's tensor
    target.head.weight = online.embed.weight
    with pytest.raises(ValueError, match="shares its memory with the online model") as error:
        polyak.EMA(online, decay=DECAY, target=target)
    assert "'embed.weight' shares its memory with the online model's 'embed.weight'" in one_line(error)
    polyak.EMA(online, decay=DECAY, target=copy.deepcopy(online))  # tied within itself, apart from the model


def test_a_separate_target_is_accepted_even_in_the_same_allocation():
    """Tensors apart in one allocation (a flat arena holding both networks) share no element: accepted, and the
    target holds the float64 EMA while the model keeps its own values."""
    online = net()
    arena = torch.zeros(2 * sum(p.numel() for p in online.parameters()))
    halves = iter(arena.chunk(2))
    for module in (online, copy.deepcopy(online)):
        flat, offset = next(halves), 0
        for layer in (module[0], module[1], module[2]):
            for key, p in list(layer._parameters.items()):
                view = flat[offset : offset + p.numel()].view_as(p).copy_(p.detach())
                setattr(layer, key, nn.Parameter(view))
                offset += p.numel()
        if module is not online:
            target = module
    ema = polyak.EMA(online, decay=DECAY, target=target)
    reference = {k: v.double() for k, v in online.state_dict().items() if v.is_floating_point()}
    for _ in range(3):
        train(online, 0.25)
        ema.update()
        for k in reference:
            reference[k] = DECAY * reference[k] + (1 - DECAY) * online.state_dict()[k].double()
    for k, expected in reference.items():
        torch.testing.assert_close(target.state_dict()[k].double(), expected, rtol=1e-6, atol=1e-6, msg=k)
        assert not torch.equal(online.state_dict()[k].double(), expected), k  # the model kept its own values


# ---------------------------------------------------------------------- item 3: the average never aliases the model


def _averagers(model: nn.Module) -> list[polyak.EMA | polyak.SWA | polyak.MultiEMA | polyak.BEMA]:
    return [
        polyak.EMA(model, decay=DECAY),
        polyak.EMA(model, decay=DECAY, target="copy"),
        polyak.EMA(model, decay=DECAY, target=copy.deepcopy(model)),
        polyak.EMA(model, decay=DECAY, dtype=torch.float64),
        polyak.SWA(model),
        polyak.MultiEMA(model, {"fast": 0.5, "slow": 0.9}),
        polyak.BEMA(model),
        polyak.PostHocEMA(model),
    ]


def _holdings(averager) -> list[torch.Tensor]:
    """Every tensor the averager keeps: each average, and a live target's tensors."""
    held = [t for k in range(averager.count) for t in averager.shadow.tensors(k).values()]
    target = getattr(averager, "target", None)
    return held + ([*target.parameters(), *target.buffers()] if isinstance(target, nn.Module) else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_averages_never_hold_the_models_memory(dtype):
    """After updates, writing anything into every tensor an averager keeps leaves the model as it was."""
    model = net(dtype=dtype)
    averagers = _averagers(model)
    for _ in range(3):
        train(model)
        before = state(model)
        for averager in averagers:
            averager.update()
        assert unchanged(model, before)  # the updates did not write into the model
    for averager in averagers:
        with torch.no_grad():
            for t in _holdings(averager):
                t.fill_(7) if t.is_floating_point() else t.fill_(-7)
        assert unchanged(model, before), type(averager).__name__


# ---------------------------------------------------------------------- item 3: sharing made after construction


def _target_data_assigned(online: nn.Module, ema: polyak.EMA) -> str:
    ema.target[0].weight.data = online[0].weight.data
    return "'0.weight' shares its memory with the live target's '0.weight'"


def _target_parameter_moved_in(online: nn.Module, ema: polyak.EMA) -> str:
    ema.target[2].bias = online[2].bias
    return "'2.bias' shares its memory with the live target's '2.bias'"


def _target_module_moved_in(online: nn.Module, ema: polyak.EMA) -> str:
    ema.target[1] = online[1]  # the BatchNorm, buffers included
    return "'1.weight' shares its memory with the live target's '1.weight'"


def _target_buffer_moved_in(online: nn.Module, ema: polyak.EMA) -> str:
    ema.target[1].running_mean = online[1].running_mean
    return "'1.running_mean' shares its memory with the live target's '1.running_mean'"


def _model_tied_to_the_target(online: nn.Module, ema: polyak.EMA) -> str:
    online[0].weight = ema.target[0].weight
    return "'0.weight' shares its memory with the live target's '0.weight'"


def _model_loads_the_target_by_assignment(online: nn.Module, ema: polyak.EMA) -> str:
    online.load_state_dict(ema.target.state_dict(), assign=True)
    return "'0.weight' shares its memory with the live target's '0.weight'"


def _model_given_a_view_of_the_target(online: nn.Module, ema: polyak.EMA) -> str:
    online[0].bias.data = ema.target[0].weight.detach()[3]
    return "'0.bias' shares its memory with the live target's '0.weight'"


AFTER_CONSTRUCTION = [
    _target_data_assigned,
    _target_parameter_moved_in,
    _target_module_moved_in,
    _target_buffer_moved_in,
    _model_tied_to_the_target,
    _model_loads_the_target_by_assignment,
    _model_given_a_view_of_the_target,
]


@pytest.mark.parametrize("change", AFTER_CONSTRUCTION)
@pytest.mark.parametrize("kept", ["in the target", "apart"])
def test_a_target_made_to_share_memory_later_is_refused_at_the_next_update(change, kept):
    """Adopted (a float32 target holds the average) or kept apart (a bf16 target written from a float32 master):
    the next update refuses, naming the tensor, with the model and the average as they were."""
    online = net(dtype=torch.float32 if kept == "in the target" else torch.bfloat16)
    ema = polyak.EMA(online, decay=DECAY, target="copy")
    train(online)
    ema.update()
    named = change(online, ema)
    train(online)
    before, target, master = state(online), state(ema.target), {k: v.clone() for k, v in ema.shadow.tensors().items()}
    for _ in range(2):  # refused again: the refusal left nothing half-paired
        with pytest.raises(ValueError, match="an update would stop averaging or overwrite the model") as error:
            ema.update()
        assert named in one_line(error)
        assert unchanged(online, before) and unchanged(ema.target, target)
        if kept == "apart":  # the float32 master too
            assert all(torch.equal(v, master[k]) for k, v in ema.shadow.tensors().items())


@pytest.mark.parametrize(
    "change",
    [
        lambda online, ema: online.load_state_dict(ema.state_dict()["shadow"], assign=True),
        lambda online, ema: setattr(online[2].weight, "data", ema.shadow.tensors()["2.weight"]),
    ],
    ids=["load_state_dict-assign", "data"],
)
def test_a_model_made_to_hold_the_averages_storage_is_refused(change):
    """``model.load_state_dict(ema.state_dict()["shadow"], assign=True)`` would make the average the model."""
    online = net()
    ema = polyak.EMA(online, decay=DECAY)
    ema.update()
    change(online, ema)
    with pytest.raises(ValueError, match=r"model tensor '\d\.weight' shares its memory with the average's") as error:
        ema.update()
    one_line(error)
    with pytest.raises(ValueError, match="shares its memory"):
        ema.state_dict()  # the state is checked against the model too


def test_a_target_kept_apart_follows_a_replaced_tensor():
    """A bf16 target (kept apart from its float32 master) whose parameter is replaced by a separate one gets the
    average in the new tensor, not in the one it dropped."""
    online = net(dtype=torch.bfloat16)
    ema = polyak.EMA(online, decay=DECAY, target="copy")
    reference = {k: v.double() for k, v in online.state_dict().items() if v.is_floating_point()}
    dropped = ema.target[2].weight
    ema.target[2].weight = nn.Parameter(torch.zeros_like(dropped), requires_grad=False)
    for _ in range(2):
        train(online, 0.5)
        ema.update()
        for k in reference:
            reference[k] = DECAY * reference[k] + (1 - DECAY) * online.state_dict()[k].double()
    assert ema.target[2].weight is not dropped
    torch.testing.assert_close(ema.target[2].weight.double(), reference["2.weight"], rtol=1e-2, atol=1e-2)


def test_what_no_event_announces_is_seen_by_check_when_unwatched():
    """A storage-level change (``set_``) or a write into a module's private dicts raises no event (see
    :mod:`polyak.watch`); with ``watch=False`` the user's ``check()`` looks again and refuses the sharing."""
    online = net()
    ema = polyak.EMA(online, decay=DECAY, target="copy", watch=False)
    ema.update()
    with torch.no_grad():
        online[0].weight.set_(ema.target[0].weight.detach())
    with pytest.raises(ValueError, match="shares its memory") as error:
        ema.check()
    assert "'0.weight' shares its memory with the live target's '0.weight'" in one_line(error)


# ---------------------------------------------------------------------- item 4: a run's identity

EVERY = 2  # optimizer steps between snapshots


def tracker(model: nn.Module, folder: Path, **options: Any) -> polyak.PostHocEMA:
    return polyak.PostHocEMA(model, sigma_rels=(0.05, 0.1), directory=folder, snapshot_every=EVERY, **options)


def run_steps(averager: polyak.PostHocEMA, steps: int, moves: torch.Generator | int) -> None:
    """``steps`` stand-in optimizer steps (a random move of every parameter, drawn from ``moves``, a generator or
    a seed), each followed by the update."""
    if isinstance(moves, int):
        moves = torch.Generator().manual_seed(moves)
    for _ in range(steps):
        with torch.no_grad():
            for p in averager.model.parameters():
                p.add_(torch.randn(p.shape, generator=moves) * 0.1)
        averager.update()


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*"))}


def loaded(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_a_second_run_is_refused_at_its_first_snapshot_and_can_go_elsewhere(tmp_path):
    folder = tmp_path / "snaps"
    first = tracker(net(), folder)
    run_steps(first, 4, moves=1)
    before = files(folder)
    assert list(before) == ["phema-000000000002.safetensors", "phema-000000000004.safetensors"]
    second = tracker(net(), folder)
    moves = torch.Generator().manual_seed(2)
    run_steps(second, 1, moves)  # no snapshot due yet
    with pytest.raises(ValueError, match="holds snapshots of another run") as error:
        run_steps(second, 1, moves)
    message = one_line(error)
    assert first.run_id in message and second.run_id in message
    assert "load its state (load_state_dict)" in message and "pick another directory" in message
    assert files(folder) == before  # nothing overwritten, nothing added
    # The update itself went through and was counted; the snapshot can be written elsewhere, and the run goes on.
    assert (second.step, second.num_updates) == (2, 2)
    second.directory = tmp_path / "elsewhere"
    second.snapshot()
    run_steps(second, 2, moves)
    assert list(files(tmp_path / "elsewhere")) == list(before)


def test_a_resumed_run_continues_in_its_folder_and_reconstructs_bit_for_bit(tmp_path):
    resumed_folder, plain_folder = tmp_path / "resumed", tmp_path / "plain"
    plain = tracker(net(), plain_folder)
    run_steps(plain, 12, moves=1)

    moves = torch.Generator().manual_seed(1)
    first = tracker(net(), resumed_folder)
    run_steps(first, 5, moves)  # interrupted between two snapshots
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = tracker(first.model, resumed_folder)  # a new tracker: a new run until the state is loaded
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.run_id == first.run_id
    run_steps(resumed, 7, moves)

    assert list(files(resumed_folder)) == list(files(plain_folder))
    assert {s.run for s in polyak.posthoc.find_snapshots(resumed_folder)} == {first.run_id}
    for step in (4, 12):
        outputs = {}
        for folder in (resumed_folder, plain_folder):
            outputs[folder.name] = out = tmp_path / f"{folder.name}-{step}.safetensors"
            polyak.posthoc.reconstruct(folder, [0.07], [out], step=step)
        resumed_out, plain_out = loaded(outputs["resumed"]), loaded(outputs["plain"])
        assert resumed_out.keys() == plain_out.keys()
        for key, value in plain_out.items():
            assert torch.equal(resumed_out[key], value), (step, key)


def two_runs(tmp_path: Path) -> tuple[Path, str, str]:
    """A folder holding run A's snapshots at steps 2 and 4, and run B's at 6 and 8 (moved in by hand)."""
    folder, other = tmp_path / "snaps", tmp_path / "other"
    first, second = tracker(net(), folder), tracker(net(seed=1), other)
    run_steps(first, 4, moves=1)
    run_steps(second, 8, moves=2)
    for path in sorted(other.glob("phema-*"))[2:]:
        shutil.copy(path, folder / path.name)
    return folder, first.run_id, second.run_id  # type: ignore[return-value]  # new runs have ids


def test_a_folder_holding_two_runs_is_refused_by_reconstruct_select_and_the_cli(tmp_path, capsys):
    from polyak.cli import main

    folder, run_a, run_b = two_runs(tmp_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="holds snapshots of 2 runs") as error:
        polyak.posthoc.reconstruct(folder, [0.07], [out])
    assert run_a in one_line(error) and run_b in str(error.value)
    with pytest.raises(ValueError, match="holds snapshots of 2 runs") as error:
        polyak.posthoc.select(folder, net(), lambda model: 0.0, sigma_rels=[0.05, 0.07])
    assert run_a in one_line(error) and run_b in str(error.value)
    assert main(["posthoc", str(folder), "--sigma-rel", "0.07", "-o", str(out)]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("polyak posthoc: error:") and "\n" not in printed
    assert run_a in printed and run_b in printed and "a folder of its own" in printed
    assert not out.exists()


def without_run_ids(folder: Path, into: Path) -> None:
    """``folder``'s snapshots as polyak wrote them before runs had an identity: no "run" in their metadata
    (written by the safetensors package, so without polyak's checksums either)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    into.mkdir()
    for path in sorted(folder.glob("phema-*")):
        with safe_open(path, "pt") as snapshot:
            metadata = {k: v for k, v in snapshot.metadata().items() if k not in ("run", "polyak.crc32")}
            tensors = {k: snapshot.get_tensor(k) for k in snapshot.keys()}  # noqa: SIM118  # not a dict
            save_file(tensors, into / path.name, metadata=metadata)


def test_snapshots_from_before_run_ids_are_one_unnamed_run(tmp_path):
    named, unnamed = tmp_path / "named", tmp_path / "unnamed"
    run_steps(tracker(net(), named), 6, moves=1)
    without_run_ids(named, unnamed)
    assert {s.run for s in polyak.posthoc.find_snapshots(unnamed)} == {None}
    for folder in (named, unnamed):  # they reconstruct as they did, bit for bit
        polyak.posthoc.reconstruct(folder, [0.07], [tmp_path / f"{folder.name}.safetensors"], step=4)
    named_out, unnamed_out = loaded(tmp_path / "named.safetensors"), loaded(tmp_path / "unnamed.safetensors")
    assert all(torch.equal(unnamed_out[k], v) for k, v in named_out.items()) and named_out.keys() == unnamed_out.keys()

    # A new run is refused there; they are named "(unnamed)" beside a named run's snapshots.
    with pytest.raises(ValueError, match=r"another run \(\(unnamed\)\)"):
        run_steps(tracker(net(), unnamed), EVERY, moves=2)
    shutil.copy(sorted(named.glob("phema-*"))[-1], unnamed)
    with pytest.raises(ValueError, match=r"2 runs \((\(unnamed\), \w+|\w+, \(unnamed\))\)"):
        polyak.posthoc.reconstruct(unnamed, [0.07], [tmp_path / "mixed.safetensors"])


def test_a_state_from_before_run_ids_continues_its_unnamed_folder(tmp_path):
    """The PostHocEMA state saved by the pre-redesign polyak (tests/data/states_v1.pt) has no run: it continues
    beside unnamed snapshots, and is refused beside a named run's."""
    from test_state_compat import STATES, maker

    named, unnamed = tmp_path / "named", tmp_path / "unnamed"
    run_steps(tracker(net(), named), 4, moves=1)
    without_run_ids(named, unnamed)
    for folder, accepted in ((unnamed, True), (named, False)):
        old = polyak.PostHocEMA(maker.model(), sigma_rels=(0.05, 0.1), directory=folder)
        old.load_state_dict(STATES["posthoc"])
        assert old.run_id is None
        if accepted:
            assert old.snapshot().name == "phema-000000000007.safetensors"
            assert {s.run for s in polyak.posthoc.find_snapshots(folder)} == {None}
        else:
            with pytest.raises(ValueError, match="holds snapshots of another run"):
                old.snapshot()


@pytest.mark.parametrize("run", [5, b"abc", ["abc"], ""], ids=["int", "bytes", "list", "empty"])
def test_a_damaged_run_entry_in_a_state_is_refused_and_nothing_changes(tmp_path, run):
    source = tracker(net(), tmp_path / "a")
    run_steps(source, 3, moves=1)
    state = source.state_dict()
    state["run"] = run
    other = tracker(net(seed=1), tmp_path / "b")
    run_steps(other, 1, moves=2)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"saved PostHocEMA has run=.*The state is damaged") as error:
        other.load_state_dict(state)
    one_line(error)
    after = other.state_dict()
    assert after["run"] == before["run"] and after["step"] == before["step"] == 1
    for saved, now in zip(before["shadows"], after["shadows"], strict=True):
        assert all(torch.equal(now[k], v) for k, v in saved.items())


# ---------------------------------------------------------------------- issue 25 item 7: averaged_model()


class Mixed(nn.Module):
    """Real and complex parameters, a frozen one, BatchNorm buffers (one an integer), one submodule in eval."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.phase = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
        self.norm.eval()


def moved(model: nn.Module, moves: torch.Generator) -> None:
    """A stand-in training step: every parameter and floating buffer moves; the batch counter counts."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("num_batches_tracked"):
                t.add_(1)
            elif name.endswith("running_var"):
                t.mul_(1 + 0.1 * torch.rand(t.shape, generator=moves).to(t.dtype))
            else:
                t.add_((torch.randn(t.shape, generator=moves) * 0.1).to(t.dtype))


def ema_of(seen: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """``average <- average + w (theta - average)`` over ``seen[1:]`` (one weight each), from ``seen[0]``."""
    average = dict(seen[0])
    for theta, w in zip(seen[1:], weights, strict=True):
        average = {k: average[k] + w * (theta[k] - average[k]) for k in average}
    return average


def power_gamma(sigma_rel: float) -> float:
    """EDM2's exponent for a relative width: the largest real root of g^3 + 7g^2 + (16 - s)g + (12 - s), s =
    sigma_rel^-2."""
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


UPDATES = 4
REAL_FLOATING = ("lin.weight", "lin.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var")


def expected_average(front: str, seen: list[dict[str, torch.Tensor]], now: dict[str, torch.Tensor]):
    """The float64 average each front end is documented to hold after ``UPDATES`` updates (``seen[0]``: the model
    when the averager was made; ``now``: the model as it is)."""
    n = len(seen) - 1
    if front in ("EMA", "MultiEMA['slow']"):  # the first update copies
        return ema_of(seen, [1.0] + [1 - 0.9] * (n - 1))
    if front == "SWA":
        return ema_of(seen, [1 / t for t in range(1, n + 1)])
    if front == "PostHocEMA(profile=1)":
        gamma = power_gamma(0.1)
        return ema_of(seen, [1 - (1 - 1 / t) ** (gamma + 1) for t in range(1, n + 1)])
    assert front == "BEMA"  # the EMA of beta_s = (10 + s)^-0.5, plus alpha_s (theta - theta_0) for parameters
    ema = ema_of(seen, [(10.0 + s) ** -0.5 for s in range(1, n + 1)])
    alpha = (10.0 + n) ** -0.2
    return {k: v if "running" in k else v + alpha * (now[k] - seen[0][k]) for k, v in ema.items()}


FRONTS = {
    "EMA": (lambda m: polyak.EMA(m, decay=0.9), lambda a, **kw: a.averaged_model(**kw)),
    "SWA": (polyak.SWA, lambda a, **kw: a.averaged_model(**kw)),
    "MultiEMA['slow']": (
        lambda m: polyak.MultiEMA(m, {"fast": 0.5, "slow": 0.9}),
        lambda a, **kw: a["slow"].averaged_model(**kw),
    ),
    "BEMA": (polyak.BEMA, lambda a, **kw: a.averaged_model(**kw)),
    "PostHocEMA(profile=1)": (
        lambda m: polyak.PostHocEMA(m, sigma_rels=(0.05, 0.1)),
        lambda a, **kw: a.averaged_model(1, **kw),
    ),
}


@pytest.mark.parametrize("front", list(FRONTS))
@pytest.mark.parametrize(
    ("model_dtype", "dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.float64), (torch.bfloat16, torch.float64)],
    ids=["fp32", "bf16", "fp32-as-fp64", "bf16-as-fp64"],
)
def test_averaged_model_is_an_eval_frozen_copy_in_the_models_dtype(front, model_dtype, dtype):
    model = Mixed()
    model._apply(lambda t: t.to(model_dtype) if t.is_floating_point() else t)
    make, averaged_model = FRONTS[front]
    averager = make(model)
    moves = torch.Generator().manual_seed(1)
    seen = [{k: v.detach().to(torch.complex128 if v.is_complex() else torch.float64) for k, v in state(model).items()}]
    for _ in range(UPDATES):
        moved(model, moves)
        averager.update()
        seen.append({k: v.to(seen[0][k].dtype) for k, v in state(model).items()})
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    before = state(model)

    copy_ = averaged_model(averager, **({} if dtype is None else {"dtype": dtype}))

    # The training model keeps its mode, flags and values.
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == modes == {"": True, "lin": True, "norm": False}
    assert unchanged(model, before)
    # The copy: evaluation mode everywhere, nothing requires grad, floating tensors in the model's dtype or dtype=.
    assert copy_ is not model and not any(m.training for m in copy_.modules())
    assert not any(p.requires_grad for p in copy_.parameters())
    wanted = dtype or model_dtype
    held = copy_.state_dict()
    assert {k: v.dtype for k, v in held.items()} == {
        **{k: wanted for k in REAL_FLOATING},
        "frozen": wanted,
        "phase": torch.complex128 if dtype == torch.float64 else torch.complex64,
        "norm.num_batches_tracked": torch.int64,
    }
    # Its values: the float64 average (complex: imaginary parts too), the frozen and integer tensors copied.
    expected = expected_average(front, seen, seen[-1])
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if wanted == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for key in (*REAL_FLOATING, "phase"):
        actual = held[key].to(torch.complex128 if held[key].is_complex() else torch.float64)
        torch.testing.assert_close(actual, expected[key], **tolerance, msg=f"{front}: {key}")
    assert torch.equal(held["frozen"], before["frozen"].to(wanted))
    assert int(held["norm.num_batches_tracked"]) == UPDATES
    with torch.no_grad():  # a copy of its own: changing it leaves the model alone
        for t in held.values():
            t.zero_()
    assert unchanged(model, before)
