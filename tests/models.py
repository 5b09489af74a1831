"""Small real models used across the tests."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv + BatchNorm + linear head: floating and integer buffers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyTransformer(nn.Module):
    """A two-layer causal transformer language model with tied input/output embeddings."""

    def __init__(self, vocab: int = 50, width: int = 32, layers: int = 2, context: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.lm_head(self.norm(h))


class FrozenBackbone(nn.Module):
    """A frozen backbone, a trainable head, an integer step counter buffer and a bool flag buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(12, 3)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("flag", torch.zeros(2, dtype=torch.bool))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += x.shape[0]
            self.scale.mul_(0.99).add_(0.01 * x.abs().mean())
            self.flag[0] = True
        return self.head(self.backbone(x)) * self.scale


def batch_for(model: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """A random input batch of the right kind for one of the models above."""
    if isinstance(model, SmallCNN):
        return torch.randn(4, 3, 8, 8, generator=generator)
    if isinstance(model, TinyTransformer):
        return torch.randint(0, 50, (4, 12), generator=generator)
    return torch.randn(5, 6, generator=generator)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0, after_step=None) -> None:
    """Run ``steps`` real optimizer steps on random data; call ``after_step()`` after each."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        out = model(batch_for(model, generator))
        loss = out.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()


MODELS = {"cnn": SmallCNN, "transformer": TinyTransformer, "frozen": FrozenBackbone}


class Tokens(torch.utils.data.Dataset):
    """``n`` random sequences of 8 token ids below 32, as a language-model dataset (labels = inputs)."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 32, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
