"""The fine-tuning toolkit of the training base: init_from by name, its report and errors, layer-wise lr decay,
freezing for some steps and linear probes; weights-only checkpoints."""

import logging

import lightning as L
import pytest
import torch

from polyformer.checkpoint import save_weights
from polyformer.finetune import FinetuneConfig, layer_ids
from polyformer.toy import SortingDataModule, SortingTask
from polyformer.training import OptimizerConfig
from polyformer.transformer import TransformerConfig

ENCODER = TransformerConfig(dim=32, depth=2, heads=2, mlp_ratio=2.0, position="learned", max_len=16)


def checkpoint_of(task: SortingTask, path) -> str:
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {}}, path)
    return str(path)


def fit(task: SortingTask, steps: int) -> None:
    data = SortingDataModule(length=8, vocab=6, train_size=256, val_size=32, test_size=32, batch_size=32)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=data)


def test_init_from_loads_by_name_and_reports_missing_and_unexpected(tmp_path, caplog):
    torch.manual_seed(0)
    source = SortingTask(vocab=6, encoder=ENCODER)
    state = {**source.state_dict(), "decoder.head.weight": torch.zeros(3, 3)}  # as a pre-training task leaves it
    del state["model.head.weight"], state["model.head.bias"]
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": state}, path)
    task = SortingTask(vocab=6, encoder=ENCODER, init_from=str(path))
    with caplog.at_level(logging.INFO):
        task.setup("fit")
    torch.testing.assert_close(task.model.encoder.blocks[1].mlp.fc2.weight, source.model.encoder.blocks[1].mlp.fc2.weight)
    assert not torch.equal(task.model.head.weight, source.model.head.weight)  # kept at its own initialisation
    report = caplog.text
    assert "loaded" in report and "['model.head.weight', 'model.head.bias']" in report
    assert "unexpected (not used): ['decoder.head.weight']" in report
    assert "model.head.weight" not in task._loaded and "model.embed.weight" in task._loaded


def test_a_bare_model_state_dict_loads_under_model(tmp_path):
    torch.manual_seed(0)
    source = SortingTask(vocab=6, encoder=ENCODER)
    path = tmp_path / "bare.pt"
    torch.save(source.model.state_dict(), path)
    task = SortingTask(vocab=6, encoder=ENCODER, init_from=str(path))
    task.setup("fit")
    torch.testing.assert_close(task.model.head.weight, source.model.head.weight)


def test_init_from_another_architecture_names_the_tensors_and_both_shapes(tmp_path):
    wide = TransformerConfig(**{**ENCODER.__dict__, "dim": 48})
    path = checkpoint_of(SortingTask(vocab=6, encoder=wide), tmp_path / "wide.ckpt")
    task = SortingTask(vocab=6, encoder=ENCODER, init_from=path)
    with pytest.raises(ValueError, match=r"init_from .*wide.ckpt: tensors do not fit this model .*shapes differ for "
                                         r"model.embed.weight \(checkpoint \(6, 48\) vs model \(6, 32\)\)"):
        task.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"init_from='.*missing.ckpt': expected a checkpoint file"):
        SortingTask(vocab=6, encoder=ENCODER, init_from=str(tmp_path / "missing.ckpt")).setup("fit")
    torch.save({"state_dict": {"something.else": torch.zeros(2)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=r"none of its 1 tensors \(\['something.else'\]...\) has a name of this"):
        SortingTask(vocab=6, encoder=ENCODER, init_from=str(tmp_path / "foreign.ckpt")).setup("fit")


def test_exclude_leaves_a_head_of_another_size_out(tmp_path):
    path = checkpoint_of(SortingTask(vocab=9, encoder=ENCODER), tmp_path / "nine.ckpt")
    task = SortingTask(vocab=9, encoder=ENCODER, init_from=path,
                       finetune=FinetuneConfig(exclude=["model.head.", "model.embed."]))
    task.setup("fit")
    assert not any(name.startswith(("model.head.", "model.embed.")) for name in task._loaded)


def test_layer_ids_follow_timm():
    names = ["model.embed.weight", "model.encoder.pos_embed.weight", "model.encoder.blocks.0.attn.qkv.weight",
             "model.encoder.blocks.1.mlp.fc1.weight", "model.encoder.norm.weight", "model.head.weight"]
    ids, depth = layer_ids(names)
    assert depth == 2
    assert [ids[name] for name in names] == [0, 0, 1, 2, 3, 3]


def test_layer_decay_scales_each_group_lr():
    task = SortingTask(vocab=6, encoder=ENCODER, optimizer=OptimizerConfig(lr=1.0),
                       finetune=FinetuneConfig(layer_decay=0.5))
    lr_of = {}
    for group in task.parameter_groups():
        for param in group["params"]:
            lr_of[param] = group["lr"]
    model = task.model
    assert lr_of[model.embed.weight] == 0.125  # stem: 0.5^(2 + 1)
    assert lr_of[model.encoder.blocks[0].attn.qkv.weight] == 0.25
    assert lr_of[model.encoder.blocks[1].norm2.weight] == 0.5
    assert lr_of[model.head.weight] == 1.0
    plain = SortingTask(vocab=6, encoder=ENCODER).parameter_groups()
    assert len(plain) == 2 and {group["lr"] for group in plain} == {1e-3}


@pytest.mark.parametrize(("finetune", "steps", "loaded_moves"), [
    (FinetuneConfig(freeze_steps=3), 3, False),
    (FinetuneConfig(freeze_steps=2), 4, True),
    (FinetuneConfig(linear_probe=True), 4, False),
])
def test_freezing_keeps_loaded_weights_while_the_new_head_trains(tmp_path, finetune, steps, loaded_moves):
    torch.manual_seed(0)
    source = SortingTask(vocab=6, encoder=ENCODER)
    state = {name: value for name, value in source.state_dict().items() if not name.startswith("model.head.")}
    path = tmp_path / "encoder.ckpt"
    torch.save({"state_dict": state}, path)
    task = SortingTask(vocab=6, encoder=ENCODER, init_from=str(path), finetune=finetune,
                       optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.1))
    head_before = task.model.head.weight.detach().clone()
    fit(task, steps)
    block = task.model.encoder.blocks[0].attn.qkv.weight
    assert torch.equal(block, source.model.encoder.blocks[0].attn.qkv.weight) != loaded_moves
    assert not torch.equal(task.model.head.weight, head_before)


def test_freezing_everything_that_was_loaded_is_refused(tmp_path):
    source = SortingTask(vocab=6, encoder=ENCODER)
    path = tmp_path / "whole.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)  # the head too: every parameter would be frozen
    task = SortingTask(vocab=6, encoder=ENCODER, init_from=str(path), finetune=FinetuneConfig(freeze_steps=5))
    with pytest.raises(ValueError, match="set every trainable parameter, so freezing .* leaves nothing to train"):
        task.load_pretrained(str(path))


def test_weights_only_checkpoint_keeps_hyper_parameters_and_fp32_weights(tmp_path):
    task = SortingTask(vocab=6, encoder=ENCODER)
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {k: v.half() for k, v in task.state_dict().items()}, "hyper_parameters": {"vocab": 6},
                "optimizer_states": [{"big": torch.zeros(1000)}], "pytorch-lightning_version": "2.5.0"}, full)
    digest = save_weights(full, tmp_path / "weights" / "w.ckpt")
    saved = torch.load(tmp_path / "weights" / "w.ckpt", weights_only=True)
    assert set(saved) == {"state_dict", "hyper_parameters", "pytorch-lightning_version"} and len(digest) == 64
    assert all(value.dtype == torch.float32 for value in saved["state_dict"].values())
    assert SortingTask.load_from_checkpoint(tmp_path / "weights" / "w.ckpt", encoder=ENCODER).model is not None
