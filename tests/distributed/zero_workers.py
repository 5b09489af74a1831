"""What each rank runs under DeepSpeed ZeRO (importable by spawned children).

DeepSpeed runs on CPU over the harness's gloo group. Its JIT build of a shared-memory op that ZeRO never uses
(about 80 s on 2 cores) is skipped; see /work/shared/research/scale.md.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from models import Tokens
from torch import nn

import polyak
from polyak.distributed import full_state_dict

from .harness import count_collectives

DECAY = 0.8
STEPS = 6
SAVE_AT = 3  # the averager's state is saved after this many steps, and a fresh averager resumes from it
BATCH = 4  # samples per rank and step
LR = 0.05
PERSIST = 5  # stage3_param_persistence_threshold: the biases of 5 and 3 elements stay whole, the rest partitioned


def start_deepspeed(rank: int, world: int) -> Any:
    """Import DeepSpeed for a rank of the harness's process group, without its unused JIT build."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # `import ... as` gets torch
    import deepspeed

    return deepspeed


def net(seed: int = 0) -> nn.Module:
    """Sizes that do not split evenly over 2 ranks: 30, 5, 80, 16, 48 and 3 elements."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, 6, generator=g)
    return x, torch.sin(x[:, :3])


def config(stage: int, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = PERSIST
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "steps_per_print": 10**6,
        **({"bf16": {"enabled": True}} if bf16 else {}),
    }


def _gathered(deepspeed: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters (a collective under ZeRO-3), cloned."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {name: p.detach().clone() for name, p in module.named_parameters()}


def _partitions(module: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's local data: its whole ZeRO-3 partition (padding included), or the tensor."""
    return {n: getattr(p, "ds_tensor", p).detach().clone() for n, p in module.named_parameters()}


def _step(engine: Any, step: int, rank: int, dtype: torch.dtype) -> None:
    x, y = batch(step, rank)
    loss = nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
    engine.backward(loss)
    engine.step()


def zero_job(rank: int, world: int, out: Path, stage: int, bf16: bool) -> dict[str, Any]:
    deepspeed = start_deepspeed(rank, world)
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config(stage, bf16))
    dtype = torch.bfloat16 if bf16 else torch.float32
    module = engine.module
    result: dict[str, Any] = {}

    if stage == 3:  # a parameter caught mid-gather is refused at construction, by name of the engine
        p = next(module.parameters())
        status, p.ds_status = p.ds_status, type(p.ds_status).INFLIGHT
        try:
            polyak.EMA(module, decay=DECAY)
        except RuntimeError as error:
            result["inflight_error"] = str(error)
        p.ds_status = status

    ema = polyak.EMA(engine, decay=DECAY)  # from the engine ...
    of_module = polyak.EMA(module, decay=DECAY)  # ... and from engine.module: the same average
    result["persist"] = {n: bool(getattr(p, "ds_persist", False)) for n, p in module.named_parameters()}
    result["average_dtypes"] = {n: str(t.dtype) for n, t in ema.shadow.tensors().items()}
    result["local_bytes"] = sum(t.nbytes for t in ema.shadow.tensors().values())
    result["full_bytes"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters()) * 4

    calls: list[str] = []
    seen = []
    for step in range(STEPS):
        _step(engine, step, rank, dtype)
        with count_collectives() as during:
            ema.update(engine)
            of_module.update(module)
        calls += during
        seen.append(_gathered(deepspeed, module))
        if step + 1 == SAVE_AT:
            torch.save(ema.state_dict(), out / f"ema{rank}.pt")
            resumed = polyak.EMA(module, decay=DECAY)  # a fresh averager, restored from this rank's file
            resumed.load_state_dict(polyak.load_state(out / f"ema{rank}.pt"))
        elif step + 1 > SAVE_AT:
            resumed.update(module)
    with count_collectives() as control:  # the counter sees DeepSpeed's gathers (ZeRO-2 has none to do)
        _gathered(deepspeed, module)
        if stage < 3:
            torch.distributed.all_reduce(torch.zeros(1))
    result.update(update_collectives=calls, control_collectives=control, seen=seen)
    result["ema_partitions"] = {k: v.clone() for k, v in ema.shadow.tensors().items()}
    result["of_module_partitions"] = {k: v.clone() for k, v in of_module.shadow.tensors().items()}
    result["resumed_partitions"] = {k: v.clone() for k, v in resumed.shadow.tensors().items()}
    other = torch.load(out / f"ema{1 - rank}.pt", weights_only=True)  # the other rank's partitions do not fit
    try:
        polyak.EMA(module, decay=DECAY).load_state_dict(other)
        result["other_rank_state"] = "loaded"
    except ValueError as error:
        result["other_rank_state"] = str(error)
    result["full"] = full_state_dict(ema.state_dict()["shadow"], model=engine)

    # Evaluate with the average swapped in. The evaluation forward before it leaves the parameters gathered.
    x = batch(99, 0)[0].to(dtype)
    engine.eval()
    with torch.no_grad():
        result["trained_out"] = engine(x).float()
        before = _partitions(module)
        with ema.swapped(engine):
            result["swapped_out"] = engine(x).float()
            result["swapped_params"] = _gathered(deepspeed, module)
        result["restored_out"] = engine(x).float()
    after = _partitions(module)
    result["restored"] = {n: torch.equal(before[n], after[n]) for n in before}
    try:
        ema.averaged_model()
    except RuntimeError as error:
        result["averaged_model_error"] = str(error)

    # copy_to: the model holds the average for good; whole (persistent) parameters pass it to their partitions.
    ema.copy_to(engine)
    result["copied_params"] = _gathered(deepspeed, module)
    if stage == 3:
        persistent = [p for p in module.parameters() if p.ds_persist]
        persistent[0].partition(param_list=persistent)  # as DeepSpeed does around a checkpoint ...
        result["copied_after_repartition"] = _gathered(deepspeed, module)  # ... gathered from the partitions

    if stage == 3:  # nonfinite="skip": a NaN in one rank's partition skips the update on every rank
        skipper = polyak.EMA(module, decay=DECAY, nonfinite="skip")
        if rank == 1:
            module[4].bias.ds_tensor[0] = float("nan")
        with count_collectives() as during:
            skipper.update(module)
        result["skip_collectives"] = during
        result["skipped_updates"] = skipper.skipped_updates

    if stage == 3:  # DeepSpeed moves a partition to new memory (as offload_states does): the average follows it
        follower = polyak.EMA(module, decay=0.5)
        p = module[2].weight
        p.ds_tensor.data = p.ds_tensor.data.clone() + 1
        follower.update(module)
        result["moved"] = (follower.shadow.tensors()["2.weight"].clone(), p.ds_tensor.clone())

    if stage == 2:  # FSDP1's flat parameters are refused at construction
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = FullyShardedDataParallel(net(), device_id=torch.device("cpu"), use_orig_params=True)
        try:
            polyak.EMA(fsdp1, decay=DECAY)
        except RuntimeError as error:
            result["fsdp1_error"] = str(error)
    return result


# ---------------------------------------------------------------------- Hugging Face Trainer under ZeRO-3

GPT2 = dict(
    vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)
TRAINER_STEPS = 4  # checkpoints (and evaluations) after steps 2 and 4; the second run resumes from checkpoint-2


def tiny_gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))


def _trainer_run(out: Path, resume: str | None) -> dict[str, Any]:
    """One Trainer run with the averaging callback; rank 0 records what the test checks."""
    import deepspeed
    import transformers

    from polyak.integrations.transformers import AveragingCallback

    record: dict[str, Any] = {"seen": {}, "eval_loss": {}}
    averaging = AveragingCallback(lambda model: polyak.EMA(model, decay=DECAY))

    class Recorder(transformers.TrainerCallback):  # runs before the averaging callback at each event
        def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module, **kwargs: Any) -> None:
            record["seen"][state.global_step] = _gathered(deepspeed, model)

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any, **kwargs: Any) -> None:
            record["eval_loss"][state.global_step] = metrics["eval_loss_ema"]  # the average, beside the raw eval_loss

        def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module, **kwargs: Any) -> None:
            record["full"] = full_state_dict(averaging.averager.state_dict()["shadow"], model=model)

    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"),
        max_steps=TRAINER_STEPS,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        learning_rate=0.05,
        seed=0,
        deepspeed={
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "zero_allow_untested_optimizer": True,
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
        },
    )
    trainer = transformers.Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=Tokens(16, seed=0),
        eval_dataset=Tokens(4, seed=1),
        callbacks=[Recorder(), averaging],
    )
    trainer.train(resume_from_checkpoint=resume)
    return record


def trainer_job(rank: int, world: int, out: Path) -> dict[str, Any]:
    start_deepspeed(rank, world)
    first = _trainer_run(out, resume=None)
    resumed = _trainer_run(out, resume=str(out / "hf" / "checkpoint-2"))
    return {"first": first, "resumed": resumed}
