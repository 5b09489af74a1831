"""The plan: a model changed after the averager was built is followed or refused at the next call, never ignored.

Each change is made to a real model between updates. Followed: the average then equals a float64 EMA that
is re-derived from the model's tensors by name (not from the averager's own view of them). Refused: a
one-line ValueError that names the tensor, at the first ``update`` / ``swapped`` / ``copy_to`` /
``state_dict`` after the change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import polyak
from polyak import EMA, flatten_parameters
from polyak.commands.bench import Census


class Net(nn.Module):
    """Two linear layers, a BatchNorm (float and integer buffers) and a tied output head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


def expected_mode(name: str, tensor: torch.Tensor, is_param: bool, frozen: str) -> str:
    """What the averager's documented policy says for one tensor (default options but ``frozen``)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return "copy"
    if is_param and not tensor.requires_grad:
        return frozen
    return "average"


class Reference:
    """A float64 EMA of a model's tensors by name, derived from the model alone (tied names share a value)."""

    def __init__(self, model: nn.Module, frozen: str = "copy") -> None:
        self.frozen = frozen
        self.values: dict[str, torch.Tensor] = {}
        self.update(model, 1.0)

    def update(self, model: nn.Module, weight: float) -> None:
        params = {id(p) for p in model.parameters()}
        state = model.state_dict(keep_vars=True)
        names: dict[int, list[str]] = {}  # tied names share one tensor, so one running value
        for name, tensor in state.items():
            names.setdefault(id(tensor), []).append(name)
        new: dict[str, torch.Tensor] = {}
        for group in names.values():
            tensor = state[group[0]]
            mode = expected_mode(group[0], tensor, id(tensor) in params, self.frozen)
            if mode == "skip":
                continue
            value = tensor.detach()
            known = next((self.values[name] for name in group if name in self.values), None)
            if mode == "copy" or known is None or weight == 1.0:
                result = value.clone() if mode == "copy" else value.double().clone()
            else:
                result = known + weight * (value.double() - known)
            new.update(dict.fromkeys(group, result))
        self.values = new

    def check(self, ema: EMA, tol: float = 1e-6) -> None:
        got = ema.state_dict()["shadow"]
        assert set(got) == set(self.values)
        for name, value in self.values.items():
            if value.dtype == torch.float64:
                torch.testing.assert_close(got[name].double(), value, rtol=tol, atol=tol, msg=name)
            else:
                assert torch.equal(got[name].to(value.dtype), value), name


def step(model: nn.Module, seed: int) -> None:
    """A stand-in for an optimizer step: every floating tensor moves, in its own dtype."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))


def run_followed(change, model: nn.Module | None = None, frozen: str = "copy", tol: float = 1e-6) -> EMA:
    torch.manual_seed(0)
    model = model if model is not None else Net()
    ema = EMA(model, decay=0.75, frozen=frozen)
    ema.update()  # the first update copies the model
    reference = Reference(model, frozen)
    for i in range(3):
        step(model, i)
        ema.update()
        reference.update(model, 0.25)
    change(model)
    for i in range(3, 6):
        step(model, i)
        ema.update()
        reference.update(model, 0.25)
        reference.check(ema, tol)
    return ema


def _replace_param(model: Net) -> None:
    model.body[0].weight = nn.Parameter(model.body[0].weight.detach() * 2)


def _set_data(model: Net) -> None:
    model.body[2].weight.data = torch.randn(4, 4)


def _load_assign(model: Net) -> None:
    # (not the tied part: assign=True makes a new Parameter per name, so torch unties them, and that is refused)
    model.body.load_state_dict({k: v.clone() for k, v in model.body.state_dict().items()}, assign=True)


def _to_empty(model: Net) -> None:
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.copy_(torch.randn(tensor.shape).to(tensor.dtype) if tensor.is_floating_point() else 3)


def _swap_mode_half(model: Net) -> None:
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.half()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def _new_tied_name(model: Net) -> None:
    model.extra = nn.Linear(4, 6, bias=False)
    model.extra.weight = model.embed.weight  # a third name of the tied tensor: exported under it from now on


@pytest.mark.parametrize(
    "change",
    [
        _replace_param,
        _set_data,
        _load_assign,
        _to_empty,
        _swap_mode_half,
        _new_tied_name,
        lambda m: m.double(),
        lambda m: m.body[0].requires_grad_(False),  # frozen: copied from now on
        lambda m: m.body[0].weight.requires_grad_(False),
        lambda m: setattr(m.body[2].bias, "requires_grad", False),
        lambda m: m.body[1].register_buffer("running_mean", m.body[1].running_mean.clone()),
        lambda m: m.body.__setitem__(2, nn.Linear(4, 4)),  # a replaced layer of the same shapes
    ],
    ids=[
        "replace_param",
        "set_data",
        "load_assign",
        "to_empty",
        "swap_mode_half",
        "new_tied_name",
        "double",
        "freeze_layer",
        "freeze_tensor",
        "freeze_by_attribute",
        "reregister_buffer",
        "replace_layer",
    ],
)
def test_followed_changes_match_float64(change):
    run_followed(change)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_recast_model_keeps_its_float32_average(dtype):
    ema = run_followed(lambda m: m.to(dtype), tol=1e-2)
    assert ema.shadow.tensors()["body.0.weight"].dtype == torch.float32


def test_unfreeze_under_copy_policy_starts_averaging_from_the_copy():
    model = Net()
    model.body[0].requires_grad_(False)
    ema = run_followed(lambda m: m.body[0].requires_grad_(True), model=model)
    assert ema.shadow.modes()["body.0.weight"] == "average"


def test_flat_model_broken_by_set_data_is_followed():
    model = Net()
    flatten_parameters(model)
    run_followed(_set_data, model=model)


def test_refreeze_under_average_policy_changes_nothing():
    run_followed(lambda m: m.body[0].requires_grad_(False), frozen="average")


# ---------------------------------------------------------------------- refused


def _untie(model: Net) -> None:
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())


def _tie(model: Net) -> None:
    model.body[2].weight = model.body[0].weight


def _unfreeze_bf16(model: Net) -> None:
    model.to(torch.bfloat16)


REFUSED = {
    "param_added": (lambda m: setattr(m.body[0], "scale", nn.Parameter(torch.ones(4))), "body.0.scale", "added"),
    "buffer_registered": (lambda m: m.body[2].register_buffer("mask", torch.ones(4)), "body.2.mask", "added"),
    "layer_added": (lambda m: m.body.append(nn.Linear(4, 4)), "body.3.weight", "added"),
    "del_bias": (lambda m: delattr(m.body[0], "bias"), "body.0.bias", "removed"),
    "bias_none": (lambda m: setattr(m.body[2], "bias", None), "body.2.bias", "removed"),
    "del_buffer": (lambda m: delattr(m.body[1], "running_var"), "body.1.running_var", "removed"),
    "layer_removed": (lambda m: m.body.__delitem__(2), "body.2.weight", "removed"),
    "untie": (_untie, "head.weight", "was tied"),
    "tie": (_tie, "body.2.weight", "now tied"),
    "broadcastable_data": (lambda m: setattr(m.body[0].weight, "data", torch.ones(4)), "body.0.weight", "shape"),
    "reshaped_data": (lambda m: setattr(m.body[0].weight, "data", torch.ones(2, 8)), "body.0.weight", "shape"),
    "replaced_other_shape": (lambda m: m.body.__setitem__(2, nn.Linear(4, 5)), "body.2.weight", "shape"),
    "int_buffer_made_float": (
        lambda m: setattr(m.body[1].num_batches_tracked, "data", torch.zeros(())),
        "body.1.num_batches_tracked",
        "float32",
    ),
    "float_made_int": (
        lambda m: setattr(m.body[1].running_mean, "data", torch.zeros(4, dtype=torch.int64)),
        "body.1.running_mean",
        "int64",
    ),
    "to_meta": (lambda m: m.to("meta"), "meta", "meta device"),
}


@pytest.mark.parametrize("call", ["update", "swapped", "copy_to", "state_dict"])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_refused_changes_name_the_tensor(kind, call):
    change, name, what = REFUSED[kind]
    model = Net()
    ema = EMA(model, decay=0.5)
    ema.update()
    change(model)
    with pytest.raises(ValueError) as raised:
        if call == "swapped":
            with ema.swapped():
                pass
        else:
            getattr(ema, call)()
    message = str(raised.value)
    assert "\n" not in message
    assert what in message
    if name != "meta":
        assert repr(name) in message
    else:
        assert "'" in message  # names the first tensor on the meta device


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_frozen_skip_refuses_freezing_and_unfreezing(change):
    model = Net()
    if change == "unfreeze":
        model.body[0].requires_grad_(False)
    ema = EMA(model, decay=0.5, frozen="skip")
    ema.update()
    model.body[0].weight.requires_grad_(change == "unfreeze")
    with pytest.raises(ValueError, match=r"'body.0.weight'.*(frozen|unfrozen)"):
        ema.update()


def test_unfreeze_of_a_copy_too_narrow_to_average_is_refused():
    model = Net().to(torch.bfloat16)
    model.body[0].requires_grad_(False)
    ema = EMA(model, decay=0.5)  # the frozen layer is copied in bfloat16
    ema.update()
    model.body[0].requires_grad_(True)
    with pytest.raises(ValueError, match=r"'body.0.weight' was unfrozen.*frozen='average'"):
        ema.update()


def test_meta_model_is_refused_at_build_and_works_after_to_empty():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        EMA(model, decay=0.5)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    run_followed(lambda m: None, model=model)


def test_refusal_changes_nothing_and_undoing_the_change_resumes():
    model = Net()
    ema = EMA(model, decay=0.5)
    ema.update()
    before = {k: v.clone() for k, v in ema.state_dict()["shadow"].items()}
    bias = model.body[0].bias
    del model.body[0].bias
    with pytest.raises(ValueError, match=r"body.0.bias"):
        ema.update()
    assert all(torch.equal(v, before[k]) for k, v in ema.shadow.state_dict().items())
    model.body[0].bias = bias
    ema.update()


def test_changes_elsewhere_do_not_rebuild_the_plan():
    """A module built or cast anywhere in the process bumps the generation: the plan re-checks, and is kept."""
    model = Net()
    ema = EMA(model, decay=0.5)
    ema.update()
    plan = ema.shadow._plan
    nn.Linear(3, 3).double()  # unrelated events
    ema.update()
    assert ema.shadow._plan is plan


def test_unchanged_model_update_costs_no_sync_and_no_allocation():
    model = Net()
    ema = EMA(model, decay=0.5)
    ema.update()
    ema.update()
    with Census() as census:
        ema.update()
    assert census.syncs == 0 and census.allocated == 0


def test_watched_torch_entry_points_behave_as_torch():
    """The wrappers polyak installs call torch's own and keep its results and errors."""
    watcher = polyak.watch.Watcher()  # installs them while it lives
    assert polyak.watch.installed()
    t = torch.zeros(3, requires_grad=True)
    assert t.data.requires_grad is False and t.data.data_ptr() == t.data_ptr()
    t.data = torch.ones(3)
    assert torch.equal(t.detach(), torch.ones(3))
    t.requires_grad = False
    assert t.requires_grad_(True) is t and t.requires_grad
    with pytest.raises(RuntimeError):
        torch.zeros(2, dtype=torch.int64).requires_grad_(True)
    linear = nn.Linear(2, 2)
    assert linear.half() is linear and linear.weight.dtype == torch.float16
    linear.bias = None
    assert linear.bias is None and "bias" in linear._parameters
    copy.deepcopy(linear)
    compiled = torch.compile(lambda x: x.data * 2 + x.requires_grad, backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 2.0))
    watcher.close()


def test_skip_guarded_update_follows_a_recast_and_a_freeze():
    model = Net()
    ema = EMA(model, decay=0.5, nonfinite="skip")
    ema.update()
    reference = Reference(model)
    for i, change in enumerate([lambda m: m.half(), lambda m: m.body[0].requires_grad_(False)]):
        change(model)
        step(model, i)
        ema.update()
        reference.update(model, 0.5)
        reference.check(ema, 1e-2)


def test_bema_anchor_follows_a_freeze_with_its_average():
    """BEMA's two shadows (the EMA and theta_0) must switch a frozen parameter to copied together."""
    model = Net()
    bema = polyak.BEMA(model)
    bema.update()
    bema.update()
    model.body[0].requires_grad_(False)
    bema.update()
    with bema.swapped():
        assert torch.equal(model.body[0].weight, bema.shadow.tensors(0)["body.0.weight"])  # copied: the model's own
    assert bema.shadow.modes()["body.0.weight"] == "copy"


def test_no_op_calls_made_every_step_cost_no_recheck():
    """``model.to(same device)``, ``zero_grad(set_to_none=False)`` and re-setting a flag change nothing."""
    model = Net()
    ema = EMA(model, decay=0.5)
    ema.update()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.to("cpu").float()
    optimizer.zero_grad(set_to_none=False)
    model.body[0].weight.requires_grad_(True)
    model.body[0].weight.data = model.body[0].weight.data  # the same data
    ema.update()
    assert ema.shadow.rechecks == 0


def test_transposed_data_of_the_same_shape_is_followed():
    """``p.data = p.data.t()`` keeps the pointer and shape but not the layout: the plan must notice it."""
    run_followed(lambda m: setattr(m.body[2].weight, "data", m.body[2].weight.data.t()))
