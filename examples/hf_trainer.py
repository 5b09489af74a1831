"""A Hugging Face Trainer run with an averaged copy of the weights, saved beside each checkpoint.

Run: python examples/hf_trainer.py [--steps N] [--out DIR]
Trains a tiny GPT-2 (built from a config: nothing is downloaded) to continue noisy counting sequences modulo 32. The
AveragingCallback keeps an EMA: every evaluation reports the training weights (``eval_loss``) and the average
(``eval_loss_ema``) side by side, and every checkpoint gets an ``averaged/`` folder that ``from_pretrained`` loads.
Without --out everything goes to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging

import polyak
from polyak.integrations.transformers import AVERAGED_DIR, AveragingCallback

VOCAB, LENGTH = 32, 12


class Counting(torch.utils.data.Dataset):
    """Sequences start, start + 1, ... (mod VOCAB), with a random start and a quarter of the tokens random."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        noise = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.ids = torch.where(
            torch.rand(n, LENGTH, generator=g) < 0.25, noise, (starts + torch.arange(LENGTH)) % VOCAB
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(steps: int = 60, out: str | None = None) -> dict[str, float]:
    if out is None:
        with tempfile.TemporaryDirectory(prefix="polyak-hf-") as scratch:
            results = main(steps, scratch)
            print(f"(removed {scratch}: pass --out DIR to keep the files)")
            return results
    logging.disable_progress_bar()  # "Writing model shards" bars at each checkpoint
    torch.manual_seed(0)
    out_dir = Path(out)
    config = GPT2Config(  # begin/end token ids inside the tiny vocabulary (GPT-2's default is 50256)
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # GPT-2's class name does not say which loss: name it
    callback = AveragingCallback(lambda m: polyak.EMA(m, half_life=10))  # any polyak averager
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",  # a noisy constant-rate run, where averaging pays
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,  # the average updates once per optimizer step
        eval_strategy="steps",
        eval_steps=steps // 2,
        save_steps=steps // 2,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Counting(2048, seed=0),
        eval_dataset=Counting(128, seed=1),
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the table below shows the evaluations
    trainer.train()
    for log in trainer.state.log_history:
        if "eval_loss" in log:
            print(
                f"step {log['step']:>3}: eval_loss {log['eval_loss']:.4f}  eval_loss_ema {log['eval_loss_ema']:.4f}"
                f"  (averaged pass {log['eval_runtime_ema']:.2f} s of {log['eval_runtime']:.2f} s)"
            )
    metrics = trainer.evaluate()  # called by hand: both again, the training weights in the model afterwards

    # The averaged model of the last checkpoint, as anyone would load it.
    reloaded = GPT2LMHeadModel.from_pretrained(out_dir / f"checkpoint-{steps}" / AVERAGED_DIR)
    trainer.model.load_state_dict(reloaded.state_dict())
    results = {
        "last iterate": metrics["eval_loss"],
        "EMA": metrics["eval_loss_ema"],
        "EMA (from_pretrained)": trainer.evaluate()["eval_loss"],
    }
    for name, value in results.items():
        print(f"{name:>22}: eval loss {value:.4f}")
    print(f"checkpoints with averaged/ copies written to {out_dir}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--out", help="folder to write to (default: a temporary folder, removed at the end)")
    options = parser.parse_args()
    main(options.steps, options.out)
