"""Mean Teacher on MNIST-1D with few labels: the teacher is a live EMA of the student, kept by polyak.

Run: python examples/mean_teacher_mnist1d.py [--steps 2000] [--labels 300] [--seeds 0 1 2] [--consistency 10]
Needs ``mnist1d`` (``pip install polyak[demo]``; the data is generated locally, nothing is downloaded).

Semi-supervised learning after Tarvainen & Valpola 2017: the student learns from ``--labels`` labelled sequences
(cross-entropy) and from all 4,000 training sequences through a consistency loss towards the teacher's
predictions on a differently perturbed copy. The teacher is ``polyak.EMA(student, rule=CosineMomentum(...),
target="copy", buffers="skip")``: its momentum rises from 0.99 to 0.999 on a cosine (BYOL/DINO's schedule), and
its BatchNorm statistics are those of its own forward passes, as in the paper (only weights are averaged).
Prints the test accuracy of the student and of the teacher for each seed, and their mean over seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from torch import nn
from torch.nn import functional as F

import polyak
from polyak.commands.demo.data import mnist1d
from polyak.rules import CosineMomentum


def make_model() -> nn.Module:
    def block(channels_in: int, stride: int) -> list[nn.Module]:
        return [nn.Conv1d(channels_in, 32, 3, stride=stride, padding=1), nn.BatchNorm1d(32), nn.ReLU()]

    return nn.Sequential(
        nn.Unflatten(1, (1, 40)), *block(1, 1), *block(32, 2), *block(32, 2), nn.Flatten(), nn.Linear(320, 10)
    )


def perturb(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random circular shift of up to 3 positions and Gaussian noise (std 0.1): the two views of an input."""
    shifts = torch.randint(-3, 4, (x.shape[0],), generator=generator)
    index = (torch.arange(x.shape[1]).unsqueeze(0) - shifts.unsqueeze(1)) % x.shape[1]
    return x.gather(1, index) + 0.1 * torch.randn(x.shape, generator=generator)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    result = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return result


def run(
    seed: int, steps: int = 2000, labels: int = 300, batch: int = 64, consistency: float = 10.0
) -> dict[str, float]:
    """Train one student/teacher pair; returns their test accuracies (fractions)."""
    data = mnist1d()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    per_class = labels // data.classes
    labelled = torch.cat(
        [
            torch.nonzero(data.y == c).squeeze(1)[
                torch.randperm(int((data.y == c).sum()), generator=generator)[:per_class]
            ]
            for c in range(data.classes)
        ]
    )
    x_lab, y_lab, x_all = data.x[labelled], data.y[labelled], data.x
    student = make_model()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    schedule = CosineMomentum(start=0.99, end=0.999, total_steps=steps)
    # Mean Teacher averages the weights only: the teacher's BatchNorm statistics are those of its own forward passes
    teacher = polyak.EMA(student, rule=schedule, target="copy", buffers="skip")
    for step in range(steps):
        ramp = math.exp(-5.0 * (1.0 - min(1.0, step / (0.3 * steps))) ** 2)  # the paper's sigmoid ramp-up
        i = torch.randint(len(x_lab), (batch,), generator=generator)
        j = torch.randint(len(x_all), (batch,), generator=generator)
        x = torch.cat([x_lab[i], x_all[j]])
        logits = student(perturb(x, generator))
        with torch.no_grad():
            goal = F.softmax(teacher.target(perturb(x, generator)), dim=1)  # the live teacher, train-mode BN
        loss = F.cross_entropy(logits[:batch], y_lab[i])
        loss = loss + consistency * ramp * F.mse_loss(F.softmax(logits, dim=1), goal)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        teacher.update()
    return {
        "student": accuracy(student, data.x_test, data.y_test),
        "teacher": accuracy(teacher.target, data.x_test, data.y_test),
    }


def main(
    steps: int = 2000, labels: int = 300, seeds: tuple[int, ...] = (0, 1, 2), consistency: float = 10.0
) -> dict[int, dict[str, float]]:
    torch.set_num_threads(1)
    results = {}
    for seed in seeds:
        results[seed] = run(seed, steps=steps, labels=labels, consistency=consistency)
        print(
            f"seed {seed}: student {results[seed]['student']:.3f}, teacher {results[seed]['teacher']:.3f}", flush=True
        )
    for who in ("student", "teacher"):
        values = [r[who] for r in results.values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{who}: test accuracy {statistics.mean(values):.3f} ± {spread:.3f} over {len(values)} seeds")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--labels", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--consistency", type=float, default=10.0, help="0: labels only (the teacher just follows)")
    options = parser.parse_args()
    main(options.steps, options.labels, tuple(options.seeds), options.consistency)
