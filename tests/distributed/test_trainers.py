"""The trainer callbacks on 2 CPU ranks (gloo): the Hugging Face Trainer under DDP and FSDP2, Lightning under FSDP2.

Each job trains a few steps while recording the full parameters after every optimizer step; the parent checks the
callback's average against the float64 EMA of those iterates, the evaluations against the loss of the reference
weights, the checkpoints (HF ``averaged/`` loads with ``from_pretrained``; Lightning's averager state is in the
checkpoint), and that resuming from the first checkpoint continues the average bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from models import Tokens
from torch import nn

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from polyak.distributed import full_state_dict  # noqa: E402

from .harness import launch  # noqa: E402

DECAY = 0.8
CONFIG = dict(
    vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=0, eos_token_id=0,
)  # fmt: skip
# The parent reads DCP checkpoints without a process group: that is the point.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings(r"error:state_dict\(\) of .* taken inside a `swapped\(\)` block"),
]


def _environment(rank: int, world: int) -> None:
    """What a launcher (torchrun) would set: the frameworks read it; the process group already exists."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(NODE_RANK="0", GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")


def _full(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full floating-point state (a collective for sharded tensors: every rank calls it)."""
    state = full_state_dict(module.state_dict(), rank0_only=False)
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


def _ema(iterates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    average = {k: v.double() for k, v in iterates[0].items()}
    for it in iterates[1:]:
        average = {k: DECAY * average[k] + (1 - DECAY) * it[k].double() for k in average}
    return average


def _close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys() and actual
    for k in expected:
        torch.testing.assert_close(actual[k].double(), expected[k].double(), rtol=tol, atol=tol, msg=k)


def _equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys() and actual
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


# ---------------------------------------------------------------------- Hugging Face Trainer


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    model.loss_type = "ForCausalLM"
    return model


def _hf_run(out: Path, mode: str, resume: str | None = None) -> tuple[Any, list[dict[str, torch.Tensor]], Any]:
    from polyak import EMA
    from polyak.integrations.transformers import AveragingCallback

    iterates: list[dict[str, torch.Tensor]] = []

    class Record(transformers.TrainerCallback):  # runs before the averaging callback: the iterate of each step
        def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module, **kwargs: Any) -> None:
            iterates.append(_full(model))

    options: dict[str, Any] = {}
    if mode == "fsdp2":
        options = dict(fsdp=True, fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT"})
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, logging_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, **options,
    )  # fmt: skip
    callback = AveragingCallback(lambda m: EMA(m, decay=DECAY))
    trainer = transformers.Trainer(
        model=_gpt2(), args=args, train_dataset=Tokens(16, seed=0), eval_dataset=Tokens(8, seed=1),
        callbacks=[Record(), callback],
    )  # fmt: skip
    if mode == "fsdp2":  # accelerate runs DDP instead of FSDP on CPU; make it real (research/scale.md)
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = trainer.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        trainer.is_fsdp_enabled = True
    trainer.train(resume_from_checkpoint=resume)
    return trainer, iterates, callback


def hf_job(rank: int, world: int, out: Path, mode: str) -> dict[str, Any]:
    _environment(rank, world)
    transformers.utils.logging.disable_progress_bar()
    trainer, iterates, callback = _hf_run(out / "run", mode)
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
    average = full_state_dict(callback.averager.state_dict())
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    # Resume from checkpoint-2 in a new Trainer: the same iterates, the same average, bit for bit.
    _, iterates2, callback2 = _hf_run(out / "run", mode, resume=str(out / "run" / "checkpoint-2"))
    average2 = full_state_dict(callback2.averager.state_dict())
    return dict(
        sharded=sharded, iterates=iterates, evals=evals, average=average, iterates2=iterates2, average2=average2
    )


def _lm_loss(weights: dict[str, torch.Tensor]) -> float:
    """The evaluation loss of the tiny GPT-2 holding ``weights`` on the 8 evaluation sequences."""
    model = _gpt2()
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    ids = Tokens(8, seed=1).ids
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_hf_trainer(tmp_path, mode):
    from polyak.integrations.transformers import AVERAGED_DIR, STATE_FILE

    r0, _ = launch(hf_job, tmp_path, timeout=300, mode=mode)
    assert r0["sharded"] == (mode == "fsdp2")
    iterates = r0["iterates"]
    assert len(iterates) == 4
    params = {k for k, _ in _gpt2().named_parameters()}
    # The callback's average is the float64 EMA of the gathered iterates.
    average = r0["average"]
    assert average["step"] == average["num_updates"] == 4
    _close({k: v for k, v in average["shadow"].items() if k in params}, {k: _ema(iterates)[k] for k in params})

    # Both evaluations: the training weights under eval_loss, the average under eval_loss_ema.
    assert [log["step"] for log in r0["evals"]] == [2, 4]
    for log in r0["evals"]:
        step = log["step"]
        assert log["eval_loss"] == pytest.approx(_lm_loss(iterates[step - 1]), rel=1e-5)
        assert log["eval_loss_ema"] == pytest.approx(_lm_loss(_ema(iterates[:step])), rel=1e-5)

    # Each checkpoint: a consolidated averaged/ folder from_pretrained loads, and the averager's full state.
    for step in (2, 4):
        directory = tmp_path / "run" / f"checkpoint-{step}"
        loaded = transformers.GPT2LMHeadModel.from_pretrained(directory / AVERAGED_DIR)
        expected = _ema(iterates[:step])
        _close({k: v for k, v in loaded.state_dict().items() if k in expected}, expected)
        saved = torch.load(directory / STATE_FILE, weights_only=True)
        assert saved["global_step"] == saved["averager"]["num_updates"] == step

    # Resumed from checkpoint-2: the same iterates and the same average, bit for bit.
    assert len(r0["iterates2"]) == 2
    for later, again in zip(iterates[2:], r0["iterates2"], strict=True):
        _equal(again, later)
    _equal(r0["average2"]["shadow"], average["shadow"])


# ---------------------------------------------------------------------- Lightning


class Regression(pl.LightningModule):
    """A small MLP; under FSDP2 its layers are sharded in configure_model (uneven: 5 rows split 3/2)."""

    def __init__(self, fsdp2: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
        self.fsdp2 = fsdp2
        self.iterates: list[dict[str, torch.Tensor]] = []

    def configure_model(self) -> None:
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.iterates.append(_full(self))  # one optimizer step per batch; before the callbacks' hook

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _loader(n: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _lightning_run(
    out: Path, strategy: str, epochs: int, ckpt: str | None = None, save_to: Path | None = None
) -> tuple[Any, Any, Any]:
    from polyak import EMA
    from polyak.integrations.lightning import AveragingCallback

    model = Regression(fsdp2=strategy == "fsdp2")
    callback = AveragingCallback(lambda m: EMA(m, decay=DECAY), save_to=save_to)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1)
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        chosen: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        chosen = strategy
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=chosen, max_epochs=epochs, callbacks=[callback, checkpoints],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=out,
    )  # fmt: skip
    trainer.fit(model, _loader(16, seed=0), _loader(8, seed=1), ckpt_path=ckpt)
    return trainer, model, callback


def lightning_job(rank: int, world: int, out: Path, strategy: str) -> dict[str, Any]:
    _environment(rank, world)
    trainer, model, callback = _lightning_run(out, strategy, epochs=2, save_to=out / "averaged.safetensors")
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    average = full_state_dict(callback.averager.state_dict())
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    # Resume from the first epoch's checkpoint in a new Trainer: the same average, bit for bit.
    _, model2, callback2 = _lightning_run(out / "resumed", strategy, epochs=2, ckpt=str(out / "ckpt" / "epoch=0.ckpt"))
    average2 = full_state_dict(callback2.averager.state_dict())
    shadow = callback.averager.state_dict()["shadow"]
    local = {} if sharded else {k: v.clone() for k, v in shadow.items()}  # DDP: the same on every rank
    return dict(
        sharded=sharded, iterates=model.iterates, metrics=metrics, average=average, iterates2=model2.iterates,
        average2=average2, final=_full(model), global_step=trainer.global_step, local=local,
    )  # fmt: skip


def _mse(weights: dict[str, torch.Tensor]) -> float:
    model = Regression(fsdp2=False)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    x, y = _loader(8, seed=1).dataset.tensors
    with torch.no_grad():
        return nn.functional.mse_loss(model.net(x), y).item()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lightning(tmp_path, strategy):
    r0, r1 = launch(lightning_job, tmp_path, timeout=300, strategy=strategy)
    assert r0["sharded"] == (strategy == "fsdp2")
    if strategy == "ddp":  # every rank holds the whole average, the same
        _equal(r0["local"], r1["local"])
    iterates = r0["iterates"]
    assert (len(iterates), r0["global_step"]) == (4, 4)  # 2 epochs x 16 samples / (2 ranks x 4 per batch)
    average = r0["average"]
    assert average["step"] == average["num_updates"] == 4
    _close(average["shadow"], _ema(iterates))
    _equal(r0["final"], iterates[-1])  # the training weights are back in the model after validation
    from safetensors.torch import load_file

    _close(load_file(tmp_path / "averaged.safetensors"), _ema(iterates))  # save_to: gathered, written by rank 0

    # Validation saw both (each rank validates its half of the 8 samples; sync_dist averages the two halves).
    assert r0["metrics"]["val_loss"] == pytest.approx(_mse(iterates[-1]), rel=1e-5)
    assert r0["metrics"]["val_loss_ema"] == pytest.approx(_mse(_ema(iterates)), rel=1e-5)

    # The averager's state is in the checkpoint, full: a distributed checkpoint keeps it in its metadata file.
    checkpoint = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("AveragingCallback")]
    assert state["num_updates"] == 2
    _close(state["shadow"], _ema(iterates[:2]))

    # Resumed from the first epoch: the same iterates and the same average, bit for bit.
    for later, again in zip(iterates[2:], r0["iterates2"], strict=True):
        _equal(again, later)
    _equal(r0["average2"]["shadow"], average["shadow"])


# ---------------------------------------------------------------------- choosing the width (select_on) under DDP


class CountingRegression(Regression):
    """Counts the validation samples this rank sees, over every validation pass."""

    def __init__(self) -> None:
        super().__init__(fsdp2=False)
        self.validated = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validated += len(batch[0])
        super().validation_step(batch, batch_idx)


def lightning_select_job(rank: int, world: int, out: Path) -> dict[str, Any]:
    _environment(rank, world)
    from polyak import PostHocEMA
    from polyak.integrations.lightning import AveragingCallback

    model = CountingRegression()
    callback = AveragingCallback(
        lambda m: PostHocEMA(m, directory=out / "phema", snapshot_every=3),
        select_on="val_loss", save_to=out / "chosen.safetensors",
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[callback], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        default_root_dir=out,
    )  # fmt: skip
    trainer.fit(model, _loader(16, seed=0), _loader(8, seed=1))
    selection = callback.selection
    return dict(
        scores=selection.scores, chosen=selection.chosen, step=selection.step, validated=model.validated,
        final=_full(model), last=model.iterates[-1], run=callback.averager.run_id,
    )  # fmt: skip


@pytest.mark.slow
def test_lightning_select_on_under_ddp(tmp_path):
    """Each rank validates its half of every candidate; the ranks agree on every score and on the choice, which is
    the lowest validation loss of reconstruct's outputs; rank 0 exports the chosen average."""
    from safetensors.torch import load_file

    from polyak.io import open_safetensors
    from polyak.posthoc import reconstruct

    r0, r1 = launch(lightning_select_job, tmp_path, timeout=300)
    assert r0["run"] == r1["run"]  # both ranks write the periodic snapshots into one folder: one run, rank 0's
    assert r0["step"] == 4 and r0["scores"] == r1["scores"] and r0["chosen"] == r1["chosen"]
    assert len(r0["scores"]) >= 12
    for r in (r0, r1):  # 2 validations in training (2 passes each), 1 per candidate: 4 of the 8 samples each
        assert r["validated"] == 4 * (2 * 2 + len(r0["scores"]))
        _equal(r["final"], r["last"])  # the training weights are back
    for width, score in r0["scores"].items():
        out = tmp_path / f"ref-{width}.safetensors"
        reconstruct(tmp_path / "phema", [width], [out])
        assert score == pytest.approx(_mse(dict(open_safetensors(out))), abs=1e-6), width
    assert r0["chosen"] == min(r0["scores"], key=r0["scores"].__getitem__)
    reconstruct(tmp_path / "phema", [r0["chosen"]], [tmp_path / "expected.safetensors"])
    _equal(load_file(tmp_path / "chosen.safetensors"), dict(open_safetensors(tmp_path / "expected.safetensors")))
