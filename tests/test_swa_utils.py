"""polyak.swa_utils against torch.optim.swa_utils: same results where torch is right, and each deliberate difference."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
import torch.optim.swa_utils as ts
from models import FrozenBackbone, SmallCNN, TinyTransformer, train_steps
from opcount import SYNC, OpCounter
from torch import nn

import polyak.swa_utils as ps


def assert_same(ours: nn.Module, theirs: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Every tensor of the two state dicts agrees to float32 rounding (same keys, same dtypes)."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        if key.endswith(skip):
            continue
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], rtol=2e-5, atol=2e-6, msg=key)


def torch_ema_recipe(model: nn.Module, decay: float, device: str = "cpu") -> ts.AveragedModel:
    """torchvision's ExponentialMovingAverage, written out on torch's AveragedModel."""

    def ema_avg(avg, param, num_averaged):
        return decay * avg + (1 - decay) * param

    return ts.AveragedModel(model, device, ema_avg, use_buffers=True)


CASES = {
    "swa": lambda m: {},
    "swa buffers": lambda m: {"use_buffers": True},
    "ema avg_fn": lambda m: {"avg_fn": m.get_ema_avg_fn(0.9)},
    "ema multi_avg_fn buffers": lambda m: {"multi_avg_fn": m.get_ema_multi_avg_fn(0.8), "use_buffers": True},
    "swa multi_avg_fn cpu": lambda m: {"multi_avg_fn": m.get_swa_multi_avg_fn(), "device": "cpu"},
    "swa avg_fn buffers": lambda m: {"avg_fn": m.get_swa_avg_fn(), "use_buffers": True},
}


@pytest.mark.parametrize("helpers", ["torch", "polyak"])
@pytest.mark.parametrize(
    ("case", "factory"),
    [(case, SmallCNN) for case in CASES] + [("swa", TinyTransformer), ("ema multi_avg_fn buffers", TinyTransformer)],
)
def test_same_results_as_torch(case, helpers, factory):
    """Identical training through torch and polyak; with torch's helpers polyak calls them, with its own it
    runs the shadow kernel. Integer buffers are compared with the model instead (torch truncates them)."""
    torch.manual_seed(0)
    model = factory()
    theirs = ts.AveragedModel(model, **CASES[case](ts))
    ours = ps.AveragedModel(model, **CASES[case](ts if helpers == "torch" else ps))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def update():
        theirs.update_parameters(model)
        ours.update_parameters(model)

    train_steps(model, optimizer, 25, after_step=update)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 25
    assert_same(ours, theirs, skip=("num_batches_tracked",))
    for name, tensor in ours.module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, model.state_dict()[name])
    x = torch.randn(3, 3, 8, 8) if factory is SmallCNN else torch.randint(0, 50, (3, 12))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_exponential_moving_average_matches_torchvision_recipe_with_warmup_resets():
    """torchvision's train.py resets ``n_averaged`` with ``fill_(0)`` during LR warm-up so updates copy."""
    torch.manual_seed(1)
    model = SmallCNN()
    theirs = torch_ema_recipe(model, 0.95)
    ours = ps.ExponentialMovingAverage(model, decay=0.95, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step = 0

    def update():
        nonlocal step
        step += 1
        for averaged in (theirs, ours):
            averaged.update_parameters(model)
            if step <= 5:  # warm-up
                averaged.n_averaged.fill_(0)

    train_steps(model, optimizer, 20, after_step=update)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 15
    assert_same(ours, theirs, skip=("num_batches_tracked",))


def test_state_dict_loads_in_both_directions():
    torch.manual_seed(2)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    theirs = ts.AveragedModel(model, use_buffers=True)
    ours = ps.AveragedModel(model, use_buffers=True)
    train_steps(model, optimizer, 5, seed=1, after_step=lambda: theirs.update_parameters(model))
    assert list(ours.state_dict()) == list(theirs.state_dict())

    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer))  # torch -> polyak; the count comes back with it
    assert int(ours.n_averaged) == 5
    # Both continue: polyak from torch's checkpoint, torch from polyak's.
    again = ts.AveragedModel(model, use_buffers=True)
    again.load_state_dict(ours.state_dict())
    train_steps(
        model, optimizer, 5, seed=2, after_step=lambda: (ours.update_parameters(model), again.update_parameters(model))
    )
    assert int(ours.n_averaged) == int(again.n_averaged) == 10
    assert_same(ours, again, skip=("num_batches_tracked",))


def test_difference_compiled_model_is_looked_through():
    """The copy is the plain model (keys without ``_orig_mod.``); torch's checkpoint of it still loads."""
    model = nn.Linear(3, 2)
    compiled = torch.compile(model)  # never run: nothing is compiled
    theirs = ts.AveragedModel(compiled)
    ours = ps.AveragedModel(compiled)
    assert list(theirs.state_dict()) == ["n_averaged", "module._orig_mod.weight", "module._orig_mod.bias"]
    assert list(ours.state_dict()) == ["n_averaged", "module.weight", "module.bias"]
    with torch.no_grad():
        model.weight.add_(1.0)
    theirs.update_parameters(compiled)
    theirs.update_parameters(compiled)
    ours.load_state_dict(theirs.state_dict())
    assert int(ours.n_averaged) == 2
    torch.testing.assert_close(ours.module.weight, theirs.module._orig_mod.weight)
    ours.update_parameters(compiled)  # the wrapper is looked through when pairing, too


def test_polyak_helpers_work_in_torch_averaged_model():
    torch.manual_seed(3)
    model = TinyTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pairs = [
        (
            ts.AveragedModel(model, multi_avg_fn=ts.get_ema_multi_avg_fn(0.9)),
            ts.AveragedModel(model, multi_avg_fn=ps.get_ema_multi_avg_fn(0.9)),
        ),
        (ts.AveragedModel(model, avg_fn=ts.get_swa_avg_fn()), ts.AveragedModel(model, avg_fn=ps.get_swa_avg_fn())),
    ]
    train_steps(model, optimizer, 10, after_step=lambda: [m.update_parameters(model) for pair in pairs for m in pair])
    for theirs, ours in pairs:
        assert_same(ours, theirs)


# ----------------------------------------------------------------------------- deliberate differences


def test_difference_integer_buffers_are_copied_not_averaged():
    torch.manual_seed(4)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    averagers = {
        "swa": (ts.AveragedModel(model, use_buffers=True), ps.AveragedModel(model, use_buffers=True)),
        "ema": (torch_ema_recipe(model, 0.9), ps.ExponentialMovingAverage(model, 0.9)),
    }
    train_steps(
        model, optimizer, 30, after_step=lambda: [m.update_parameters(model) for p in averagers.values() for m in p]
    )
    true = model.features[1].num_batches_tracked
    assert int(true) == 30
    for theirs, ours in averagers.values():
        assert torch.equal(ours.module.features[1].num_batches_tracked, true)
        assert ours.module.features[1].num_batches_tracked.dtype == torch.int64
        assert int(theirs.module.features[1].num_batches_tracked) != 30  # torch truncates (1 or 20)


def test_difference_nonpersistent_buffers_are_not_averaged():
    """TinyTransformer's causal mask (-inf above the diagonal) is a non-persistent buffer."""
    model = TinyTransformer()
    theirs, ours = ts.AveragedModel(model, use_buffers=True), ps.AveragedModel(model, use_buffers=True)
    for _ in range(3):
        theirs.update_parameters(model)
        ours.update_parameters(model)
    assert torch.equal(ours.module.mask, model.mask)
    assert theirs.module.mask.isnan().any()


def test_difference_structure_mismatch_raises_naming_the_tensor():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    ours = ps.AveragedModel(model)
    wider = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"'2\.weight'.*shape \(2, 4\).*\(3, 4\)"):
        ours.update_parameters(wider)
    deeper = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"'3\.weight' is not in the average"):
        ours.update_parameters(deeper)
    ts.AveragedModel(model).update_parameters(deeper)  # torch: zips by position, silently


def test_difference_bf16_model_gets_a_float32_average():
    """A bf16 weight that jumps 0 -> 1, EMA with decay 0.999 for 1000 updates: exact value 1 - 0.999**1000."""
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.zero_()
    with pytest.warns(UserWarning, match="dtype=torch.float32"):
        stalls = ps.AveragedModel(model, multi_avg_fn=ps.get_ema_multi_avg_fn(0.999))
    fast = ps.AveragedModel(model, multi_avg_fn=ps.get_ema_multi_avg_fn(0.999), dtype=torch.float32)
    user_fn = ps.AveragedModel(model, multi_avg_fn=ts.get_ema_multi_avg_fn(0.999), dtype=torch.float32)
    per_tensor = ps.ExponentialMovingAverage(model, 0.999, dtype=torch.float32)
    upcast = ts.AveragedModel(model, multi_avg_fn=ts.get_ema_multi_avg_fn(0.999))
    upcast.module.float()  # the torch user's work-around
    averagers = [stalls, fast, user_fn, per_tensor]
    for averaged in [*averagers, upcast]:
        averaged.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(1000):
        for averaged in averagers:
            averaged.update_parameters(model)
    with pytest.raises(RuntimeError, match="dtype"):
        upcast.update_parameters(model)
    exact = 1 - 0.999**1000
    for averaged in averagers[1:]:
        assert averaged.module.weight.dtype == torch.float32
        assert abs(averaged.module.weight.item() - exact) < 1e-4
        assert averaged(torch.ones(1, 1)).dtype == torch.float32  # forward works in float32
    assert abs(stalls.module.weight.item() - exact) > 0.1  # bf16 stalls (torch's behaviour)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_buffers": True},
        {"multi_avg_fn": ts.get_ema_multi_avg_fn(0.9)},
        {"avg_fn": ts.get_ema_avg_fn(0.9)},
        {"multi_avg_fn": ps.get_ema_multi_avg_fn(0.9)},
    ],
    ids=["swa", "swa buffers", "torch multi", "torch per tensor", "polyak ema"],
)
def test_difference_no_host_synchronisation_per_update(options):
    """No tensor is read into Python during an update; torch reads ``n_averaged`` twice."""
    model = SmallCNN()
    ours, theirs = ps.AveragedModel(model, **options), ts.AveragedModel(model, **options)
    for averaged in (ours, theirs):
        averaged.update_parameters(model)
        with OpCounter() as recorded:
            averaged.update_parameters(model)
        assert (SYNC in " ".join(recorded.ops)) == (averaged is theirs), recorded.ops
    assert int(ours.n_averaged) == 2


def test_kernels_per_update_do_not_grow_with_tensor_count():
    """The default and polyak's helpers: one lerp per device and dtype, one fill of ``n_averaged``."""
    wide = nn.Sequential(*[nn.Linear(4, 4) for _ in range(100)])
    for options in ({}, {"multi_avg_fn": ps.get_ema_multi_avg_fn(0.9)}, {"avg_fn": ps.get_swa_avg_fn()}):
        ours = ps.AveragedModel(wide, **options)
        ours.update_parameters(wide)
        with OpCounter() as recorded:
            ours.update_parameters(wide)
        assert len(recorded.ops) == 2, recorded.ops


def test_difference_channels_last_bf16_model_with_float32_average():
    """Averaged tensors that are not contiguous (channels_last) and larger than the staging chunk."""
    torch.manual_seed(8)
    model = nn.Conv2d(384, 384, 3).to(torch.bfloat16, memory_format=torch.channels_last)
    ours = ps.AveragedModel(model, dtype=torch.float32)
    reference = model.weight.detach().double()
    ours.update_parameters(model)
    for n in range(1, 3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ours.update_parameters(model)
        reference += (model.weight.detach().double() - reference) / (n + 1)
    assert ours.module.weight.dtype == torch.float32
    torch.testing.assert_close(ours.module.weight.double(), reference, rtol=1e-6, atol=1e-6)


class WeightNormed(nn.Module):
    """The hook-based (deprecated) weight_norm keeps a computed ``weight`` that copy.deepcopy refuses."""

    def __init__(self) -> None:
        super().__init__()
        with pytest.warns(FutureWarning):
            self.linear = nn.utils.weight_norm(nn.Linear(3, 2))

    def forward(self, x):
        return self.linear(x)


def test_difference_copies_models_deepcopy_refuses():
    torch.manual_seed(5)
    model = WeightNormed()
    with pytest.raises(RuntimeError, match="deepcopy"):
        ts.AveragedModel(model)
    ours = ps.AveragedModel(model)
    reference: dict[str, torch.Tensor] = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(10):
        loss = model(torch.randn(4, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update_parameters(model)
        for name, p in model.named_parameters():
            value = p.detach().double()
            reference[name] = value if step == 0 else reference[name] + (value - reference[name]) / (step + 1)
    for name, p in ours.module.named_parameters():
        torch.testing.assert_close(p.double(), reference[name], rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 3)
    expected = nn.functional.linear(
        x.double(),
        torch._weight_norm(reference["linear.weight_v"], reference["linear.weight_g"]),
        reference["linear.bias"],
    )
    torch.testing.assert_close(ours(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_parametrized_modules_like_torch():
    """Parametrizations (weight_norm, spectral_norm): the originals are averaged, the buffers of the
    parametrization (spectral norm's power-iteration vectors) follow the buffer policy, as torch."""
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)),
        nn.Tanh(),
        nn.utils.parametrizations.spectral_norm(nn.Linear(6, 2)),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pairs = [(ts.AveragedModel(model, use_buffers=b), ps.AveragedModel(model, use_buffers=b)) for b in (False, True)]
    for _ in range(8):
        loss = model(torch.randn(5, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for pair in pairs:
            for averaged in pair:
                averaged.update_parameters(model)
    for theirs, ours in pairs:
        assert_same(ours, theirs)
        x = torch.randn(3, 4)
        torch.testing.assert_close(ours(x), theirs(x))


def test_uncopyable_model_error_points_to_shadow_only_mode():
    model = nn.Linear(2, 2)
    model.lock = threading.Lock()
    with pytest.raises(RuntimeError, match=r"Linear.*polyak\.EMA"):
        ps.AveragedModel(model)


# ----------------------------------------------------------------------------- behaviour kept from torch


def test_both_functions_raise():
    with pytest.raises(ValueError, match="at most one of avg_fn and multi_avg_fn"):
        ps.AveragedModel(nn.Linear(2, 2), avg_fn=ps.get_swa_avg_fn(), multi_avg_fn=ps.get_swa_multi_avg_fn())
    with pytest.raises(ValueError, match="never update"):
        ps.get_ema_multi_avg_fn(1.0)
    with pytest.raises(TypeError, match="dtype"):
        ps.AveragedModel(nn.Linear(2, 2), dtype=torch.int32)


def test_frozen_parameters_and_buffers_follow_torch():
    """Frozen parameters are averaged like the others and buffers copied (use_buffers=False), as torch."""
    torch.manual_seed(6)
    model = FrozenBackbone()
    theirs, ours = ts.AveragedModel(model), ps.AveragedModel(model)
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    updates = 0

    def update():
        nonlocal updates
        updates += 1
        if updates == 4:  # unfreeze mid-run: averaged from then on
            model.backbone.requires_grad_(True)
            optimizer.add_param_group({"params": model.backbone.parameters()})
        theirs.update_parameters(model)
        ours.update_parameters(model)

    train_steps(model, optimizer, 10, after_step=update)
    assert_same(ours, theirs)
    assert not torch.equal(ours.module.backbone[0].weight, model.backbone[0].weight)


def test_converting_the_module_moves_the_average():
    torch.manual_seed(7)
    model = nn.Linear(3, 3)
    ours = ps.AveragedModel(model)
    theirs = ts.AveragedModel(model)
    for averaged in (ours, theirs):
        averaged.update_parameters(model)
        averaged.double()
    with torch.no_grad():
        model.weight.add_(1.0)
    for averaged in (ours, theirs):
        averaged.update_parameters(model)
    assert ours.module.weight.dtype == torch.float64
    torch.testing.assert_close(ours.module.weight, theirs.module.weight)


def test_pickle_and_deepcopy():
    model = SmallCNN()
    ours = ps.AveragedModel(model, use_buffers=True)
    ours.update_parameters(model)
    twin = copy.deepcopy(ours)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    for averaged in (ours, twin, loaded):
        averaged.update_parameters(model)
        assert int(averaged.n_averaged) == 2
    assert_same(twin, ours)
    assert_same(loaded, ours)


def test_a_copy_cast_at_construction_is_not_taken_for_a_recast_model():
    """AveragedModel(dtype=float32) of a float64 model copies its buffers into float32, as torch does; the
    change detection must not refuse that as a model re-cast since (the fuzz suite found it)."""
    model = nn.BatchNorm1d(3).double()
    averaged = ps.AveragedModel(model, dtype=torch.float32)  # use_buffers=False: buffers are copied
    for _ in range(3):
        model(torch.randn(4, 3, dtype=torch.float64))
        averaged.update_parameters(model)
    assert averaged.module.running_mean.dtype == torch.float32
    assert torch.equal(averaged.module.running_mean, model.running_mean.float())
    model.half()  # a real re-cast after construction: followed (narrower than the copy)
    averaged.update_parameters(model)
    assert torch.equal(averaged.module.running_mean, model.running_mean.float())
