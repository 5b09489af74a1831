"""The average as a Hugging Face model folder and as a PEFT adapter folder, loaded back by their own loaders."""

from __future__ import annotations

import warnings

import pytest
import torch

import polyak
from polyak.io import CheckpointError
from polyak.pretrained import export_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

DECAY = 0.5


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def train(model: torch.nn.Module, averager: polyak.EMA, steps: int = 3) -> dict[str, torch.Tensor]:
    """Train a few AdamW steps; returns the float64 EMA of the trained parameters, by name."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    reference: dict[str, torch.Tensor] = {}
    for step in range(steps):
        ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        averager.update(model)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p = p.detach().double()
                reference[name] = p.clone() if step == 0 else DECAY * reference[name] + (1 - DECAY) * p
    return reference


def assert_holds(loaded: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    params = dict(loaded.named_parameters())
    for name, value in reference.items():
        torch.testing.assert_close(params[name].double(), value, rtol=1e-6, atol=1e-7, msg=name)


def test_model_folder_from_the_averager_and_from_a_checkpoint(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "start")  # the folder training started from
    ema = polyak.EMA(model, decay=DECAY)
    reference = train(model, ema)
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        save_pretrained(ema, tmp_path / "live")
    assert not [w for w in seen if "swapped" in str(w.message)]  # polyak's own swap warning: the average is wanted
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())  # training weights are back
    assert_holds(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "live"), reference)

    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, tmp_path / "last.pt")
    folder, left_out = export_pretrained(tmp_path / "last.pt", tmp_path / "start", tmp_path / "exported")
    assert left_out == ["lm_head.weight"]  # tied to the embedding, which the folder holds
    assert (folder / "config.json").read_text() == (tmp_path / "start" / "config.json").read_text()
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    assert_holds(loaded, reference)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_peft_adapter_folder(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_gpt2(), config)
    model.save_pretrained(tmp_path / "adapter-start")
    ema = polyak.EMA(model, decay=DECAY, frozen="skip")  # the adapter only
    assert all("lora_" in name for name in ema.shadow.tensors())
    reference = train(model, ema)

    save_pretrained(ema, tmp_path / "live")
    assert (tmp_path / "live" / "adapter_config.json").is_file()
    assert_holds(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "live"), reference)

    torch.save({"ema": ema.state_dict()}, tmp_path / "last.pt")
    folder, left_out = export_pretrained(tmp_path / "last.pt", tmp_path / "adapter-start", tmp_path / "exported")
    assert left_out == []
    assert_holds(peft.PeftModel.from_pretrained(tiny_gpt2(), folder), reference)

    # An adapter-only average cannot fill a whole-model folder: refused, naming a tensor it lacks.
    tiny_gpt2().save_pretrained(tmp_path / "full")
    with pytest.raises(CheckpointError, match=r"no tensor for 'transformer.*adapter folder"):
        export_pretrained(tmp_path / "last.pt", tmp_path / "full", tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_refusals_and_an_interrupted_export_keeps_the_old_folder(tmp_path, monkeypatch):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "start")
    ema = polyak.EMA(model, decay=DECAY)
    train(model, ema, steps=1)
    torch.save({"ema": ema.state_dict()}, tmp_path / "last.pt")

    with pytest.raises(TypeError, match="transformers or PEFT model"):
        save_pretrained(polyak.EMA(torch.nn.Linear(2, 2), decay=DECAY), tmp_path / "plain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        export_pretrained(tmp_path / "last.pt", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(CheckpointError, match="must be a model or adapter folder"):
        export_pretrained(tmp_path / "last.pt", tmp_path / "last.pt", tmp_path / "out")
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"c_attn.bias.*holds shape \[24\], the average \[48\]"):
        export_pretrained(tmp_path / "last.pt", tmp_path / "other", tmp_path / "out")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        export_pretrained(tmp_path / "last.pt", tmp_path / "start", tmp_path / "a-file")

    out = tmp_path / "out"
    export_pretrained(tmp_path / "last.pt", tmp_path / "start", out)
    out.chmod(0o750)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise CheckpointError("disk full")

    monkeypatch.setattr("polyak.pretrained.save_state_dict", full_disk)
    with pytest.raises(CheckpointError, match="disk full"):
        export_pretrained(tmp_path / "last.pt", tmp_path / "start", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    monkeypatch.undo()
    export_pretrained(tmp_path / "last.pt", tmp_path / "start", out, overwrite=True)  # the folder keeps its mode
    assert out.stat().st_mode & 0o777 == 0o750


def test_cli_export_like_a_folder(tmp_path, capsys):
    from polyak.cli import main

    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "start")
    ema = polyak.EMA(model, decay=DECAY)
    reference = train(model, ema, steps=2)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, tmp_path / "last.pt")
    argv = ["export", str(tmp_path / "last.pt"), "--like", str(tmp_path / "start"), "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    err = capsys.readouterr().err  # the tied lm_head.weight is a note, not a loss: from_pretrained re-ties it
    assert "'lm_head.weight', tied to the input embedding; from_pretrained re-ties it on load" in err
    assert "left out" not in err
    assert_holds(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out"), reference)
    assert main([*argv, "--format", "pt"]) == 2
    assert "--format does not apply with --like" in capsys.readouterr().err
    assert main([*argv[:3], str(tmp_path / "nowhere"), *argv[4:]]) == 2
    assert "must be a model or adapter folder" in capsys.readouterr().err
