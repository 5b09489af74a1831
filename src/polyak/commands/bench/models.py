"""The benchmark's models: the tensor layouts of common networks, with no forward pass.

An averaging update only sees the tensors (how many, how large, which dtype), so these modules reproduce the
parameter and buffer layout of each network and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GPT2Shape", "ManyTensors", "NatureDQNShape", "ResNet50Shape", "SACTwinCritic", "WideTensors"]


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet50Shape(nn.Module):
    """ResNet-50's tensors: 161 parameter tensors (25.6M elements at ``width=64``) and BatchNorm buffers."""

    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        stages = []
        for i, blocks in enumerate((3, 4, 6, 3)):
            layers = []
            for j in range(blocks):
                layers.append(_Bottleneck(cin, width * 2**i, 2 if j == 0 and i > 0 else 1))
                cin = 4 * width * 2**i
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_proj = nn.Linear(4 * width, width)


class GPT2Shape(nn.Module):
    """GPT-2 small's tensors: 124.4M elements in 148 tensors at the defaults, output head tied to the embedding."""

    def __init__(self, vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


class ManyTensors(nn.Module):
    """``count`` parameter tensors of ``side`` x ``side`` elements: a model where per-tensor overhead dominates."""

    def __init__(self, count: int = 2000, side: int = 50) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(side, side)) for _ in range(count))


class WideTensors(nn.Module):
    """``count`` parameter tensors of ``numel`` elements: a model where the memory traffic dominates."""

    def __init__(self, count: int = 40, numel: int = 1 << 20) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(numel)) for _ in range(count))


class SACTwinCritic(nn.Module):
    """SAC's twin Q critic: two 3-layer MLPs of width 256 on a 17-d observation and 6-d action (HalfCheetah),
    12 tensors, 144k elements."""

    def __init__(self, inputs: int = 23, width: int = 256) -> None:
        super().__init__()

        def critic() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
            )

        self.q1 = critic()
        self.q2 = critic()


class NatureDQNShape(nn.Module):
    """The Nature DQN CNN (Mnih et al. 2015) on 4 stacked 84x84 frames, 18 actions: 10 tensors, 1.69M elements."""

    def __init__(self, actions: int = 18) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(4, 32, 8, 4), nn.Conv2d(32, 64, 4, 2), nn.Conv2d(64, 64, 3, 1))
        self.fc = nn.Sequential(nn.Linear(64 * 7 * 7, 512), nn.Linear(512, actions))
