"""The Lightning callback in real Trainer runs on a tiny model.

References are computed from the iterates the optimizer actually produced (recorded by a step hook), in float64,
or by polyak's own averager replayed over those iterates in a plain loop.
"""

from __future__ import annotations

import copy
import importlib
import signal
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import polyak  # noqa: E402
from polyak.integrations.lightning import AveragingCallback  # noqa: E402

DECAY = 0.8

# In normal use the callback never takes a state_dict() of a swapped model (polyak's own warning): an error here.
pytestmark = pytest.mark.filterwarnings(r"error:state_dict\(\) of .* taken inside a `swapped\(\)` block")


def loader(n: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


class Regression(pl.LightningModule):
    """A small MLP that records its weights after every optimizer step and at the start of every validation."""

    def __init__(self, bn: bool = False, save_during_validation: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8) if bn else nn.Identity(), nn.Tanh(), nn.Linear(8, 1)
        )
        self.iterates: list[dict[str, torch.Tensor]] = []
        self.validated: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.save_during_validation = save_during_validation

    def weights(self) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():  # recording what the step sees, also inside the swap
            warnings.simplefilter("ignore")
            return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated.append((self.trainer.global_step, self.weights()))
            if self.save_during_validation and self.trainer.global_step > 0 and not self.trainer.sanity_checking:
                self.trainer.save_checkpoint(self.save_during_validation)
                self.after_save = self.weights()
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.2)
        optimizer.register_step_post_hook(lambda *_: self.iterates.append(self.weights()))
        return optimizer


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def ema_reference(iterates: list[dict[str, torch.Tensor]], decay: float = DECAY) -> dict[str, torch.Tensor]:
    """Float64 EMA over the iterates; the first copies."""
    average = {k: v.double() for k, v in iterates[0].items()}
    for it in iterates[1:]:
        average = {k: decay * average[k] + (1 - decay) * it[k].double() for k in average}
    return average


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k].double(), expected[k].double(), rtol=tol, atol=tol, msg=k)


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


def averaged(callback: AveragingCallback) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in callback.averager.averaged_model().state_dict().items()}


def ema(model: nn.Module) -> polyak.EMA:
    return polyak.EMA(model, decay=DECAY)


def loss_of(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The validation loss of a Regression holding ``weights``."""
    check = Regression()
    check.load_state_dict({k: v.float() for k, v in weights.items()})
    with torch.no_grad():
        return nn.functional.mse_loss(check(x), y)


def test_updates_per_optimizer_step_and_validates_the_average(tmp_path):
    """Gradient accumulation (pain point 20) and validation before the first update (Lightning#21724)."""
    model = Regression()
    initial = model.weights()
    callback = AveragingCallback(ema)
    t = trainer(tmp_path, [callback], accumulate_grad_batches=2, num_sanity_val_steps=1)
    t.fit(model, loader(), loader(8, seed=1))

    # 3 epochs x 4 batches, accumulating 2: 6 optimizer steps, one update each.
    assert len(model.iterates) == t.global_step == 6
    assert callback.averager.step == callback.averager.num_updates == 6
    assert_close(averaged(callback), ema_reference(model.iterates))

    # The sanity check ran before any update, once: it saw the training weights, not an un-averaged copy.
    (step0, seen0), *later = model.validated
    assert step0 == 0
    assert_equal(seen0, initial)
    # Then each validation ran each batch twice: the training weights, then the average.
    assert [step for step, _ in later] == [2, 2, 4, 4, 6, 6]
    for (step, raw), (_, seen) in zip(later[::2], later[1::2], strict=True):
        assert_equal(raw, model.iterates[step - 1])
        assert_close(seen, ema_reference(model.iterates[:step]))
    # The training weights came back after each validation: the model ends on the last iterate.
    assert_equal(model.weights(), model.iterates[-1])
    # Both sets of metrics side by side, each the loss of its weights.
    x, y = loader(8, seed=1).dataset.tensors
    metrics = t.callback_metrics
    torch.testing.assert_close(metrics["val_loss"], loss_of(model.iterates[-1], x, y), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        metrics["val_loss_ema"], loss_of(ema_reference(model.iterates), x, y), rtol=1e-5, atol=1e-7
    )

    # trainer.test and a validation called by hand report both as well, and leave the training weights.
    model.validated.clear()
    (tested,) = t.test(model, loader(8, seed=1), verbose=False)
    assert_close(model.validated[1][1], ema_reference(model.iterates))
    assert_equal(model.weights(), model.iterates[-1])
    (validated,) = t.validate(model, loader(8, seed=1), verbose=False)
    assert tested == validated and set(validated) == {"val_loss", "val_loss_ema"}
    assert_equal(model.weights(), model.iterates[-1])
    assert "log" not in model.__dict__


def test_checkpoints_hold_training_weights_and_resume_exactly(tmp_path):
    """Checkpoints taken at validation end or during the swap (nequip#590), and exact resume (pain point 14)."""
    during = tmp_path / "during_validation.ckpt"
    model = Regression(save_during_validation=str(during))
    callback = AveragingCallback(ema)
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=False
    )
    t = trainer(tmp_path, [callback, checkpoints], enable_checkpointing=True)
    with warnings.catch_warnings():  # the save from inside the averaged step warns, by design
        warnings.filterwarnings("ignore", "state_dict")
        t.fit(model, loader(), loader(8, seed=1))
    assert t.global_step == 12

    for epoch in range(3):
        saved = torch.load(tmp_path / "ckpt" / f"epoch={epoch}.ckpt", weights_only=False)
        step = saved["global_step"]
        assert step == 4 * (epoch + 1)
        assert_equal(saved["state_dict"], model.iterates[step - 1])
        state = saved["callbacks"][callback.state_key]
        assert state["step"] == state["num_updates"] == step
        assert_close(state["shadow"], ema_reference(model.iterates[:step]))

    saved = torch.load(during, weights_only=False)  # written from inside validation_step, while swapped
    step = saved["global_step"]
    assert_equal(saved["state_dict"], model.iterates[step - 1])
    assert_close(saved["callbacks"][callback.state_key]["shadow"], ema_reference(model.iterates[:step]))
    assert_close(model.after_save, ema_reference(model.iterates[:step]))  # validation went on with the average

    # Resume from the first epoch's checkpoint: the average continues bit for bit.
    resumed = Regression()
    callback2 = AveragingCallback(ema)
    t2 = trainer(tmp_path, [callback2])
    t2.fit(resumed, loader(), loader(8, seed=1), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert t2.global_step == 12
    assert_equal(resumed.weights(), model.weights())
    final, final2 = callback.averager.state_dict(), callback2.averager.state_dict()
    assert (final2["step"], final2["num_updates"]) == (final["step"], final["num_updates"]) == (12, 12)
    assert_equal(final2["shadow"], final["shadow"])

    # Testing from a checkpoint with a fresh callback evaluates the saved average (pain point 25).
    tested = Regression()
    trainer(tmp_path, [AveragingCallback(ema)]).test(
        tested, loader(8, seed=1), ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt", verbose=False
    )
    assert_equal(tested.validated[0][1], model.iterates[-1])
    assert_close(tested.validated[1][1], ema_reference(model.iterates))
    assert_equal(tested.weights(), model.iterates[-1])

    # A checkpoint without this callback's state is an error, not a silent restart of the average.
    t3 = trainer(tmp_path, [AveragingCallback(ema, name="other")], max_epochs=4)
    with pytest.raises(RuntimeError, match="no state for"):
        t3.fit(Regression(), loader(), ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")


def test_any_averager_and_several_callbacks(tmp_path):
    """SWA and power-function EMA through the same factory interface, side by side: one metric set each."""
    model = Regression()
    swa = AveragingCallback(lambda m: polyak.SWA(m, start_step=2), name="swa", metric_suffix="_swa")
    rule = polyak.rules.PowerFunction(sigma_rel=0.2)
    power = AveragingCallback(lambda m: polyak.EMA(m, rule=rule), name="power", metric_suffix="_power")
    t = trainer(tmp_path, [swa, power], max_epochs=2)
    t.fit(model, loader(), loader(8, seed=1))
    assert len(model.iterates) == 8

    tail = model.iterates[2:]
    mean = {k: sum(it[k].double() for it in tail) / len(tail) for k in tail[0]}
    assert_close(averaged(swa), mean)

    # Power EMA: polyak's own averager replayed over the same iterates in a plain loop.
    replica = copy.deepcopy(model.net)
    reference = polyak.EMA(replica, rule=rule)
    for it in model.iterates:
        replica.load_state_dict({k[len("net.") :]: v for k, v in it.items()})
        reference.update()
    expected = {f"net.{k}": v for k, v in reference.averaged_model().state_dict().items()}
    assert_equal(averaged(power), expected)

    # The last validation: the training weights, then each average in turn, each under its own names.
    (*_, (_, raw), (_, seen_swa), (_, seen_power)) = model.validated
    assert_equal(raw, model.iterates[-1])
    assert_close(seen_swa, mean)
    assert_equal(seen_power, expected)
    x, y = loader(8, seed=1).dataset.tensors
    metrics = t.callback_metrics
    assert set(metrics) == {"val_loss", "val_loss_swa", "val_loss_power"}
    torch.testing.assert_close(metrics["val_loss_swa"], loss_of(mean, x, y), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["val_loss_power"], loss_of(expected, x, y), rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError, match="distinct metric_suffix"):
        trainer(tmp_path, [AveragingCallback(ema), AveragingCallback(ema, name="b")]).fit(Regression(), loader())
    only = AveragingCallback(ema, evaluate_both=False)
    with pytest.raises(ValueError, match="only one can"):
        trainer(tmp_path, [only, AveragingCallback(ema, name="b", metric_suffix="_b")]).fit(Regression(), loader())


def test_checkpoint_selection_follows_the_averaged_metric(tmp_path):
    """ModelCheckpoint(monitor="val_loss_ema") keeps the checkpoint whose average validated best."""
    model = Regression()
    callback = AveragingCallback(ema)
    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss_ema", mode="min", save_top_k=1)
    t = trainer(tmp_path, [callback, best], enable_checkpointing=True, max_epochs=4)
    t.fit(model, loader(), loader(8, seed=1))
    x, y = loader(8, seed=1).dataset.tensors
    losses = {step: loss_of(ema_reference(model.iterates[:step]), x, y).item() for step in (4, 8, 12, 16)}
    step = min(losses, key=losses.__getitem__)
    assert step != 16  # a checkpoint other than the last: the selection is seen
    saved = torch.load(best.best_model_path, weights_only=False)
    assert saved["global_step"] == step
    assert best.best_model_score.item() == pytest.approx(losses[step], rel=1e-5)


def test_evaluate_both_false_validates_only_the_average(tmp_path):
    model = Regression()
    callback = AveragingCallback(ema, evaluate_both=False)
    t = trainer(tmp_path, [callback], max_epochs=1)
    t.fit(model, loader(), loader(8, seed=1))
    ((_, seen),) = model.validated
    assert_close(seen, ema_reference(model.iterates))
    x, y = loader(8, seed=1).dataset.tensors
    assert set(t.callback_metrics) == {"val_loss"}
    torch.testing.assert_close(
        t.callback_metrics["val_loss"], loss_of(ema_reference(model.iterates), x, y), rtol=1e-5, atol=1e-7
    )
    assert_equal(model.weights(), model.iterates[-1])


def test_update_bn_and_save_at_end(tmp_path):
    """At the end: the average goes into the model, BatchNorm statistics are recomputed, the file holds them."""
    model = Regression(bn=True)
    path = tmp_path / "averaged.safetensors"
    callback = AveragingCallback(ema, update_bn=True, save_to=path)
    data = loader()
    trainer(tmp_path, [callback], max_epochs=2).fit(model, data)

    expected = ema_reference(model.iterates)
    after = model.weights()
    params = {k for k, _ in model.named_parameters()}
    assert_close({k: after[k] for k in params}, {k: expected[k] for k in params})
    # BatchNorm statistics by hand: cumulative averages over the training batches of the averaged first layer.
    w, b = expected["net.0.weight"], expected["net.0.bias"]
    hidden = [x.double() @ w.T + b for x, _ in data]
    mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    var = torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0)
    torch.testing.assert_close(after["net.1.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after["net.1.running_var"].double(), var, rtol=1e-5, atol=1e-6)

    from safetensors.torch import load_file

    assert_equal(load_file(path), after)


def test_compiled_module(tmp_path):
    """A torch.compile'd LightningModule: pairing survives the wrapper, validation sees the swap (pain point 17)."""
    model = Regression()
    callback = AveragingCallback(ema)
    t = trainer(tmp_path, [callback], max_epochs=1)
    # backend="eager": dynamo capture and guards without inductor code generation (~90 s on a shared CPU).
    t.fit(torch.compile(model, backend="eager"), loader(), loader(8, seed=1))
    assert callback.averager.num_updates == len(model.iterates) == 4
    assert_close(averaged(callback), ema_reference(model.iterates))
    assert_close(model.validated[-1][1], ema_reference(model.iterates))
    # The compiled validation_step computed with the averaged weights.
    check = Regression()
    check.load_state_dict({k: v.float() for k, v in ema_reference(model.iterates).items()})
    x, y = loader(8, seed=1).dataset.tensors
    expected = nn.functional.mse_loss(check(x), y)
    torch.testing.assert_close(t.callback_metrics["val_loss_ema"], expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.callback_metrics["val_loss"], loss_of(model.iterates[-1], x, y), rtol=1e-6, atol=1e-7)
    assert_equal(model.weights(), model.iterates[-1])


class FailingValidation(Regression):
    """Raises ``error`` at the ``when``-th call of validation_step (2 batches, each run raw then averaged)."""

    def __init__(self, when: int, error: BaseException) -> None:
        super().__init__()
        self.calls, self.when, self.error = 0, when, error

    def validation_step(self, batch, batch_idx):
        self.calls += 1
        if self.calls == self.when:
            raise self.error
        super().validation_step(batch, batch_idx)


@pytest.mark.parametrize(
    "when, error",
    [(5, RuntimeError("failure")), (6, RuntimeError("failure")), (6, KeyboardInterrupt())],
    ids=["training-pass", "averaged-pass", "ctrl-c-in-averaged-pass"],
)
def test_every_exit_leaves_the_training_weights(tmp_path, when, error):
    """An exception or Ctrl-C in the middle of a validation must not leave the average in the model (pain point
    15): calls 1-4 are the first epoch's validation, 5 and 6 the second's first batch, raw then averaged."""
    model = FailingValidation(when, error)
    callback = AveragingCallback(ema)
    t = trainer(tmp_path, [callback])
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit if isinstance(error, KeyboardInterrupt) else RuntimeError):
            t.fit(model, loader(), loader(8, seed=1))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt
    assert len(model.iterates) == 8  # the failure came in the second epoch's validation
    assert_equal(model.weights(), model.iterates[-1])
    assert callback._swap is None and "log" not in model.__dict__
    # The user saves in the except block: the training weights, with no warning; the averager goes on.
    t.save_checkpoint(tmp_path / "after.ckpt")
    assert_equal(torch.load(tmp_path / "after.ckpt", weights_only=False)["state_dict"], model.iterates[-1])
    callback.averager.update(model)
    assert callback.averager.num_updates == 9


def test_metric_objects_are_refused_in_the_averaged_pass(tmp_path):
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithMetric(Regression):
        def __init__(self) -> None:
            super().__init__()
            self.mse = torchmetrics.MeanSquaredError()

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.mse(self(x), y)
            self.log("val_mse", self.mse)

    model = WithMetric()
    callback = AveragingCallback(ema)
    with pytest.raises(TypeError, match="evaluate_both=False"):
        trainer(tmp_path, [callback], max_epochs=1).fit(model, loader(), loader(8, seed=1))
    assert_equal(model.weights(), model.iterates[-1])


def test_bad_input():
    with pytest.raises(TypeError, match="function model -> averager"):
        AveragingCallback(polyak.EMA(nn.Linear(2, 2), decay=0.9))  # an instance, not a factory
    assert isinstance(AveragingCallback(polyak.SWA)._ready(Regression()), polyak.SWA)  # a class is a factory
    callback = AveragingCallback(lambda m: object())
    with pytest.raises(TypeError, match="lacks"):
        callback._ready(Regression())
    with pytest.raises(ValueError, match="metric_suffix"):
        AveragingCallback(metric_suffix="")


def test_select_on_chooses_the_width_with_the_validation_loop(tmp_path):
    """select_on: every width scored by the trainer's validation loop equals the loss of reconstruct's output for
    it; the lowest wins, each width's score reaches the logger once, save_to holds the chosen average."""
    import csv

    from safetensors.torch import load_file

    from polyak.io import open_safetensors
    from polyak.posthoc import reconstruct

    model, snapshots, path = Regression(), tmp_path / "phema", tmp_path / "chosen.safetensors"
    callback = AveragingCallback(
        lambda m: polyak.PostHocEMA(m, directory=snapshots, snapshot_every=5), select_on="val_loss", save_to=path
    )
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    logger = pl.loggers.CSVLogger(tmp_path / "logs", name="", version="")
    run = trainer(tmp_path, [callback, checkpoints], max_epochs=3, logger=logger, enable_checkpointing=True)
    run.fit(model, loader(), loader(8, seed=1))

    selection = callback.selection
    assert selection.step == 12 and len(sorted(snapshots.iterdir())) == 3  # steps 5 and 10, and 12 at the end
    assert len(selection.scores) >= 12 and selection.passes == 1
    assert len(list((tmp_path / "ckpt").iterdir())) == 3  # the scoring passes wrote no checkpoint
    x, y = loader(8, seed=1).dataset.tensors
    for width, score in selection.scores.items():
        out = tmp_path / f"ref-{width}.safetensors"
        reconstruct(snapshots, [width], [out])
        assert score == pytest.approx(loss_of(dict(open_safetensors(out)), x, y).item(), abs=1e-6), width
    assert selection.chosen == min(selection.scores, key=selection.scores.__getitem__)
    assert_equal(model.weights(), model.iterates[-1])  # the training weights are back
    expected = loss_of(model.iterates[-1], x, y).item()
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for width in selection.scores:
        name = f"val_loss_sigma_rel_{width:g}"
        logged = [float(row[name]) for row in rows if row.get(name)]
        assert logged == [pytest.approx(selection.scores[width], rel=1e-6)], name
    last_val = [float(row["val_loss"]) for row in rows if row.get("val_loss")]
    assert last_val[-1] == pytest.approx(expected, abs=1e-6)  # the training weights' metric is not overwritten
    reconstruct(snapshots, [selection.chosen], [tmp_path / "expected.safetensors"])
    saved = load_file(path)
    for name, value in open_safetensors(tmp_path / "expected.safetensors").items():
        assert torch.equal(saved[name], value), name


def test_select_on_refuses_what_it_cannot_choose_from(tmp_path):
    with pytest.raises(ValueError, match="update_bn"):
        AveragingCallback(select_on="val_loss", update_bn=True)
    with pytest.raises(ValueError, match="mode must be"):
        AveragingCallback(select_on="val_loss", mode="lowest")
    with pytest.raises(TypeError, match="PostHocEMA snapshots, but the averager is a EMA"):
        trainer(tmp_path, [AveragingCallback(ema, select_on="val_loss")], max_epochs=1).fit(Regression(), loader())
    model = Regression()
    callback = AveragingCallback(
        lambda m: polyak.PostHocEMA(m, directory=tmp_path / "phema", snapshot_every=2), select_on="val_acc"
    )
    with pytest.raises(RuntimeError, match=r"select_on='val_acc': the validation loop logged no such metric"):
        trainer(tmp_path, [callback], max_epochs=1).fit(model, loader(), loader(8, seed=1))
    assert_equal(model.weights(), model.iterates[-1])


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "polyak.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install polyak\[lightning\]"):
        importlib.import_module("polyak.integrations.lightning")


# Multi-process runs (DDP and FSDP2): tests/distributed/test_trainers.py.
