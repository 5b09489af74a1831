"""Never touch what the user did not hand over (issue 23, item 3): a live target (or the average) never shares
memory with the online model. Refused at construction, and at the next update after a change that makes them
share (both sides are watched), naming the tensor. (Item 4, a run's identity: test_reliability_runs.py; item 5,
a rank's identity: distributed/test_identity.py.)

References are float64 arithmetic written here, never polyak's own output.
"""

from __future__ import annotations

import copy

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
