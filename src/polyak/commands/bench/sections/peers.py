"""Other libraries' updates: torch's ``AveragedModel``, the target-network updates of stable-baselines3, TorchRL
and lightly (re-implemented from their documented rules, on the RL shapes), and timm, ema-pytorch and torch_ema
where they are installed."""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..goals import Goal
from ..harness import DECAY, Contender, Step
from ..shapes import RL_SHAPES

__all__ = ["CONTENDERS", "GOALS"]


def _target_pairs(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(online, target) parameter pairs with a deep-copied target network, as RL libraries keep one."""
    target = copy.deepcopy(model)
    return list(zip(model.parameters(), target.parameters(), strict=True))


def _sb3_polyak_update(model: nn.Module) -> Step:
    """stable-baselines3's ``polyak_update`` (re-implemented from its documented loop): per tensor,
    ``target.mul_(1 - tau)`` then ``torch.add(target, online, alpha=tau, out=target)`` on ``.data``."""
    pairs, tau = _target_pairs(model), 1 - DECAY

    def step() -> None:
        with torch.no_grad():
            for online, target in pairs:
                target.data.mul_(1 - tau)
                torch.add(target.data, online.data, alpha=tau, out=target.data)

    return step


def _torchrl_soft_update(model: nn.Module) -> Step:
    """TorchRL's ``SoftUpdate`` (re-implemented from its documented rule target = eps * target + (1 - eps) *
    online): one ``lerp_`` per tensor; its TensorDict traversal is not included."""
    pairs, eps = _target_pairs(model), DECAY

    def step() -> None:
        for online, target in pairs:
            target.data.lerp_(online.data, 1 - eps)

    return step


def _lightly_update_momentum(model: nn.Module) -> Step:
    """lightly's ``update_momentum`` (re-implemented from its documented rule): per parameter,
    ``ema.data = ema.data * m + param.data * (1 - m)`` under ``no_grad`` (two temporaries per tensor)."""
    pairs, m = _target_pairs(model), DECAY

    def step() -> None:
        with torch.no_grad():
            for online, target in pairs:
                target.data = target.data * m + online.data * (1.0 - m)

    return step


def _averaged_model(multi: bool) -> Callable[[nn.Module], Step]:
    def build(model: nn.Module) -> Step:
        from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

        if multi:
            average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
        else:
            average = AveragedModel(model, avg_fn=get_ema_avg_fn(DECAY), use_buffers=True)
        return lambda: average.update_parameters(model)

    return build


@functools.cache
def _timm_model_ema_v3() -> type | None:
    """timm's ``ModelEmaV3``, loaded from its own file: ``import timm`` needs torchvision, the file only torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    file_spec = importlib.util.spec_from_file_location("_polyak_bench_timm_model_ema", path)
    if file_spec is None or file_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except (ImportError, OSError):  # another timm version may import more than torch there
        return None
    return getattr(module, "ModelEmaV3", None)


def _timm(model: nn.Module) -> Step:
    average = _timm_model_ema_v3()(model, decay=DECAY)  # type: ignore[misc]
    return lambda: average.update(model)


def _ema_pytorch(model: nn.Module) -> Step:
    from ema_pytorch import EMA as LucidrainsEMA

    average = LucidrainsEMA(model, beta=DECAY, update_after_step=0, update_every=1)
    return average.update


def _torch_ema(model: nn.Module) -> Step:
    from torch_ema import ExponentialMovingAverage

    average = ExponentialMovingAverage(model.parameters(), decay=DECAY)
    return average.update


def _installed(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


_RL = "re-implemented"
CONTENDERS = [
    Contender("torch AveragedModel, per-tensor avg_fn", _averaged_model(multi=False)),
    Contender("stable-baselines3 polyak_update", _sb3_polyak_update, note=_RL, shapes=RL_SHAPES),
    Contender("TorchRL SoftUpdate", _torchrl_soft_update, note=_RL, shapes=RL_SHAPES),
    Contender("lightly update_momentum", _lightly_update_momentum, note=_RL, shapes=RL_SHAPES),
    Contender("torch AveragedModel, get_ema_multi_avg_fn", _averaged_model(multi=True)),
    Contender("timm ModelEmaV3", _timm, available=lambda: _timm_model_ema_v3() is not None),
    Contender("ema-pytorch EMA", _ema_pytorch, available=_installed("ema_pytorch")),
    Contender("torch_ema", _torch_ema, note="parameters only", available=_installed("torch_ema")),
]
GOALS: list[Goal] = []
