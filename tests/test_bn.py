"""update_bn: float64 reference statistics, torch's update_bn, batch structures, options, modes."""

from __future__ import annotations

import copy
from collections import namedtuple

import pytest
import torch
import torch.optim.swa_utils as ts
from models import SmallCNN
from opcount import SYNC, OpCounter
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from polyak import swa_utils
from polyak.bn import norm_layers, update_bn


def reference_stats(model: nn.Module, batches: list[torch.Tensor], weighting: str = "batch") -> dict[str, tuple]:
    """Float64, by hand: per layer, the mean over its calls of the batch mean and unbiased variance of its input
    (weighted by the batch size with ``weighting="sample"``).

    A float64 copy of the model runs with only its normalisation layers in train mode; each layer's input is
    captured and reduced over the batch and spatial dimensions (BatchNorm) or per instance, then over the batch
    (InstanceNorm, as its running statistics are defined).
    """
    ref = copy.deepcopy(model).double().eval()
    names = {m: name for name, m in ref.named_modules()}
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}

    def capture(module, args):
        x = args[0]
        if isinstance(module, _BatchNorm):
            dims = [0, *range(2, x.dim())]
            stats = (x.mean(dims), x.var(dims, unbiased=True), x.shape[0])
        else:
            dims = list(range(2, x.dim()))
            stats = (x.mean(dims).mean(0), x.var(dims, unbiased=True).mean(0), x.shape[0])
        calls.setdefault(names[module], []).append(stats)

    for m in norm_layers(ref):
        m.train()
        m.register_forward_pre_hook(capture)
    with torch.no_grad():
        for batch in batches:
            ref(batch.double())
    result = {}
    for name, c in calls.items():
        w = torch.tensor([float(n) if weighting == "sample" else 1.0 for _, _, n in c], dtype=torch.float64)
        w = (w / w.sum())[:, None]
        result[name] = (
            (torch.stack([m for m, _, _ in c]) * w).sum(0),
            (torch.stack([v for _, v, _ in c]) * w).sum(0),
            len(c),
        )
    return result


def assert_matches_reference(model: nn.Module, reference) -> None:
    layers = dict(model.named_modules())
    for name, (mean, var, count) in reference.items():
        layer = layers[name]
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6, msg=name)
        if isinstance(layer, _BatchNorm):
            assert int(layer.num_batches_tracked) == count


class Net(nn.Module):
    """BatchNorm on the data, dropout before a BatchNorm, a BatchNorm used twice per forward, InstanceNorm."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 8)
        self.drop = nn.Dropout(dropout)
        self.bn1 = nn.BatchNorm1d(8)
        self.shared = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 20)
        self.inorm = nn.InstanceNorm1d(4, track_running_stats=True, affine=True)
        self.sync = nn.SyncBatchNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.drop(torch.relu(self.fc(self.bn0(x)))))
        h = self.shared(self.shared(h) * 2 + 1)
        h = self.inorm(self.fc2(h).view(-1, 4, 5))
        return self.sync(h).mean()


def data(n: int = 70, batch: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Batches of 16 and a short last batch, with a non-zero mean and a scale per feature."""
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed)) * torch.arange(1, 7) + 3.0
    return list(x.split(batch))


def test_matches_float64_reference_with_dropout_off():
    torch.manual_seed(0)
    model = Net()
    batches = data()
    update_bn(batches, model)
    reference = reference_stats(model, batches)  # model's weights are unchanged by update_bn
    assert_matches_reference(model, reference)
    assert reference["shared"][2] == 2 * len(batches)
    # Equal batches: the first layer's running mean is the whole dataset's mean.
    equal = data(n=64)
    update_bn(equal, model)
    torch.testing.assert_close(model.bn0.running_mean.double(), torch.cat(equal).double().mean(0))


def test_sample_weighting_gives_the_dataset_mean():
    torch.manual_seed(5)
    model = Net()
    batches = data()  # 4 batches of 16 and one of 6
    dataset_mean = torch.cat(batches).double().mean(0)
    update_bn(batches, model, weighting="sample")
    assert_matches_reference(model, reference_stats(model, batches, weighting="sample"))
    torch.testing.assert_close(model.bn0.running_mean.double(), dataset_mean)
    update_bn(batches, model)  # per batch, as torch: the short batch weighs as much as a full one
    assert not torch.allclose(model.bn0.running_mean.double(), dataset_mean, rtol=1e-3)


def test_same_as_torch_update_bn_without_dropout():
    torch.manual_seed(1)
    ours = Net(dropout=0.0)
    theirs = copy.deepcopy(ours)
    batches = data(seed=1)
    update_bn(batches, ours)
    ts.update_bn(batches, theirs)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        if name.startswith("inorm.running"):  # torch leaves InstanceNorm alone
            assert not torch.equal(a, b)
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_stays_off_while_torch_turns_it_on():
    torch.manual_seed(2)
    model = Net()
    seen = []
    model.drop.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    update_bn(data(), model)
    assert seen and not any(seen)
    ts.update_bn(data(), model)
    assert all(seen[len(seen) // 2 :])


LAYERS = {
    "BatchNorm1d (N, C)": (lambda: nn.BatchNorm1d(3), (5, 3)),
    "BatchNorm1d (N, C, L)": (lambda: nn.BatchNorm1d(3), (5, 3, 4)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(3), (5, 3, 4, 4)),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(3), (3, 3, 2, 3, 3)),
    "SyncBatchNorm": (lambda: nn.SyncBatchNorm(3), (5, 3, 4, 4)),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(3, track_running_stats=True), (5, 3, 4, 4)),
    "InstanceNorm3d": (lambda: nn.InstanceNorm3d(3, affine=True, track_running_stats=True), (3, 3, 2, 3, 3)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_kinds(kind):
    factory, shape = LAYERS[kind]
    model = nn.Sequential(nn.Identity(), factory())
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(shape, generator=generator) * 2 + 1 for _ in range(4)]
    update_bn(batches, model)
    assert_matches_reference(model, reference_stats(model, batches))


def test_lazy_batchnorm():
    """Initialised: as torch. Not yet initialised: the pass initialises it (torch's update_bn raises)."""
    batches = [torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(i)) + i for i in range(3)]
    ours, theirs = nn.LazyBatchNorm2d(), nn.LazyBatchNorm2d()
    with pytest.raises(ValueError, match="uninitialized"):
        ts.update_bn(batches, theirs)
    update_bn(batches, ours)
    assert_matches_reference(ours, reference_stats(ours, batches))
    theirs(batches[0])  # initialised now
    update_bn(batches, ours)
    ts.update_bn(batches, theirs)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x, scale=1.0):
        return self.bn(x * scale)


def test_batch_structures():
    batches = data()
    expected = Keywords()
    update_bn(batches, expected)
    Pair = namedtuple("Pair", "x y")
    loaders = {
        "tuple": [(x, x.sum(1)) for x in batches],
        "list": [[x, None] for x in batches],
        "dict": [{"x": x} for x in batches],
        "namedtuple via forward": [Pair(x, 0) for x in batches],
        "nested dict via forward": [{"inputs": {"x": x / 2}} for x in batches],
    }
    forwards = {
        "namedtuple via forward": lambda model, batch: model(batch.x),
        "nested dict via forward": lambda model, batch: model(batch["inputs"]["x"], scale=2.0),
    }
    for name, loader in loaders.items():
        model = Keywords()
        update_bn(loader, model, device="cpu", forward=forwards.get(name))
        torch.testing.assert_close(model.state_dict(), expected.state_dict(), msg=name)


def test_max_batches_autocast_and_progress(capsys):
    batches = data()
    first_two = Keywords()
    update_bn(batches[:2], first_two)
    limited = Keywords()
    update_bn(iter(batches), limited, max_batches=2, progress=True)
    torch.testing.assert_close(limited.state_dict(), first_two.state_dict())
    assert "update_bn" in capsys.readouterr().err
    update_bn(batches, Keywords(), max_batches=2, progress=True)  # a sized loader: the bar ends full
    final = capsys.readouterr().err.split("\r")[-1]
    assert "2/2" in final, final

    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    full = copy.deepcopy(model)
    update_bn(batches, full)
    update_bn(batches, model, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(model[1].running_mean, full[1].running_mean, rtol=0.05, atol=0.05)
    assert not torch.equal(model[1].running_mean, full[1].running_mean)  # the linear layer did run in bf16


def test_modes_and_momenta_restored():
    model = Net()
    model.train()
    model.bn1.eval()
    model.bn0.momentum = 0.3
    update_bn(data(), model)
    assert model.training and model.fc.training and model.drop.training and not model.bn1.training
    assert model.bn0.momentum == 0.3 and model.shared.momentum == 0.1 and model.inorm.momentum == 0.1
    model.eval()
    update_bn(data(), model)
    assert not any(m.training for m in model.modules())


def test_empty_loader_raises_and_changes_nothing():
    model = Net()
    update_bn(data(), model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no batch"):
        update_bn([], model)
    torch.testing.assert_close(model.state_dict(), before)


def test_model_without_norm_layers_warns():
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.warns(UserWarning, match="no BatchNorm"):
        update_bn(data(), model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_batches"):
        update_bn(data(), Net(), max_batches=0)
    with pytest.raises(ValueError, match="weighting"):
        update_bn(data(), Net(), weighting="samples")
    with pytest.raises(TypeError, match="autocast_dtype"):
        update_bn(data(), Net(), autocast_dtype=torch.int8)


def test_no_host_synchronisation_per_batch():
    """torch's update_bn reads ``num_batches_tracked`` in every BatchNorm call (momentum=None); ours reads nothing."""
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    for function, syncs in ((update_bn, False), (ts.update_bn, True)):
        with OpCounter() as recorded:
            function(batches, SmallCNN())
        assert any(SYNC in op for op in recorded.ops) == syncs


def test_averaged_model_recalculation():
    """The SWA workflow: average, then recompute the statistics through the AveragedModel wrapper."""
    torch.manual_seed(4)
    model = SmallCNN()
    averaged = swa_utils.AveragedModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model.train()
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        averaged.update_parameters(model)
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    swa_utils.update_bn(batches, averaged)
    assert_matches_reference(averaged, reference_stats(averaged, batches))
