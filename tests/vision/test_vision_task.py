"""The classification task: trains from the CLI config, checkpoints load weights-only, init_from (checkpoint and
timm:<name>, the latter with timm's download replaced), DeiT hard-label distillation, and all configs parse."""

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from polyformer.cli import PolyformerCLI, main
from polyformer.domains.vision import (
    DigitsDataModule,
    DistillationConfig,
    ImageClassificationTask,
    ImageFolderDataModule,
    ViTConfig,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "vision"
TINY = ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, depth=1, heads=2, mlp_ratio=2.0)


def save_task(task: ImageClassificationTask, path: Path) -> Path:
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(path)
    return path


def test_digits_config_trains_from_the_cli_and_the_checkpoint_reloads(tmp_path):
    main(["fit", "-c", str(CONFIGS / "vit_tiny_digits.yaml"), f"--run.root={tmp_path}", "--trainer.max_epochs=3",
          "--trainer.limit_train_batches=12", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=2",
          "--data.init_args.batch_size=32", "--model.init_args.optimizer.warmup_steps=0",
          "--model.init_args.optimizer.schedule=constant"])
    run = tmp_path / "vision" / "vit_tiny_digits" / "version_0"
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    losses = [float(row.split(",")[header.index("train/loss")]) for row in lines[1:]
              if row.split(",")[header.index("train/loss")]]
    assert len(losses) >= 12 and sum(losses[-4:]) < sum(losses[:4])
    assert "val/acc1" in header and "val/acc5" in header
    task = ImageClassificationTask.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert task.model_config.patch_size == 2 and task.model_config.in_chans == 1
    data = DigitsDataModule()
    data.setup("test")
    images, labels = next(iter(data.test_dataloader()))
    metrics = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").test(task, datamodule=data,
                                                                                         verbose=False)[0]
    # the logged accuracy is that of the model's own predictions over the whole test split (learning itself is
    # checked by the falling loss above: 36 steps are too few for an accuracy bound)
    task.eval()
    with torch.no_grad():
        batches = list(data.test_dataloader())
        predictions = torch.cat([task(x).argmax(dim=-1) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == 360 and metrics["test/acc1"] == pytest.approx((predictions == labels).float().mean().item())
    assert metrics["test/acc1"] <= metrics["test/acc5"]
    assert task(images).shape == (images.shape[0], 10)


@pytest.mark.parametrize("name", ["vit_tiny_digits", "vit_small_cifar10", "deit_small_imagenet"])
def test_configs_parse_and_build(name, tmp_path):
    cli = PolyformerCLI(args=["-c", str(CONFIGS / f"{name}.yaml"), f"--run.root={tmp_path}",
                              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                              "--trainer.precision=32-true"], run=False)
    assert isinstance(cli.model, ImageClassificationTask)
    if name == "deit_small_imagenet":  # ImageNet is not here: its classes are read from the folder at setup
        assert isinstance(cli.datamodule, ImageFolderDataModule) and cli.model.model_config.num_classes == 1000
    else:
        assert cli.model.model_config.num_classes == cli.datamodule.num_classes
    assert sum(p.numel() for p in cli.model.parameters()) > 0


def test_init_from_checkpoint_copies_the_backbone_and_keeps_a_new_head(tmp_path):
    torch.manual_seed(0)
    source = save_task(ImageClassificationTask(model=TINY), tmp_path / "source.ckpt")
    other = ViTConfig(**{**TINY.__dict__, "num_classes": 4, "img_size": 12})
    task = ImageClassificationTask(model=other, init_from=str(source))
    task.setup("fit")
    reference = ImageClassificationTask.load_from_checkpoint(source).model
    torch.testing.assert_close(task.model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    assert task.model.pos_embed.shape == (1, 1 + 36, 32)  # 4x4 grid resampled to 6x6
    assert task.model.head.weight.shape == (4, 32)


def test_init_from_timm_name_uses_timm_pretrained(monkeypatch):
    calls = []
    create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):  # stands in for the download: same model, random weights
        calls.append((name, pretrained))
        torch.manual_seed(3)
        return create(name, pretrained=False, depth=2, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    vit = ViTConfig(img_size=64, patch_size=16, num_classes=5, dim=192, depth=2, heads=3)
    task = ImageClassificationTask(model=vit, init_from="timm:vit_tiny_patch16_224")
    task.setup("fit")
    source = offline_create("vit_tiny_patch16_224")
    assert calls[0] == ("vit_tiny_patch16_224", True)
    expected = resample_abs_pos_embed(source.pos_embed, (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(task.model.pos_embed, expected, atol=1e-6, rtol=0)


def test_deit_hard_distillation_loss(tmp_path):
    torch.manual_seed(0)
    teacher_path = save_task(ImageClassificationTask(model=TINY), tmp_path / "teacher.ckpt")
    student_vit = ViTConfig(**{**TINY.__dict__, "distilled": True})
    task = ImageClassificationTask(model=student_vit, label_smoothing=0.1,
                                   distillation=DistillationConfig(teacher=str(teacher_path), alpha=0.5))
    task.setup("fit")
    assert not any(name.startswith("_teacher") for name in task.state_dict())
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(10, (6,))
    task.train()
    task.log = lambda *args, **kwargs: None
    loss = task.step((images, labels), "train")
    cls_logits, dist_logits = task.model.forward_heads(task.model.forward_features(images))
    teacher = ImageClassificationTask.load_from_checkpoint(teacher_path).model.eval()
    expected = 0.5 * F.cross_entropy(cls_logits, labels, label_smoothing=0.1) \
        + 0.5 * F.cross_entropy(dist_logits, teacher(images).argmax(-1))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="model.distilled=true"):
        ImageClassificationTask(model=TINY, distillation=DistillationConfig(teacher=str(teacher_path)))


def test_class_count_mismatch_between_model_and_data_is_named():
    task = ImageClassificationTask(model=ViTConfig(**{**TINY.__dict__, "num_classes": 7}))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(ValueError, match=r"the data has 10 classes, the model model.num_classes=7"):
        trainer.fit(task, datamodule=DigitsDataModule())


def test_no_weight_decay_for_positions_and_tokens():
    task = ImageClassificationTask(model=ViTConfig(**{**TINY.__dict__, "distilled": True}))
    decay, no_decay = task.parameter_groups()
    ids = {id(p) for p in no_decay["params"]}
    for name in ("pos_embed", "cls_token", "dist_token"):
        assert id(getattr(task.model, name)) in ids
    assert id(task.model.blocks[0].attn.qkv.weight) in {id(p) for p in decay["params"]}


def test_the_old_vit_argument_is_read_with_a_deprecation_message():
    with pytest.warns(DeprecationWarning, match="the argument `vit` is deprecated and will be removed: write `model`"):
        task = ImageClassificationTask(vit=TINY)
    assert task.model_config == TINY and "vit" not in task.hparams and task.hparams["model"] == TINY
    with pytest.raises(ValueError, match="`vit` is the old name of `model`: set one, found both"):
        ImageClassificationTask(model=TINY, vit=TINY)
