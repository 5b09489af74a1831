"""The shadow: selection, pairing by name, precision, kernels, swap, state."""

from __future__ import annotations

import copy

import pytest
import torch
from models import FrozenBackbone, SmallCNN, TinyTransformer, train_steps
from opcount import OpCounter
from torch import nn

from polyak import EMA, Shadow


def float64_reference(model: nn.Module, shadow: Shadow, weight: float, ref: dict[str, torch.Tensor]) -> None:
    """Apply one update to a float64 copy of what the shadow should hold."""
    live = dict(model.state_dict(keep_vars=True))
    for name, mode in shadow.modes().items():
        value = live[name].detach()
        if mode == "copy" or name not in ref:
            ref[name] = value.clone() if mode == "copy" else value.double().clone()
        else:
            ref[name] += weight * (value.double() - ref[name])


def test_selection_policy():
    model = FrozenBackbone()
    shadow = Shadow(model)
    assert shadow.modes() == {
        "backbone.0.weight": "copy",  # frozen parameters are copied
        "backbone.0.bias": "copy",
        "head.weight": "average",
        "head.bias": "average",
        "seen": "copy",  # integer buffer
        "flag": "copy",  # bool buffer
        "scale": "average",  # floating buffer
    }
    assert set(Shadow(model, frozen="skip", buffers="skip").modes()) == {"head.weight", "head.bias"}
    assert "scale" not in Shadow(model, exclude=["sc*"]).modes()
    assert Shadow(model, buffers="copy").modes()["scale"] == "copy"


def test_tied_weights_are_stored_once_and_nonpersistent_buffers_skipped():
    model = TinyTransformer()
    names = Shadow(model).names
    assert "embed.weight" in names and "lm_head.weight" not in names
    assert "mask" not in names
    assert "mask" in Shadow(model, include_nonpersistent=True).names
    expected = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
    assert sum(t.numel() for t in Shadow(model).tensors().values()) == expected


@pytest.mark.parametrize("factory", [SmallCNN, TinyTransformer, FrozenBackbone])
def test_update_matches_float64_reference(factory):
    torch.manual_seed(0)
    model = factory()
    shadow = Shadow(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref: dict[str, torch.Tensor] = {}
    float64_reference(model, shadow, 1.0, ref)
    for step in range(30):
        train_steps(model, optimizer, 1, seed=step)
        weight = 0.1 if step % 2 else 0.25
        shadow.update(model, weight)
        float64_reference(model, shadow, weight, ref)
    for name, value in shadow.tensors().items():
        if shadow.modes()[name] == "copy":
            assert torch.equal(value, ref[name]), name
        else:
            torch.testing.assert_close(value.double(), ref[name], rtol=1e-6, atol=1e-6, msg=name)


def test_bf16_model_tracks_float64():
    """decay 0.9999, 10k steps after a 0 -> 1 jump: a bf16 average stalls at ~0.03; ours reads 1 - 0.9999**10000."""
    model = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.9999)
    stalled = EMA(model, decay=0.9999, dtype=torch.bfloat16)  # the explicit opt-in shows the defect
    ema.update()
    stalled.update()
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(10_000):
        ema.update()
        stalled.update()
    average = ema.shadow.tensors()["weight"]
    assert average.dtype == torch.float32
    exact = 1 - 0.9999**10_000
    assert (average.double() - exact).abs().max().item() < 1e-5
    stuck = stalled.shadow.tensors()["weight"]
    assert stuck.dtype == torch.bfloat16 and stuck.double().max().item() < 0.1 < exact  # stalled near 0.03


def test_cast_path_over_many_chunks(monkeypatch):
    """bf16 model, float32 shadow, tensors larger and smaller than the staging buffer."""
    monkeypatch.setattr("polyak.kernels.CHUNK", 100)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 3), nn.Linear(3, 1)).to(torch.bfloat16)
    shadow = Shadow(model)
    ref = {k: v.double().clone() for k, v in shadow.tensors().items()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
        shadow.update(model, 0.3)
        for name, p in model.named_parameters():
            ref[name] += 0.3 * (p.detach().double() - ref[name])
    for name, value in shadow.tensors().items():
        torch.testing.assert_close(value.double(), ref[name], rtol=1e-6, atol=1e-6, msg=name)


def test_wrappers_are_looked_through():
    model = SmallCNN()
    shadow = Shadow(nn.DataParallel(model))
    assert shadow.names == Shadow(model).names
    compiled = torch.compile(model)  # not run: only the wrapper's naming matters here
    assert Shadow(compiled).names == shadow.names
    shadow.update(compiled, 0.5)
    shadow.update(model, 0.5)


def test_structure_mismatch_names_the_tensor():
    shadow = Shadow(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"'1.weight'.*\(2, 3\).*\(5, 3\)"):
        shadow.update(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5)), 0.5)
    with pytest.raises(ValueError, match=r"no tensor '1.weight'"):
        shadow.update(nn.Sequential(nn.Linear(4, 3)), 0.5)
    with pytest.raises(ValueError, match=r"'2.weight' is not in the average"):
        shadow.update(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2)), 0.5)


def test_replaced_tensors_and_modules_are_noticed():
    """The cached pairing follows buffer reassignment and submodule replacement."""
    model = SmallCNN()
    shadow = Shadow(model)
    shadow.update(model, 0.5)
    model.features[1].running_mean = torch.full((8,), 4.0)  # a new buffer object
    model.head = nn.Linear(16, 10)  # a new module
    with torch.no_grad():
        model.head.weight.fill_(2.0)
    shadow.update(model, 1.0)
    assert torch.equal(shadow.tensors()["features.1.running_mean"], torch.full((8,), 4.0))
    assert torch.equal(shadow.tensors()["head.weight"], torch.full((10, 16), 2.0))


def test_swap_restores_exactly_even_on_error():
    model = SmallCNN()
    shadow = Shadow(model)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError), shadow.swapped(model):
        for name, value in shadow.tensors().items():
            assert torch.equal(model.state_dict()[name], value.to(before[name].dtype))
        raise KeyError("boom")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def count_update_ops(model: nn.Module, **options) -> list[str]:
    shadow = Shadow(model, **options)
    shadow.update(model, 0.5)  # build the cached plan
    with OpCounter() as counter:
        shadow.update(model, 0.5)
    return counter.ops


@pytest.mark.parametrize("factory", [SmallCNN, TinyTransformer, FrozenBackbone])
def test_ops_per_update_do_not_grow_with_tensor_count(factory):
    ops = count_update_ops(factory())
    assert not any("_local_scalar_dense" in op or "item" in op for op in ops), ops
    assert len(ops) <= 3, ops  # one lerp for the floating group, one copy for the integer/frozen group
    wide = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])
    assert len(count_update_ops(wide)) == 1


def test_ops_for_bf16_model_scale_with_size_not_tensor_count():
    small_tensors = nn.Sequential(*[nn.Linear(8, 8) for _ in range(300)]).to(torch.bfloat16)
    ops = count_update_ops(small_tensors)
    assert ops == ["aten._foreach_copy_.default", "aten.lerp_.Scalar"], ops
    assert not any("empty" in op for op in ops)


def test_state_dict_round_trip_and_mismatch():
    model = SmallCNN()
    shadow = Shadow(model)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    shadow.update(model, 0.3)
    other = Shadow(SmallCNN())
    other.load_state_dict({k: v.clone() for k, v in shadow.state_dict().items()})
    for name, value in shadow.tensors().items():
        assert torch.equal(other.tensors()[name], value)
    broken = dict(shadow.state_dict())
    broken["head.weight"] = torch.zeros(3, 3)
    before = {k: v.clone() for k, v in other.tensors().items()}
    with pytest.raises(ValueError, match=r"'head.weight' has shape"):
        other.load_state_dict(broken)
    assert all(torch.equal(before[k], v) for k, v in other.tensors().items())  # nothing changed
    broken["head.weight"] = shadow.state_dict()["head.weight"].double()  # right shape, another precision
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(\d+, \d+\) and dtype torch.float64"):
        other.load_state_dict(broken)
    assert all(torch.equal(before[k], v) for k, v in other.tensors().items())
    del broken["head.weight"]
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(broken)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="buffers: expected one of"):
        Shadow(SmallCNN(), buffers="mean")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype"):
        Shadow(SmallCNN(), dtype=torch.int32)
    with pytest.raises(TypeError, match="exclude: expected a sequence of glob patterns"):
        Shadow(SmallCNN(), exclude="*.bias")  # one pattern, not the patterns "*", ".", "b", ...


class ComplexFilter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.taps = nn.Parameter(torch.randn(6, dtype=torch.complex64))
        self.scale = nn.Parameter(torch.randn(3))


def test_a_complex_parameter_keeps_its_imaginary_part_in_a_wider_average():
    """``dtype=torch.float64`` stores a complex64 parameter's average as complex128, tracking a complex128
    reference of ``a <- a + w (p - a)`` in both parts."""
    torch.manual_seed(0)
    model = ComplexFilter()
    shadow = Shadow(model, dtype=torch.float64)
    wide = {True: torch.complex128, False: torch.float64}
    ref = {n: p.detach().to(wide[p.is_complex()]) for n, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        shadow.update(model, 0.3)
        for n, p in model.named_parameters():
            ref[n] = ref[n] + 0.3 * (p.detach().to(ref[n].dtype) - ref[n])
    held = shadow.tensors()
    assert held["taps"].dtype == torch.complex128 and held["scale"].dtype == torch.float64
    assert ref["taps"].imag.abs().min() > 0
    for n, expected in ref.items():
        torch.testing.assert_close(held[n], expected, rtol=0, atol=1e-12)


def test_adopted_storage_is_the_module_and_one_kernel_per_group():
    torch.manual_seed(0)
    model = SmallCNN()
    average = copy.deepcopy(model)
    shadow = Shadow(average, adopt=True)
    assert all(shadow.tensors()[n].data_ptr() == t.data_ptr() for n, t in average.state_dict().items())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref: dict[str, torch.Tensor] = {}
    float64_reference(model, shadow, 1.0, ref)
    shadow.update(model, 1.0)
    for _ in range(5):
        train_steps(model, optimizer, 1)
        shadow.update(model, 0.3)
        float64_reference(model, shadow, 0.3, ref)
    for name, value in average.state_dict().items():
        torch.testing.assert_close(value.double(), ref[name].double(), rtol=1e-6, atol=1e-6)
    wide = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])
    adopted = Shadow(copy.deepcopy(wide), adopt=True)
    adopted.update(wide, 0.5)
    with OpCounter() as counter:
        adopted.update(wide, 0.5)
    assert len(counter.ops) == 1, counter.ops
    with pytest.raises(ValueError, match="adopt"):
        Shadow(wide, adopt=True, dtype=torch.float64)


def test_apply_calls_the_function_once_per_group():
    """A caller's own update (swa_utils' avg_fn) runs once per group, with converted model tensors."""
    model = FrozenBackbone()
    shadow = Shadow(model.double(), dtype=torch.float64)
    calls = []

    def halve(shadows, models):
        calls.append((len(shadows), {m.dtype for m in models}))
        torch._foreach_lerp_(shadows, models, 0.5)

    before = shadow.tensors()["head.bias"].clone()
    shadow.apply(model.float(), halve)  # averaged tensors are float64, the model float32: passed converted
    assert calls == [(3, {torch.float64})]  # head.weight, head.bias, scale
    expected = before + 0.5 * (model.head.bias.detach().double() - before)
    torch.testing.assert_close(shadow.tensors()["head.bias"], expected)


def test_tied_names_are_saved_as_aliases_and_load_strictly():
    model = TinyTransformer()
    shadow = Shadow(model)
    state = shadow.state_dict()
    assert shadow.aliases == {"lm_head.weight": "embed.weight"}
    assert state["lm_head.weight"] is state["embed.weight"]
    fresh = TinyTransformer()
    fresh.load_state_dict(state)  # strict: every name of the model is there
    assert torch.equal(fresh.lm_head.weight, state["embed.weight"])
    Shadow(TinyTransformer()).load_state_dict(state)  # the alias is accepted, not reported as unexpected


def test_an_fsdp1_flat_parameter_is_refused_naming_fsdp2():
    """FSDP1 marks its flat parameters (fragments of several parameters) with torch's ``_set_fsdp_flattened``;
    paired by name they would be averaged as the wrong tensors, so the averager refuses them, pointing at FSDP2."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    model = nn.Linear(3, 2)
    _set_fsdp_flattened(model.weight)
    with pytest.raises(RuntimeError, match=r"FSDP1 .*fully_shard"):
        EMA(model, decay=0.9)
