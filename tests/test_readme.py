"""The README as a newcomer reads it: it opens with the two set-up commands CI agrees with, and every Python
block runs as written, with small stand-ins for the objects it leaves to the reader (``model``, ``loader``...)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def _blocks(language: str) -> list[tuple[str, int, str]]:
    """(section heading, line number, code) of each fenced block in ``language``, in order."""
    found = []
    for match in FENCE.finditer(README):
        if match.group(1) == language:
            before = README[: match.start()]
            headings = re.findall(r"^## (.+)$", before, re.M)
            found.append((headings[-1] if headings else "", before.count("\n") + 1, match.group(2)))
    return found


def test_the_readme_opens_with_the_two_commands_that_ci_runs():
    first = FENCE.search(README)
    assert first is not None and first.group(1) == "bash"
    intro = README[: first.start()]
    assert "\n## " not in intro and intro.strip().count("\n\n") == 1  # the title, then the one-paragraph intro
    demo, tests = first.group(2).splitlines()
    assert demo.endswith("&& polyak demo") and '".[demo]"' in demo
    test_command = tests.split(" && ")[-1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), f"{test_command!r} is not a line of .ci/run"
    torch_pin = re.search(r"torch==[\d.]+", demo)
    assert torch_pin is not None and torch_pin.group() in tests
    assert f'"${{POLYAK_CI_TORCH:-{torch_pin.group()}}}"' in ci  # the torch CI installs


def _plain() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    loader = [torch.randn(16, 4) for _ in range(3)]
    return {
        "model": model,
        "loader": loader,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "evaluate": lambda m: m(loader[0]),
        "device": "cpu",
    }


def _files() -> dict[str, Any]:
    import polyak

    objects = _plain()
    model = objects["model"]
    ema = polyak.EMA(model, decay=0.9)
    objects["paths"] = []
    for step in (100, 200):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
        objects["paths"].append(f"ckpt_{step}.pt")
        torch.save({"model": model.state_dict()}, objects["paths"][-1])
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, "last.pt")
    return objects


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _trainers() -> dict[str, Any]:
    data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(4)]
    return {"model": _tiny_gpt2(), "train_data": data, "eval_data": data}


def _folders() -> dict[str, Any]:
    import polyak

    model = _tiny_gpt2()
    model.save_pretrained("base-model")
    ema = polyak.EMA(model, decay=0.9)
    ema.update(model)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, "last.pt")
    return {"ema": ema}


def _distributed() -> dict[str, Any]:
    import polyak

    objects = _plain()
    ema = polyak.EMA(objects["model"], decay=0.9)
    ema.update(objects["model"])
    return {
        "ema": ema,
        "model_sd": objects["model"].state_dict(),
        "optim_sd": objects["optimizer"].state_dict(),
        "path": "checkpoint",
    }


def _targets() -> dict[str, Any]:
    torch.manual_seed(0)
    actor = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    return {
        "q": nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)),
        "actor": actor,
        "my_actor_copy": copy.deepcopy(actor),
        "student": nn.Linear(3, 3),
        "T": 100,
        "next_obs": torch.randn(5, 3),
    }


def _peers() -> dict[str, Any]:
    objects = _plain()
    model = objects["model"]
    functions = torch.optim.swa_utils
    peer = functions.AveragedModel(model, multi_avg_fn=functions.get_ema_multi_avg_fn(0.99))  # torch's, as a peer
    for _ in range(3):
        peer.update_parameters(model)
    return objects | {"peer": peer, "peer_state": peer.state_dict()}


def _selection() -> dict[str, Any]:
    objects = _plain()
    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(2)]
    loss_fn = nn.functional.cross_entropy

    def train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.train()
        for step in range(2000):  # two snapshots at snapshot_every=1000
            x, y = data[step % 2]
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

    return objects | {"train": train, "loss_fn": loss_fn, "val_loader": data}


# README section -> the objects its Python blocks leave to the reader (made in the test's empty folder)
STAND_INS: dict[str, Callable[[], dict[str, Any]]] = {
    "Quick start": _plain,
    "Coming from `torch.optim.swa_utils`": _plain,
    "Trainer integrations": _trainers,
    "Checkpoint files: average and export": _files,
    "Hugging Face model, diffusers model and PEFT adapter folders": _folders,
    "Coming from another library": _peers,
    "No decay to tune": _selection,
    "Distributed training (DDP, FSDP2, DTensor, DeepSpeed ZeRO)": _distributed,
    "Target networks and teachers": _targets,
}
OPTIONAL = {"lightning": "lightning", "transformers": "transformers"}  # imported by a block -> package it needs


@pytest.mark.parametrize(("section", "line", "code"), _blocks("python"), ids=lambda v: str(v)[:24])
def test_every_python_block_runs_as_written(section, line, code, tmp_path, monkeypatch):
    compiled = compile(code, f"README.md, the block at line {line}", "exec")  # a syntax error fails here
    for module, package in OPTIONAL.items():
        if re.search(rf"^(import|from) {module}\b", code, re.M):
            pytest.importorskip(package)
    assert section in STAND_INS, f"README.md:{line}: give the block in {section!r} its stand-ins in STAND_INS"
    monkeypatch.chdir(tmp_path)
    lightning_block = section == "Trainer integrations" and "import lightning" in code  # it needs nothing of yours
    namespace = {} if lightning_block else STAND_INS[section]()
    exec(compiled, namespace)  # a missing import is a NameError here
