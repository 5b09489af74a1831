"""Non-finite model values: nonfinite="propagate" | "skip" | "raise", the skip counter, GradScaler steps."""

from __future__ import annotations

import pytest
import torch
from models import FrozenBackbone, SmallCNN, TinyTransformer, train_steps
from opcount import OpCounter
from torch import nn

import polyak
from polyak import Shadow

BAD = [float("nan"), float("inf"), float("-inf")]


def bf16_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)


def mixed() -> nn.Module:
    """A float32 part (direct lerp), a bf16 part (staged cast) and an empty weight."""
    return nn.ModuleDict({"f32": nn.Linear(4, 3), "bf16": nn.Linear(3, 2).to(torch.bfloat16), "empty": nn.Linear(0, 2)})


def snapshot(averager: polyak.Averager) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in averager.shadow.tensors().items()}


def poison(model: nn.Module, value: float, index: int = 0) -> str:
    """Write ``value`` into one element of the ``index``-th trainable parameter; returns its name."""
    name, param = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel()][index]
    with torch.no_grad():
        param.view(-1)[param.numel() // 2] = value
    return name


def perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p.dtype))


@pytest.mark.parametrize("factory", [SmallCNN, TinyTransformer, FrozenBackbone, bf16_mlp, mixed])
@pytest.mark.parametrize("bad", BAD)
def test_skip_keeps_average_bit_for_bit_then_tracks_float64(factory, bad):
    torch.manual_seed(0)
    model = factory()
    ema = polyak.EMA(model, decay=0.9, nonfinite="skip")
    modes = ema.shadow.modes()
    reference: dict[str, torch.Tensor] = {}
    for step in range(6):
        perturb(model, step)
        ema.update()
        live = {n: t.detach() for n, t in model.state_dict(keep_vars=True).items()}
        for name, mode in modes.items():
            if mode == "copy" or step == 0:
                reference[name] = live[name].double() if mode == "average" else live[name].clone()
            else:
                reference[name] += (1 - 0.9) * (live[name].double() - reference[name])
        if step == 2:  # a bad step: the average must not move, the counter must
            before = snapshot(ema)
            name = poison(model, bad, index=step % 2)
            ema.update()
            assert ema.skipped_updates == 1
            for key, value in ema.shadow.tensors().items():
                if modes[key] == "average":
                    assert torch.equal(value, before[key]), (name, key)
            perturb(model, 100)  # repair the model for the rest of the run
            with torch.no_grad():
                for key, p in model.named_parameters():
                    p.nan_to_num_(0.0, 0.0, 0.0) if key == name else None
    assert ema.skipped_updates == 1 and ema.num_updates == 7 and ema.step == 7
    for name, value in ema.shadow.tensors().items():
        if modes[name] == "copy":
            assert torch.equal(value, reference[name]), name
        else:
            torch.testing.assert_close(value.double(), reference[name], rtol=1e-6, atol=1e-6, msg=name)


def test_skip_on_the_first_update_keeps_the_initial_copy():
    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.99, nonfinite="skip")
    initial = snapshot(ema)
    poison(model, float("nan"))
    ema.update()  # weight 1.0: would copy the model
    assert ema.skipped_updates == 1 and ema.num_updates == 1
    assert all(torch.equal(v, initial[k]) for k, v in ema.shadow.tensors().items())


def test_skip_counts_without_host_sync_and_ops_do_not_grow_with_tensors():
    def ops_for(model: nn.Module) -> list[str]:
        ema = polyak.EMA(model, decay=0.9, nonfinite="skip")
        ema.update()
        ema.update()  # plan and staging built
        with OpCounter() as counter:
            ema.update()
        return counter.ops

    narrow = ops_for(nn.Sequential(*[nn.Linear(4, 4) for _ in range(2)]))
    wide = ops_for(nn.Sequential(*[nn.Linear(4, 4) for _ in range(300)]))
    assert narrow == wide, (narrow, wide)
    assert not any("_local_scalar_dense" in op or "item" in op for op in wide), wide
    # flag: norm, stack, lt, all; stage: copy, where, lerp; counter: not, add
    assert len(wide) <= 9, wide


def test_propagate_is_the_default_and_lets_nan_in():
    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.9)
    assert ema.options.nonfinite == "propagate"
    ema.update()
    name = poison(model, float("nan"))
    ema.update()
    assert torch.isnan(ema.shadow.tensors()[name]).sum() == 1
    assert ema.skipped_updates == 0


@pytest.mark.parametrize("bad", BAD)
def test_raise_names_the_tensor_and_changes_nothing(bad):
    model = mixed()
    ema = polyak.EMA(model, decay=0.9, nonfinite="raise")
    ema.update()
    before = snapshot(ema)
    name = poison(model, bad, index=2)
    with pytest.raises(RuntimeError, match=rf"model tensor '{name}' holds inf or NaN \(1 of"):
        ema.update()
    assert ema.step == 1 and ema.num_updates == 1
    assert all(torch.equal(v, before[k]) for k, v in ema.shadow.tensors().items())


def test_shadow_skip_with_tensor_weight_and_nothing_averaged():
    model = mixed()
    shadow = Shadow(model)
    weight = torch.tensor(0.25)
    before = {k: v.clone() for k, v in shadow.tensors().items()}
    poison(model, float("inf"), index=1)
    applied = shadow.update(model, weight, nonfinite="skip")
    assert applied is not None and applied.dtype == torch.bool and applied.dim() == 0 and not applied
    assert all(torch.equal(v, before[k]) for k, v in shadow.tensors().items())
    only_copies = Shadow(FrozenBackbone(), buffers="skip", frozen="copy", exclude=["head.*"])
    assert set(only_copies.modes().values()) == {"copy"}
    assert only_copies.update(FrozenBackbone(), 0.5, nonfinite="skip") is None


def test_skip_counter_survives_state_dict():
    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.9, nonfinite="skip")
    ema.update()
    poison(model, float("nan"))
    ema.update()
    ema.update()
    state = ema.state_dict()
    assert state["skipped_updates"] == 2
    other = polyak.EMA(nn.Linear(3, 2), decay=0.9, nonfinite="skip")
    other.load_state_dict(state)
    assert other.skipped_updates == 2
    state["skipped_updates"] = -1
    with pytest.raises(ValueError, match=r"skipped_updates=-1; expected an int in \[0, 2\*\*63\)"):
        other.load_state_dict(state)


def test_bad_option_is_named():
    with pytest.raises(ValueError, match="nonfinite: expected one of"):
        polyak.EMA(nn.Linear(2, 2), decay=0.9, nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonfinite: expected one of"):
        Shadow(nn.Linear(2, 2)).update(nn.Linear(2, 2), 0.5, nonfinite="drop")  # type: ignore[arg-type]


def test_grad_scaler_skipped_step_is_not_a_step():
    """GradScaler skips optimizer.step() on inf/NaN gradients: the hook does not fire, time does not advance."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    ema = polyak.EMA(model, decay=0.5, nonfinite="skip")
    ema.attach(optimizer)
    steps = []
    for i in range(4):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        if i == 1:
            model.weight.grad[0, 0] = float("nan")
        scaler.step(optimizer)
        scaler.update()
        steps.append(ema.step)
    assert steps == [1, 1, 2, 3]
    assert ema.skipped_updates == 0 and torch.isfinite(ema.shadow.tensors()["weight"]).all()


def test_diverging_optimizer_step_is_skipped_from_the_hook():
    """An optimizer step that does run but leaves inf in the weights is counted and left out."""
    model = nn.Linear(6, 1)  # train_steps feeds it batches of 6 features
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ema = polyak.EMA(model, decay=0.5, nonfinite="skip")
    ema.attach(optimizer)
    train_steps(model, optimizer, 2)
    before = snapshot(ema)
    model.weight.grad = torch.full_like(model.weight, float("-inf"))
    model.bias.grad = torch.zeros_like(model.bias)
    optimizer.step()  # SGD without a scaler applies the inf gradient
    assert not torch.isfinite(model.weight).all()
    assert ema.step == 3 and ema.skipped_updates == 1
    assert all(torch.equal(v, before[k]) for k, v in ema.shadow.tensors().items())


def test_large_finite_half_precision_model_is_not_skipped():
    """The finiteness check must not overflow: this float16 weight's 2-norm (~1e5) is beyond float16's range."""
    model = nn.Linear(400, 300, bias=False).half()
    ema = polyak.EMA(model, decay=0.5, nonfinite="skip")
    with torch.no_grad():
        model.weight.fill_(300.0)
    ema.update()
    ema.update()
    assert ema.skipped_updates == 0
    assert torch.equal(ema.shadow.tensors()["weight"], torch.full((300, 400), 300.0))


# ----------------------------------------------------------------- exactness of the check, every float dtype

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def huge_finite(dtype: torch.dtype) -> list[torch.Tensor]:
    """Finite tensors whose squares or sums overflow in their own dtype (and in float32 for the 16-bit ones)."""
    big = torch.finfo(dtype).max
    cases = [
        torch.full((2,), big, dtype=dtype),
        torch.full((4096,), big, dtype=dtype),
        torch.tensor([big, -big] * 8, dtype=dtype),  # signs alternate: a plain sum could cancel, |x| cannot
        torch.tensor([torch.finfo(dtype).tiny, big, 0.0, -big], dtype=dtype),
    ]
    if dtype == torch.float32:  # the examples that were skipped as non-finite
        cases += [torch.full((2,), 2e19), torch.full((4096,), 1e18), torch.full((16,), 1e38)]
    return cases


@pytest.mark.parametrize("dtype", [*FLOATS, torch.complex64, torch.complex128], ids=str)
def test_all_finite_is_exact_for_the_largest_values_and_every_bad_position(dtype):
    from polyak.kernels import all_finite

    real = dtype.to_real()
    bad_values = [complex(b, 0.0) for b in BAD] + [complex(0.0, b) for b in BAD] if dtype.is_complex else BAD
    for huge in huge_finite(real):
        if dtype.is_complex:
            huge = torch.complex(huge, huge.flip(0))  # largest real and imaginary parts together
        group = [torch.ones(3, dtype=dtype), huge, torch.empty(0, dtype=dtype)]
        assert bool(all_finite(group)), (dtype, huge[:4])
        for bad in bad_values:
            for position in range(huge.numel() if huge.numel() < 20 else 3):
                poisoned = huge.clone()
                poisoned[position] = bad
                flag = all_finite([group[0], poisoned, group[2]])
                assert flag.dtype == torch.bool and flag.dim() == 0
                assert not bool(flag), (dtype, bad, position)
            for index in (0, 1):  # the bad value in each tensor of the group, at its end
                poisoned_group = [t.clone() for t in group]
                poisoned_group[index][-1] = bad
                assert not bool(all_finite(poisoned_group)), (dtype, bad, index)
    assert bool(all_finite([torch.empty(0, dtype=dtype)]))


def huge_linear(dtype: torch.dtype, value: float) -> nn.Module:
    model = nn.Linear(8, 4).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_skip_and_raise_agree_on_huge_finite_and_every_bad_position(dtype, scale):
    """The largest finite values are averaged in both modes; inf/NaN anywhere is skipped by one, refused by another."""
    value = torch.finfo(dtype).max * scale
    model = huge_linear(dtype, value)
    skip = polyak.EMA(model, decay=0.9, nonfinite="skip")
    strict = polyak.EMA(model, decay=0.9, nonfinite="raise")
    for _ in range(2):
        skip.update()
        strict.update()
    assert skip.skipped_updates == 0 and skip.num_updates == 2 and strict.num_updates == 2
    for averager in (skip, strict):
        for name, tensor in averager.shadow.tensors().items():
            assert torch.equal(tensor, torch.full_like(tensor, value)), (dtype, name)
    for name, p in model.named_parameters():
        for position in range(p.numel()):
            for bad in BAD:
                with torch.no_grad():
                    p.view(-1)[position] = bad
                skip.update()
                with pytest.raises(RuntimeError, match=f"model tensor '{name}' holds inf or NaN"):
                    strict.update()
                with torch.no_grad():
                    p.view(-1)[position] = value
    bad_updates = sum(p.numel() for p in model.parameters()) * len(BAD)
    assert skip.skipped_updates == bad_updates and strict.num_updates == 2


def test_skip_with_huge_values_keeps_zero_host_syncs():
    model = huge_linear(torch.float32, 1e38)
    ema = polyak.EMA(model, decay=0.9, nonfinite="skip")
    ema.update()
    ema.update()
    with OpCounter() as counter:
        ema.update()
    assert ema.skipped_updates == 0
    assert not any("_local_scalar_dense" in op or "item" in op for op in counter.ops), counter.ops


@pytest.mark.parametrize("decays", [(0.5, 0.75), (0.5, 0.75, 0.9)])
def test_skip_with_several_averages_over_an_unfrozen_parameter_tracks_float64(decays):
    """K guarded averages whose tensors do not lie in one buffer (a parameter copied while frozen, then unfrozen:
    its average continues in the copy's storage) are folded piece by piece through a spare chunk: each average
    follows its own float64 EMA, and a NaN step leaves all of them bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].requires_grad_(False)
    multi = polyak.MultiEMA(model, decays, nonfinite="skip")
    model[0].requires_grad_(True)  # averaged from now on, starting from its copy
    references = [{n: p.detach().double().clone() for n, p in model.named_parameters()} for _ in decays]
    for i in range(4):
        perturb(model, i)
        multi.update()
        for reference, decay in zip(references, decays, strict=True):
            weight = 1.0 if i == 0 else 1.0 - decay  # the first update copies
            for n, p in model.named_parameters():
                reference[n] += weight * (p.detach().double() - reference[n])
    held = [{n: t.clone() for n, t in multi.shadow.tensors(k).items()} for k in range(len(decays))]
    poison(model, float("nan"))
    multi.update()
    assert multi.skipped_updates == 1
    for k, reference in enumerate(references):
        for n, expected in reference.items():
            assert torch.equal(multi.shadow.tensors(k)[n], held[k][n]), (k, n)
            torch.testing.assert_close(held[k][n].double(), expected, rtol=0, atol=1e-6, msg=f"{k} {n}")


def test_a_refused_lazy_first_update_leaves_the_averager_as_built():
    """nonfinite="raise" refuses a lazy averager's first update before anything changes: no step, no storage;
    the next, finite update is then its first and copies the model."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = polyak.EMA(model, decay=0.5, lazy=True, nonfinite="raise")
    name = poison(model, float("nan"))
    with pytest.raises(RuntimeError, match="inf or NaN"):
        ema.update()
    assert (ema.step, ema.num_updates) == (0, 0)
    with pytest.raises(RuntimeError, match="no average yet"):
        ema.shadow  # noqa: B018
    assert ema.state_dict()["shadow"] is None
    poison(model, 0.5)
    ema.update()
    assert dict(model.named_parameters())[name].isfinite().all()
    for n, p in model.named_parameters():
        assert torch.equal(ema.shadow.tensors()[n], p.detach()), n


def test_a_loaded_state_whose_first_copy_was_skipped_copies_at_the_next_update():
    """A lazy averager whose first update was skipped holds no copy of the model yet (``started`` False in its
    state); loaded elsewhere, its next finite update copies the model, whatever the saved tensors hold."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = polyak.EMA(model, decay=0.5, lazy=True, nonfinite="skip")
    poison(model, float("nan"))
    ema.update()
    state = ema.state_dict()
    assert state["started"] is False and state["skipped_updates"] == 1
    state["shadow"] = {n: torch.full_like(v, 7.0) for n, v in state["shadow"].items()}  # defined, not garbage
    poison(model, 0.5)
    resumed = polyak.EMA(model, decay=0.5, lazy=True, nonfinite="skip")
    resumed.load_state_dict(state)
    resumed.update()
    for n, p in model.named_parameters():
        assert torch.equal(resumed.shadow.tensors()[n], p.detach()), n
