"""The Hugging Face Trainer callback in real Trainer runs on a tiny GPT-2 built from a config (no download).

References are computed in float64 from the iterates the optimizer actually produced (recorded by a step hook).
"""

from __future__ import annotations

import importlib
import shutil
import sys

import pytest
import torch
from models import Tokens

transformers = pytest.importorskip("transformers")

import polyak  # noqa: E402
from polyak.integrations.transformers import AVERAGED_DIR, STATE_FILE, AveragingCallback  # noqa: E402

# In normal use the callback never takes a state_dict() of a swapped model (polyak's own warning): an error here.
pytestmark = pytest.mark.filterwarnings(r"error:state_dict\(\) of .* taken inside a `swapped\(\)` block")

DECAY = 0.8
CONFIG = dict(
    vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(tmp_path, model, callback, iterates, resume=None, max_steps=4, eval_strategy="steps", train=True, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.register_step_post_hook(lambda *_: iterates.append(weights(model)))
    compute_metrics = options.pop("compute_metrics", None)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        eval_strategy=eval_strategy,
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **options,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(16, seed=0),
        eval_dataset=Tokens(4, seed=1),
        callbacks=callback if isinstance(callback, list) else [callback],
        optimizers=(optimizer, None),
        compute_metrics=compute_metrics,
    )
    if train:
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def ema_reference(iterates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    average = {k: v.double() for k, v in iterates[0].items()}
    for it in iterates[1:]:
        average = {k: DECAY * average[k] + (1 - DECAY) * it[k].double() for k in average}
    return average


def assert_close(actual, expected, tol=1e-6):
    assert actual and actual.keys() <= expected.keys()
    for k in actual:
        torch.testing.assert_close(actual[k].double(), expected[k].double(), rtol=tol, atol=tol, msg=k)


def ema(model):
    return polyak.EMA(model, decay=DECAY)


def test_trainer_updates_evaluates_saves_and_resumes(tmp_path):
    model, iterates, callback = tiny_gpt2(), [], AveragingCallback(ema)
    trainer = run(tmp_path, model, callback, iterates)

    # on_step_end fires once per optimizer step, after gradient accumulation (pain point 20).
    assert len(iterates) == trainer.state.global_step == 4
    assert callback.averager.step == callback.averager.num_updates == 4
    assert_close(weights(callback.averager.averaged_model()), ema_reference(iterates))
    # The training weights are back in the model.
    for k, v in weights(model).items():
        assert torch.equal(v, iterates[-1][k]), k

    # Each evaluation ran twice: the training weights under eval_loss, the average under eval_loss_ema; each
    # is the loss the Trainer gives those weights (the float64 reference for the average).
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert all(log["eval_runtime_ema"] > 0 for log in evals)
    assert [log["step"] for log in evals] == [2, 4]
    reference = {log["step"]: ema_reference(iterates[: log["step"]]) for log in evals}

    # Checkpoints: training weights as the model, the average beside it (from_pretrained), and the state.
    from safetensors.torch import load_file

    for step in (2, 4):
        directory = tmp_path / "out" / f"checkpoint-{step}"
        assert_close(load_file(directory / "model.safetensors"), iterates[step - 1], tol=0)
        averaged = transformers.GPT2LMHeadModel.from_pretrained(directory / AVERAGED_DIR)
        assert_close(weights(averaged), ema_reference(iterates[:step]))
        saved = torch.load(directory / STATE_FILE, weights_only=True)
        assert saved["global_step"] == saved["averager"]["num_updates"] == step

    # Resume from checkpoint-2: the average continues bit for bit.
    resumed, iterates2, callback2 = tiny_gpt2(), [], AveragingCallback(ema)
    run(tmp_path, resumed, callback2, iterates2, resume=str(tmp_path / "out" / "checkpoint-2"))
    assert len(iterates2) == 2
    final, final2 = callback.averager.state_dict(), callback2.averager.state_dict()
    assert (final2["step"], final2["num_updates"]) == (final["step"], final["num_updates"])
    for k, v in final["shadow"].items():
        assert torch.equal(final2["shadow"][k], v), k

    # Resuming from a checkpoint without the averager state is an error, not a silent restart (pain point 14).
    bare = tmp_path / "bare" / "checkpoint-2"
    shutil.copytree(tmp_path / "out" / "checkpoint-2", bare)
    (bare / STATE_FILE).unlink()
    with pytest.raises(RuntimeError, match=r"no polyak_averager\.pt"):
        run(tmp_path / "bare", tiny_gpt2(), AveragingCallback(ema), [], resume=str(bare))

    for log in evals:  # last: this overwrites the model
        model.load_state_dict(iterates[log["step"] - 1])
        assert log["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
        model.load_state_dict({k: v.float() for k, v in reference[log["step"]].items()})
        assert log["eval_loss_ema"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)
        assert log["eval_loss_ema"] != log["eval_loss"]


def test_copy_at_end_and_default_averager(tmp_path):
    model, iterates = tiny_gpt2(), []
    callback = AveragingCallback(copy_at_end=True, save_averaged=False)
    trainer = run(tmp_path, model, callback, iterates, max_steps=2, eval_strategy="epoch")
    assert isinstance(callback.averager, polyak.EMA)
    # The evaluation at the (truncated) epoch's end ran with the average, which the model now holds.
    (log,) = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert log["eval_loss_ema"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
    # Default rule: decay min(0.999, (1 + n) / (10 + n)) with n = 1 at the second step (the first copies).
    expected = {k: 2 / 11 * iterates[0][k].double() + 9 / 11 * iterates[1][k].double() for k in iterates[0]}
    assert_close(weights(model), expected)
    assert not (tmp_path / "out" / "checkpoint-2" / AVERAGED_DIR).exists()
    assert (tmp_path / "out" / "checkpoint-2" / STATE_FILE).exists()


class Failing:
    """compute_metrics that raises ``error`` on its ``when``-th call (the averaged pass of an evaluation)."""

    def __init__(self, when: int, error: BaseException) -> None:
        self.calls, self.when, self.error = 0, when, error

    def __call__(self, prediction) -> dict[str, float]:
        self.calls += 1
        if self.calls == self.when:
            raise self.error
        return {"calls": float(self.calls)}


@pytest.mark.parametrize("error", [RuntimeError("metrics failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_every_exit_leaves_the_training_weights(tmp_path, error):
    """An exception or Ctrl-C in the averaged evaluation inside train(): the model holds the training weights,
    the averager goes on, and save_model() in the user's except block writes the training weights."""
    model, iterates, callback = tiny_gpt2(), [], AveragingCallback(ema)
    # Calls: 1 = the training weights at step 2, 2 = the average at step 2.
    trainer = run(tmp_path, model, callback, iterates, train=False, compute_metrics=Failing(2, error))
    with pytest.raises(type(error)):
        trainer.train()
    assert_close(weights(model), iterates[-1], tol=0)
    assert len(iterates) == 2
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    assert_close(load_file(tmp_path / "saved" / "model.safetensors"), iterates[-1], tol=0)
    callback.averager.update(model)  # still usable
    with callback.averager.swapped(model):
        pass


def test_evaluate_by_hand_and_prediction(tmp_path):
    """trainer.evaluate() after train() reports both sets and leaves the training weights; predict() and an
    evaluation before train() use the training weights only."""
    model, iterates, callback = tiny_gpt2(), [], AveragingCallback(ema, metric_suffix="_avg")
    swa = AveragingCallback(polyak.SWA, metric_suffix="_swa", save_averaged=False)  # a second set of metrics
    trainer = run(tmp_path, model, [callback, swa], iterates, train=False, eval_strategy="no")
    before = trainer.evaluate()
    assert "eval_loss" in before and not any(k.endswith("_avg") for k in before)
    trainer.train()
    metrics = trainer.evaluate()
    assert_close(weights(model), iterates[-1], tol=0)
    model.load_state_dict({k: v.float() for k, v in ema_reference(iterates).items()})
    assert metrics["eval_loss_avg"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)
    model.load_state_dict({k: (sum(it[k].double() for it in iterates) / 4).float() for k in iterates[0]})
    assert metrics["eval_loss_swa"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)
    model.load_state_dict(iterates[-1])
    assert metrics["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
    prediction = trainer.predict(Tokens(4, seed=1))
    assert not any(k.endswith("_avg") for k in prediction.metrics)
    assert prediction.metrics["test_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)

    # evaluate_both=False: one pass, the average under the plain names (and the model back afterwards).
    only = AveragingCallback(ema, evaluate_both=False)
    trainer2 = run(tmp_path / "only", tiny_gpt2(), only, [], eval_strategy="no")
    metrics2 = trainer2.evaluate()
    assert not any(k.endswith("_ema") for k in metrics2)
    assert metrics2["eval_loss"] == pytest.approx(metrics["eval_loss_avg"], rel=1e-6)


@pytest.mark.parametrize("best_model", ["training", "averaged"])
def test_best_checkpoint_by_the_averaged_metric(tmp_path, best_model):
    """metric_for_best_model on the averaged loss picks the checkpoint; best_model="averaged" loads its average."""
    model, iterates = tiny_gpt2(), []
    callback = AveragingCallback(ema, best_model=best_model)
    trainer = run(
        tmp_path, model, callback, iterates, max_steps=6,
        metric_for_best_model="loss_ema", greater_is_better=False, load_best_model_at_end=True,
    )  # fmt: skip
    evals = {log["step"]: log["eval_loss_ema"] for log in trainer.state.log_history if "eval_loss" in log}
    best = min(evals, key=evals.__getitem__)  # here a checkpoint other than the last one
    assert best != 6 and trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    expected = ema_reference(iterates[:best]) if best_model == "averaged" else iterates[best - 1]
    assert_close(weights(model), expected, tol=1e-6 if best_model == "averaged" else 0)
    callback.averager.update(model)  # still usable


def test_select_on_chooses_the_width_with_the_evaluation_loop(tmp_path):
    """select_on: each width's eval_loss is the loss of reconstruct's output for it; the lowest wins, each width's
    metric is logged once, averaged/ holds the chosen average and the model its training weights."""
    from polyak.io import open_safetensors
    from polyak.posthoc import reconstruct

    snapshots = tmp_path / "phema"
    callback = AveragingCallback(
        lambda m: polyak.PostHocEMA(m, directory=snapshots, snapshot_every=3), select_on="eval_loss"
    )
    model, iterates = tiny_gpt2(), []
    trainer = run(tmp_path, model, callback, iterates, max_steps=8, eval_strategy="no")
    selection = callback.selection
    assert selection.step == 8 and len(list(snapshots.iterdir())) == 3  # steps 3, 6, and 8 at the end
    assert len(selection.scores) >= 12 and selection.passes == 1
    for k, v in weights(model).items():
        assert torch.equal(v, iterates[-1][k]), k

    for width, score in selection.scores.items():
        name = f"eval_sigma_rel_{width:g}_loss"
        assert [log[name] for log in trainer.state.log_history if name in log] == [score], name
    reconstruct(snapshots, [selection.chosen], [tmp_path / "expected.safetensors"])
    exported = weights(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out" / AVERAGED_DIR))
    for name, value in open_safetensors(tmp_path / "expected.safetensors").items():
        assert torch.equal(exported[name], value), name

    for width, score in selection.scores.items():  # last: this overwrites the model
        out = tmp_path / f"ref-{width}.safetensors"
        reconstruct(snapshots, [width], [out])
        model.load_state_dict(dict(open_safetensors(out)))
        assert score == pytest.approx(trainer.evaluate()["eval_loss"], abs=1e-6), width
    assert selection.chosen == min(selection.scores, key=selection.scores.__getitem__)


def test_bad_options():
    with pytest.raises(ValueError, match="best_model must be"):
        AveragingCallback(best_model="ema")
    with pytest.raises(ValueError, match="copy_at_end"):
        AveragingCallback(best_model="averaged", copy_at_end=True)
    with pytest.raises(ValueError, match="metric_suffix"):
        AveragingCallback(metric_suffix="")
    first, second = AveragingCallback(ema), AveragingCallback(ema)
    with pytest.raises(ValueError, match="distinct metric_suffix"):
        run_trainer_with([first, second])
    with pytest.raises(ValueError, match="only one can"):
        run_trainer_with([AveragingCallback(ema, evaluate_both=False), AveragingCallback(ema, metric_suffix="_b")])
    with pytest.raises(ValueError, match="pick one"):
        AveragingCallback(select_on="eval_loss", best_model="averaged")
    with pytest.raises(ValueError, match="mode must be"):
        AveragingCallback(select_on="eval_loss", mode="best")


def test_select_on_refuses_what_it_cannot_choose_from(tmp_path):
    with pytest.raises(TypeError, match="PostHocEMA snapshots, but the averager is a EMA"):
        run(tmp_path, tiny_gpt2(), AveragingCallback(ema, select_on="loss"), [], max_steps=1, eval_strategy="no")
    model, iterates = tiny_gpt2(), []
    callback = AveragingCallback(
        lambda m: polyak.PostHocEMA(m, directory=tmp_path / "phema", snapshot_every=1), select_on="eval_accuracy"
    )
    with pytest.raises(RuntimeError, match=r"select_on='eval_accuracy': the evaluation gave no such metric"):
        run(tmp_path, model, callback, iterates, max_steps=2, eval_strategy="no")
    for k, v in weights(model).items():
        assert torch.equal(v, iterates[-1][k]), k


def run_trainer_with(callbacks):
    args = transformers.TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    return transformers.Trainer(model=tiny_gpt2(), args=args, callbacks=callbacks)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "polyak.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install polyak\[transformers\]"):
        importlib.import_module("polyak.integrations.transformers")
