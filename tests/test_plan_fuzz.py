"""Mutation fuzz: random module trees changed at random between updates are followed or refused, never ignored.

Each case builds a random tree (linear layers, BatchNorm, modules with float and integer buffers, nested
containers, tied weights, frozen parameters) and an ``EMA`` with a random ``frozen`` policy, then runs steps
that each may change the model (add, remove, set to None, tie, untie, replace, re-shape, ``p.data = ...``,
re-cast, ``to_empty``, freeze, unfreeze) before an update. An independent oracle, working from the model's
tensors by name and the documented rules, says whether the change must be followed or refused:

- refused (``ValueError`` naming a tensor): a stored tensor removed or tied to another stored one, a new
  stored tensor (added, untied, unfrozen under ``frozen="skip"``), a shape change, a change of kind
  (float <-> integer), a tensor the options now skip, a copy that cannot hold the model's dtype exactly or
  a frozen copy that cannot hold the average it now needs;
- followed otherwise: the average must then equal a float64 EMA re-derived by name.

After a refusal the case starts a new averager on the changed model. The large run:
``pytest -m fuzz tests/test_plan_fuzz.py`` (1,000 cases); the default suite runs a few.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_plan import Reference, expected_mode, step
from torch import nn

from polyak import EMA

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


class Buffers(nn.Module):
    """A leaf with a float and an integer buffer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("level", torch.randn(n))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def random_leaf(rng: random.Random) -> nn.Module:
    n = rng.randint(1, 4)
    kind = rng.choice(["linear", "linear", "batchnorm", "buffers", "sequential"])
    if kind == "linear":
        return nn.Linear(n, rng.randint(1, 4), bias=rng.random() < 0.7)
    if kind == "batchnorm":
        return nn.BatchNorm1d(n)
    if kind == "buffers":
        return Buffers(n)
    return nn.Sequential(*[random_leaf(rng) for _ in range(rng.randint(0, 2))])


def random_tree(rng: random.Random) -> nn.Module:
    model = nn.Sequential(*[random_leaf(rng) for _ in range(rng.randint(1, 4))])
    params = list(model.named_parameters())
    if len(params) >= 2 and rng.random() < 0.3:
        tie(model, rng)
    for _, p in model.named_parameters():
        if rng.random() < 0.2:
            p.requires_grad_(False)
    if rng.random() < 0.2:
        model.to(rng.choice(FLOAT_DTYPES))
    return model


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, key = name.rpartition(".")
    return (model.get_submodule(path) if path else model), key


def tie(model: nn.Module, rng: random.Random) -> None:
    named = list(model.named_parameters(remove_duplicate=False))
    pairs = [(a, b) for a, pa in named for b, pb in named if a != b and pa.shape == pb.shape and pa is not pb]
    if pairs:
        a, b = rng.choice(pairs)
        module, key = owner_of(model, b)
        setattr(module, key, owner_of(model, a)[0]._parameters[owner_of(model, a)[1]])


# ---------------------------------------------------------------------- mutations


def mutate(model: nn.Module, rng: random.Random) -> str:
    """Apply one random change; returns its name."""
    tensors = list(model.state_dict(keep_vars=True).items())
    params = [(n, t) for n, t in tensors if isinstance(t, nn.Parameter)]
    modules = [(n, m) for n, m in model.named_modules() if n]
    kind = rng.choice(
        [
            "add_param", "add_buffer", "remove", "set_none", "remove_module", "tie", "untie", "replace_same",
            "replace_shape", "data_same", "data_shape", "recast", "recast_part", "to_empty", "freeze", "unfreeze",
            "replace_module", "none",
        ]
    )  # fmt: skip
    if kind == "add_param" and modules:
        name, module = rng.choice(modules)
        setattr(module, f"extra{rng.randint(0, 9)}", nn.Parameter(torch.randn(2), requires_grad=rng.random() < 0.7))
    elif kind == "add_buffer" and modules:
        name, module = rng.choice(modules)
        value = torch.randn(2) if rng.random() < 0.7 else torch.zeros(2, dtype=torch.int64)
        module.register_buffer(f"more{rng.randint(0, 9)}", value, persistent=rng.random() < 0.8)
    elif kind in ("remove", "set_none") and tensors:
        module, key = owner_of(model, rng.choice(tensors)[0])
        if kind == "remove":
            delattr(module, key)
        else:
            setattr(module, key, None)
    elif kind == "remove_module" and modules:
        name, _ = rng.choice(modules)
        parent, key = owner_of(model, name)
        delattr(parent, key)
    elif kind == "tie":
        tie(model, rng)
    elif kind == "untie":
        seen: dict[int, str] = {}
        aliases = [n for n, p in model.named_parameters(remove_duplicate=False) if seen.setdefault(id(p), n) != n]
        if aliases:
            module, key = owner_of(model, rng.choice(aliases))
            old = module._parameters[key]
            setattr(module, key, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
    elif kind in ("replace_same", "replace_shape") and params:
        name, old = rng.choice(params)
        module, key = owner_of(model, name)
        shape = old.shape if kind == "replace_same" else (old.numel() + 1,)
        value = torch.randn(shape, dtype=old.dtype)
        setattr(module, key, nn.Parameter(value, requires_grad=old.requires_grad))
    elif kind in ("data_same", "data_shape") and tensors:
        name, old = rng.choice(tensors)
        shape = old.shape if kind == "data_same" else (old.shape[-1:] if old.dim() == 2 else (old.numel() + 1,))
        old.data = torch.randn(shape).to(old.dtype) if old.is_floating_point() else torch.zeros(shape, dtype=old.dtype)
    elif kind == "recast":
        model.to(rng.choice(FLOAT_DTYPES))
    elif kind == "recast_part" and modules:
        rng.choice(modules)[1].to(rng.choice(FLOAT_DTYPES))
    elif kind == "to_empty":
        model.to_empty(device="cpu")
        with torch.no_grad():
            for _, t in model.state_dict(keep_vars=True).items():
                t.copy_(torch.randn(t.shape).to(t.dtype) if t.is_floating_point() else torch.zeros(t.shape))
    elif kind in ("freeze", "unfreeze") and params:
        rng.choice(params)[1].requires_grad_(kind == "unfreeze")
    elif kind == "replace_module" and modules:
        name, _ = rng.choice(modules)
        parent, key = owner_of(model, name)
        setattr(parent, key, random_leaf(rng))
    return kind


# ---------------------------------------------------------------------- the oracle


class Layout:
    """What an averager built on a model stores, from the model alone: stored tensors by their first name."""

    def __init__(self, model: nn.Module, frozen: str) -> None:
        self.frozen = frozen
        self.slots: dict[str, tuple[torch.Size, torch.dtype]] = {}  # first name -> (shape, storage dtype)
        for first, tensor, mode, _ in self.groups(model):
            if mode != "skip":
                dtype = tensor.dtype if mode == "copy" else torch.promote_types(tensor.dtype, torch.float32)
                self.slots[first] = (tensor.shape, dtype)
        self.modes = {first: mode for first, _, mode, _ in self.groups(model) if first in self.slots}

    def groups(self, model: nn.Module) -> list[tuple[str, torch.Tensor, str, list[str]]]:
        """(first name, tensor, mode, all names) per distinct tensor, in module order."""
        params = {id(p) for p in model.parameters()}
        names: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            names.setdefault(id(tensor), []).append(name)
            tensors[id(tensor)] = tensor
        return [
            (group[0], tensors[key], expected_mode(group[0], tensors[key], key in params, self.frozen), group)
            for key, group in names.items()
        ]

    def refuses(self, model: nn.Module) -> bool:
        """True when the documented rules refuse ``model`` as it is now."""
        found = {}
        for _, tensor, mode, group in self.groups(model):
            stored = [name for name in group if name in self.slots]
            if len(stored) > 1:
                return True  # two stored tensors tied into one
            if not stored:
                if mode != "skip":
                    return True  # a new tensor the options keep (added, untied, unfrozen under "skip")
                continue
            found[stored[0]] = (tensor, mode)
        if set(found) != set(self.slots):
            return True  # a stored tensor removed
        for name, (tensor, mode) in found.items():
            shape, dtype = self.slots[name]
            if tensor.shape != shape or mode == "skip":
                return True
            if tensor.is_floating_point() != dtype.is_floating_point:
                return True
            if mode == "copy" and torch.promote_types(tensor.dtype, dtype) != dtype:
                return True
            was = self.modes[name]
            if mode == "average" and was == "copy" and torch.promote_types(tensor.dtype, torch.float32) != dtype:
                return True
        for name, (_, mode) in found.items():
            self.modes[name] = mode  # followed
        return False


def tolerance(model: nn.Module) -> float:
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in model.state_dict().values())
    return 3e-2 if low else 1e-5


def run_case(seed: int, steps: int = 8) -> dict[str, int]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = random_tree(rng)
    frozen = rng.choice(["copy", "copy", "average", "skip"])
    outcomes = {"followed": 0, "refused": 0}

    def start() -> tuple[EMA, Reference, Layout]:
        ema = EMA(model, decay=0.5, frozen=frozen)
        ema.update()
        return ema, Reference(model, frozen), Layout(model, frozen)

    ema, reference, layout = start()
    for i in range(steps):
        kind = mutate(model, rng) if rng.random() < 0.6 else "none"
        step(model, seed * 100 + i)
        if layout.refuses(model):
            call = rng.choice(["update", "swapped", "copy_to", "state_dict"])
            with pytest.raises(ValueError, match=r"'[\w.]+'") as raised:
                if call == "swapped":
                    with ema.swapped():
                        pass
                else:
                    getattr(ema, call)()
            assert "\n" not in str(raised.value), kind
            outcomes["refused"] += 1
            ema, reference, layout = start()
            continue
        ema.update()
        reference.update(model, 0.5)
        reference.check(ema, tolerance(model))
        if rng.random() < 0.2:  # a followed change also swaps in and out exactly
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with ema.swapped():
                pass
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        outcomes["followed"] += 1
    return outcomes


@pytest.mark.parametrize("seed", range(25))
def test_mutations_are_followed_or_refused(seed):
    run_case(seed)


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", range(1000, 2000))
def test_mutations_are_followed_or_refused_fuzz(seed):
    run_case(seed)
