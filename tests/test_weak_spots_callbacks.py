"""The trainer callbacks' resume path and swap, and PEFT adapter names: where planted bugs went unseen.

References: the documented precedence (``resume_from_checkpoint`` when it names a folder, else
``output_dir/checkpoint-<step>``), the training iterates recorded by an optimizer hook, and adapter names written
out by hand (PEFT drops the adapter's name from the names in its files).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import polyak
from polyak.pretrained import _match


def _ema_state(seed: int, steps: int = 3) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.8)
    for _ in range(steps):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        ema.update()
    return model, ema.state_dict()


def test_transformers_resume_prefers_the_named_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    from polyak.integrations.transformers import STATE_FILE, AveragingCallback

    _, in_output_dir = _ema_state(0)
    _, elsewhere = _ema_state(1)
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "copied").mkdir()
    torch.save({"global_step": 3, "averager": in_output_dir}, tmp_path / "out" / "checkpoint-3" / STATE_FILE)
    torch.save({"global_step": 3, "averager": elsewhere}, tmp_path / "copied" / STATE_FILE)

    def resumed(resume_from_checkpoint) -> dict:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), resume_from_checkpoint=resume_from_checkpoint, report_to="none"
        )
        callback = AveragingCallback(lambda m: polyak.EMA(m, decay=0.8))
        callback.averager = polyak.EMA(nn.Linear(3, 2), decay=0.8)
        callback._resume(args, 3, STATE_FILE)
        return callback.averager.state_dict()["shadow"]

    for key, value in resumed(str(tmp_path / "copied")).items():
        assert torch.equal(value, elsewhere["shadow"][key]), key
    for key, value in resumed(None).items():
        assert torch.equal(value, in_output_dir["shadow"][key]), key
    # a state of another step is refused, wherever it is found
    torch.save({"global_step": 2, "averager": elsewhere}, tmp_path / "copied" / STATE_FILE)
    with pytest.raises(RuntimeError, match="written at step 2, but training resumes at step 3"):
        resumed(str(tmp_path / "copied"))


def test_lightning_callbacks_see_the_training_weights_on_exception(tmp_path):
    """An error in the averaged validation pass: the swap is closed before the error leaves the pass, so every
    callback's on_exception (one listed before the averaging callback too) sees the training weights."""
    pl = pytest.importorskip("lightning.pytorch")
    from test_integrations_lightning import FailingValidation, assert_equal, ema, loader, trainer

    from polyak.integrations.lightning import AveragingCallback

    class Recorder(pl.Callback):
        seen: dict | None = None

        def on_exception(self, trainer, pl_module, exception):
            self.seen = pl_module.weights()

    model = FailingValidation(6, RuntimeError("failure"))  # call 6: the second validation's averaged pass
    recorder = Recorder()
    t = trainer(tmp_path, [recorder, AveragingCallback(ema)])
    with pytest.raises(RuntimeError, match="failure"):
        t.fit(model, loader(), loader(8, seed=1))
    assert recorder.seen is not None
    assert_equal(recorder.seen, model.iterates[-1])


def test_adapter_names_pair_only_when_unambiguous():
    base = "base_model.model.h.0.attn.c_attn"
    one = [f"{base}.lora_A.default.weight", f"{base}.lora_B.default.weight"]
    assert _match([f"{base}.lora_A.weight", f"{base}.lora_B.weight"], one) == {
        f"{base}.lora_A.weight": f"{base}.lora_A.default.weight",
        f"{base}.lora_B.weight": f"{base}.lora_B.default.weight",
    }
    two = [*one, f"{base}.lora_A.other.weight"]  # two adapters: lora_A could be either
    assert _match([f"{base}.lora_A.weight", f"{base}.lora_B.weight"], two) == {
        f"{base}.lora_B.weight": f"{base}.lora_B.default.weight"
    }
    exact = [f"{base}.lora_A.weight", f"{base}.lora_A.default.weight"]  # the same name wins over a widened one
    assert _match([f"{base}.lora_A.weight"], exact) == {f"{base}.lora_A.weight": f"{base}.lora_A.weight"}


def test_export_of_an_average_of_two_adapters_names_the_ambiguous_tensor(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from polyak.io import CheckpointError
    from polyak.pretrained import export_pretrained

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)
    model.save_pretrained(tmp_path / "adapter")
    model.add_adapter("other", copy.deepcopy(lora))
    ema = polyak.EMA(model, decay=0.8, frozen="average")  # every tensor, both adapters included
    ema.update()
    torch.save({"ema": ema.state_dict()}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"no tensor for '.*lora_A\.weight'"):
        export_pretrained(tmp_path / "last.pt", tmp_path / "adapter", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
