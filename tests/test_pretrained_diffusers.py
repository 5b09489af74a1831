"""The average as a diffusers model folder (``diffusion_pytorch_model.safetensors``, whole or sharded by an index),
written by ``export_pretrained``, ``save_pretrained`` and ``polyak export --like``, loaded back by diffusers."""

from __future__ import annotations

import json

import pytest
import torch

import polyak
from polyak.cli import main
from polyak.io import open_safetensors, save_state_dict

WEIGHTS = "diffusion_pytorch_model.safetensors"
DECAY = 0.5


def diffusers_or_skip():  # type: ignore[no-untyped-def]
    return pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'polyak[dev]')")


@pytest.mark.parametrize("sharded", [False, True])
def test_a_diffusers_layout_is_exported_like_a_transformers_one(tmp_path, sharded):
    """A folder laid out as diffusers writes it, made by hand: needs no diffusers."""
    torch.manual_seed(0)
    base = {
        "conv_in.weight": torch.randn(4, 1, 3, 3),
        "conv_in.bias": torch.randn(4),
        "time.linear.weight": torch.randn(8, 4),
    }
    like = tmp_path / "unet"
    like.mkdir()
    (like / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 1}))
    if sharded:
        shards = {"conv_in.weight": 1, "conv_in.bias": 1, "time.linear.weight": 2}
        for number in (1, 2):
            part = {name: value for name, value in base.items() if shards[name] == number}
            save_state_dict(part, like / f"diffusion_pytorch_model-0000{number}-of-00002.safetensors")
        weight_map = {name: f"diffusion_pytorch_model-0000{n}-of-00002.safetensors" for name, n in shards.items()}
        (like / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_state_dict(base, like / WEIGHTS)
    averaged = {name: value * 0.5 for name, value in base.items()}
    torch.save({"ema": {"format": "polyak.averager/1", "shadow": averaged}}, tmp_path / "last.pt")

    folder, left_out = polyak.export_pretrained(tmp_path / "last.pt", like, tmp_path / "out")
    assert left_out == [] and sorted(p.name for p in folder.iterdir()) == ["config.json", WEIGHTS]
    written = open_safetensors(folder / WEIGHTS)
    assert set(written) == set(base) and all(torch.equal(written[n], v) for n, v in averaged.items())
    assert main(["export", str(tmp_path / "last.pt"), "--like", str(like), "-o", str(tmp_path / "cli"), "-q"]) == 0
    assert (tmp_path / "cli" / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()


def tiny_unet(diffusers, seed: int = 0) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
    )


def train(model: torch.nn.Module, averager: polyak.EMA, steps: int = 3) -> dict[str, torch.Tensor]:
    """A few SGD steps of denoising; returns the float64 EMA of the parameters by name, computed here."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        noise = torch.randn(2, 1, 8, 8, generator=generator)
        model(noise, torch.tensor([step, step + 1])).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        averager.update(model)
        for name, p in model.named_parameters():
            p = p.detach().double()
            reference[name] = p.clone() if step == 0 else DECAY * reference[name] + (1 - DECAY) * p
    return reference


def assert_holds(loaded: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    params = dict(loaded.named_parameters())
    assert set(params) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(params[name].double(), value, rtol=1e-6, atol=1e-7, msg=name)


def test_diffusers_model_folders_load_with_from_pretrained(tmp_path):
    diffusers = diffusers_or_skip()
    model = tiny_unet(diffusers)
    model.save_pretrained(tmp_path / "start")
    model.save_pretrained(tmp_path / "start-sharded", max_shard_size="20KB")
    assert (tmp_path / "start-sharded" / f"{WEIGHTS}.index.json").is_file()
    ema = polyak.EMA(model, decay=DECAY)
    reference = train(model, ema)
    trained = {name: value.clone() for name, value in model.state_dict().items()}

    polyak.save_pretrained(ema, tmp_path / "live")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())  # training weights are back
    assert_holds(diffusers.UNet2DModel.from_pretrained(tmp_path / "live"), reference)

    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, tmp_path / "last.pt")
    for like in ("start", "start-sharded"):
        folder, left_out = polyak.export_pretrained(tmp_path / "last.pt", tmp_path / like, tmp_path / f"{like}-ema")
        assert (
            left_out == [] and (folder / "config.json").read_bytes() == (tmp_path / like / "config.json").read_bytes()
        )
        assert_holds(diffusers.UNet2DModel.from_pretrained(folder), reference)
        argv = [
            "export",
            str(tmp_path / "last.pt"),
            "--like",
            str(tmp_path / like),
            "-o",
            str(tmp_path / f"{like}-cli"),
        ]
        assert main([*argv, "-q"]) == 0
        assert_holds(diffusers.UNet2DModel.from_pretrained(tmp_path / f"{like}-cli"), reference)

    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "start")  # its folder is an input of save_pretrained
    follower = polyak.EMA(loaded, decay=DECAY)
    follower.update()
    with pytest.raises(polyak.CheckpointError, match="is the folder the model was loaded from"):
        polyak.save_pretrained(follower, tmp_path / "start", overwrite=True)


def test_autoencoder_folder(tmp_path):
    diffusers = diffusers_or_skip()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        latent_channels=2,
        norm_num_groups=2,
        sample_size=8,
    )
    vae.save_pretrained(tmp_path / "vae")
    ema = polyak.EMA(vae, decay=DECAY)
    ema.update()
    expected = {name: value.detach().clone() for name, value in vae.named_parameters()}
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(1.0)
    ema.update()  # the average: halfway to the shifted weights
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    folder, _ = polyak.export_pretrained(tmp_path / "ema.pt", tmp_path / "vae", tmp_path / "vae-ema")
    loaded = dict(diffusers.AutoencoderKL.from_pretrained(folder).named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value + 0.5, rtol=0, atol=1e-6, msg=name)
