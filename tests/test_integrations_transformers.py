"""The Hugging Face Trainer callback in real Trainer runs on a tiny GPT-2 built from a config (no download).

References are computed in float64 from the iterates the optimizer actually produced (recorded by a step hook).
"""

from __future__ import annotations

import importlib
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import polyak  # noqa: E402
from polyak.integrations.transformers import AVERAGED_DIR, STATE_FILE, AveragingCallback  # noqa: E402

DECAY = 0.8
CONFIG = dict(
    vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 32, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(tmp_path, model, callback, iterates, resume=None, max_steps=4, eval_strategy="steps"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.register_step_post_hook(lambda *_: iterates.append(weights(model)))
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
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(16, seed=0),
        eval_dataset=Tokens(4, seed=1),
        callbacks=[callback],
        optimizers=(optimizer, None),
    )
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

    # Each evaluation ran on the averaged weights: its loss is the loss the Trainer gives the reference weights.
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
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
        model.load_state_dict({k: v.float() for k, v in reference[log["step"]].items()})
        assert log["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)


def test_copy_at_end_and_default_averager(tmp_path):
    model, iterates = tiny_gpt2(), []
    callback = AveragingCallback(copy_at_end=True, save_averaged=False)
    trainer = run(tmp_path, model, callback, iterates, max_steps=2, eval_strategy="epoch")
    assert isinstance(callback.averager, polyak.EMA)
    # The evaluation at the (truncated) epoch's end ran with the average, which the model now holds.
    (log,) = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert log["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
    # Default rule: decay min(0.999, (1 + n) / (10 + n)) with n = 1 at the second step (the first copies).
    expected = {k: 2 / 11 * iterates[0][k].double() + 9 / 11 * iterates[1][k].double() for k in iterates[0]}
    assert_close(weights(model), expected)
    assert not (tmp_path / "out" / "checkpoint-2" / AVERAGED_DIR).exists()
    assert (tmp_path / "out" / "checkpoint-2" / STATE_FILE).exists()


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "polyak.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install polyak\[transformers\]"):
        importlib.import_module("polyak.integrations.transformers")
