"""Swaps: exact restore on any exit, refused nesting, marked state dicts, refused before the first update."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from models import FrozenBackbone, SmallCNN, TinyTransformer, train_steps
from torch import nn

import polyak


def trained(factory):
    torch.manual_seed(0)
    model = factory()
    ema = polyak.EMA(model, decay=0.5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_steps(model, optimizer, 3, after_step=ema.update)
    train_steps(model, optimizer, 1, seed=1)  # the model now differs from the average
    return model, ema


def exact_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_holds(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict(keep_vars=True).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("factory", [SmallCNN, TinyTransformer, FrozenBackbone])
@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_any_exception_restores_training_weights_exactly(factory, error):
    model, ema = trained(factory)
    before = exact_copy(model)
    parameters = [id(p) for p in model.parameters()]
    with pytest.raises(error), ema.swapped():
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # evaluation code that even writes to the weights
        raise error("boom")
    assert_holds(model, before)
    assert [id(p) for p in model.parameters()] == parameters  # same objects: optimizers keep working
    with ema.swapped():  # and the averager is usable again
        pass


def test_failure_while_swapping_in_restores(monkeypatch):
    model, ema = trained(SmallCNN)
    before = exact_copy(model)
    real = torch._foreach_copy_

    def fails_half_way(targets, sources):
        real(targets[:2], sources[:2])
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "_foreach_copy_", fails_half_way)
        with pytest.raises(RuntimeError, match="device lost"), ema.swapped():
            pass
    assert_holds(model, before)
    with ema.swapped():  # nothing is left marked as swapped
        pass


def test_nested_and_cross_averager_swaps_and_updates_are_refused():
    model, ema = trained(SmallCNN)
    swa = polyak.SWA(model)
    swa.update()
    before = exact_copy(model)
    with ema.swapped():
        with pytest.raises(RuntimeError, match=r"swapped"), ema.swapped():
            pass
        with pytest.raises(RuntimeError, match=r"`swapped\(\)` block that is still open"), swa.swapped():
            pass
        with pytest.raises(RuntimeError, match="still open"):
            swa.update()  # would average the EMA weights into the SWA
        with pytest.raises(RuntimeError, match="still open"):
            swa.copy_to(model)  # would be undone silently on exit
        with pytest.raises(RuntimeError, match="still open"):
            polyak.Shadow(model).update(model, 0.5)
    assert_holds(model, before)
    assert swa.num_updates == 1 and swa.step == 1
    swa.update()


def test_a_closed_swap_leaves_its_model_free_while_another_model_is_swapped():
    """Only a module whose block is still open is refused: after its swap closed, model A updates (by the EMA
    formula) and swaps again while model B's block is open."""
    model_a, ema_a = trained(SmallCNN)
    _, ema_b = trained(TinyTransformer)
    with ema_a.swapped():
        pass
    modes = ema_a.shadow.modes()
    expected = {n: v.double() for n, v in ema_a.shadow.tensors().items()}
    live = dict(model_a.state_dict(keep_vars=True))
    for name, mode in modes.items():  # decay 0.5: a <- a + 0.5 (model - a); copied tensors take the model's
        value = live[name].detach()
        expected[name] = expected[name] + 0.5 * (value.double() - expected[name]) if mode == "average" else value
    with ema_b.swapped():
        ema_a.update()
        with ema_a.swapped():
            pass
    for name, value in ema_a.shadow.tensors().items():
        torch.testing.assert_close(value.double(), expected[name].double(), rtol=0, atol=1e-6)


def test_before_the_first_update_the_average_is_the_model_as_built_with_one_warning():
    """As diffusers' copy_to and timm give it: a trainer's sanity-check evaluation runs before any update."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    built = {k: v.clone() for k, v in model.state_dict().items()}
    ema = polyak.EMA(model, decay=0.9, start_step=2)
    for _ in range(2):  # trained, but averaging has not started
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"no update yet \(step 2\).*model as built"), ema.swapped() as swapped:
        assert all(torch.equal(swapped.state_dict()[k], built[k]) for k in built)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per averager, not one per evaluation
        copy = ema.averaged_model()
        with ema.swapped():
            pass
    assert all(torch.equal(copy.state_dict()[k], built[k]) for k in built)
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    lazy = polyak.EMA(model, decay=0.9, lazy=True)  # nothing stored yet: the model as it is
    with pytest.warns(UserWarning, match="no update yet"), lazy.swapped() as swapped:
        assert all(torch.equal(swapped.state_dict()[k], trained[k]) for k in trained)
    ema.update()
    with ema.swapped():
        assert torch.equal(model.weight, trained["weight"])  # the first update copied


def test_state_dict_taken_while_swapped_is_marked_and_warns():
    model, ema = trained(TinyTransformer)
    assert not polyak.is_swapped_state_dict(model.state_dict())
    training = exact_copy(model)
    wrapper = nn.DataParallel(model)  # a checkpoint of a wrapper contains the swapped model too
    buffer = io.BytesIO()
    with ema.swapped(), pytest.warns(UserWarning, match="inside a `swapped\\(\\)` block"):
        inside = model.state_dict()
        wrapped = wrapper.state_dict()
        for name, value in ema.shadow.tensors().items():
            assert torch.equal(inside[name], value.to(inside[name].dtype))
        torch.save(inside, buffer)
    assert polyak.is_swapped_state_dict(inside) and polyak.is_swapped_state_dict(wrapped)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert polyak.is_swapped_state_dict(saved)
    assert not torch.equal(saved["embed.weight"], training["embed.weight"])
    # as with any state_dict(), the tensors are views of the model's: after the block they read the training
    # weights again, while the mark still (conservatively) says the state was taken inside the block
    assert_holds(model, training)
    assert all(torch.equal(value, training[name]) for name, value in inside.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = model.state_dict()  # the hook is gone
    assert not polyak.is_swapped_state_dict(after)
    assert not polyak.is_swapped_state_dict({"weight": torch.zeros(1)})
    fresh = TinyTransformer()
    fresh.load_state_dict(inside)  # the mark does not get in the way of loading


def test_averager_state_saved_while_swapped_equals_the_state_outside():
    _, ema = trained(SmallCNN)
    outside = {k: v.clone() for k, v in ema.state_dict()["shadow"].items()}
    with ema.swapped():
        inside = {k: v.clone() for k, v in ema.state_dict()["shadow"].items()}
    assert outside.keys() == inside.keys()
    assert all(torch.equal(outside[k], inside[k]) for k in outside)


def test_a_deliberate_export_inside_a_swap_is_marked_but_quiet():
    from polyak import exporting_average

    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.5)
    ema.update(model)
    with ema.swapped(model), exporting_average(), warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        state = model.state_dict()
    assert polyak.is_swapped_state_dict(state)  # still marked as holding the average
    with ema.swapped(model), pytest.warns(UserWarning, match="inside a `swapped\\(\\)` block"):
        model.state_dict()  # outside the block it warns again
