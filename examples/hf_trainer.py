"""A Hugging Face Trainer run with an averaged copy of the weights, saved beside each checkpoint.

Run: python examples/hf_trainer.py [--steps N]
Trains a tiny GPT-2 (built from a config: nothing is downloaded) to continue noisy counting sequences modulo 32. The
AveragingCallback keeps an EMA; evaluations during training use it, and every checkpoint gets an ``averaged/``
folder that ``from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

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
    torch.manual_seed(0)
    out_dir = Path(out or tempfile.mkdtemp(prefix="polyak-hf-"))
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
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
    trainer.train()
    averaged = trainer.state.log_history[-2]["eval_loss"]  # the last evaluation during training: the average
    last = trainer.evaluate()["eval_loss"]  # called by hand: the model as it is (the training weights)

    # The averaged model of the last checkpoint, as anyone would load it.
    reloaded = GPT2LMHeadModel.from_pretrained(out_dir / f"checkpoint-{steps}" / AVERAGED_DIR)
    trainer.model.load_state_dict(reloaded.state_dict())
    results = {
        "last iterate": last,
        "EMA (during training)": averaged,
        "EMA (from_pretrained)": trainer.evaluate()["eval_loss"],
    }
    for name, value in results.items():
        print(f"{name:>22}: eval loss {value:.4f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    main(parser.parse_args().steps)
