"""MAE pre-training of the ViT: timm's MAE encoders load, the encoder sees visible patches only, the loss learns on
digits, the encoder initialises the classifier by name, and mismatches fail naming the field."""

from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from polyformer.cli import PolyformerCLI
from polyformer.domains.vision import DigitsDataModule, ImageClassificationTask, MAEPretrainTask, ViTConfig
from polyformer.domains.vision.model import VisionTransformer
from polyformer.domains.vision.timm_compat import vit_from_timm
from polyformer.checkpoint import save_weights
from polyformer.pretraining import MaskedModelingConfig
from polyformer.transformer import TransformerConfig

ROOT = Path(__file__).resolve().parents[2]
ENCODER = ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=0, dim=32, depth=2, heads=2, mlp_ratio=2.0,
                    global_pool="avg")
DECODER = TransformerConfig(dim=32, depth=1, heads=2, position="learned")


def mae_task(**changes) -> MAEPretrainTask:
    return MAEPretrainTask(ViTConfig(**{**ENCODER.__dict__, **changes}),
                           pretraining=MaskedModelingConfig(decoder=DECODER))


def test_timm_mae_encoder_loads_with_logits_parity():
    torch.manual_seed(0)
    theirs = timm.create_model("vit_base_patch16_224.mae", pretrained=False, depth=2, img_size=64).eval()
    assert theirs.num_classes == 0  # timm's MAE weights come without a head
    for param in theirs.parameters():
        param.data.add_(0.01 * torch.randn_like(param))
    ours = vit_from_timm(theirs).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-5, rtol=0)


def test_the_encoder_sees_only_the_visible_patches():
    torch.manual_seed(0)
    task = mae_task()
    seen = []
    task.model.blocks[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    images = torch.randn(3, 1, 8, 8)
    predictions, targets, mask = task.predict_masked((images, torch.zeros(3)))
    assert seen == [(3, 1 + 4, 32)]  # class token + 4 visible of 16 patches (75 % masked), no mask tokens
    assert predictions.shape == targets.shape == (3, 16, 4)
    torch.testing.assert_close(targets.mean(dim=-1), torch.zeros(3, 16), atol=1e-5, rtol=0)  # norm_pix_loss
    loss = task.step((images, torch.zeros(3)), "train")
    loss.backward()
    assert task.model.patch_embed.proj.weight.grad.abs().sum() > 0 and task.decoder.mask_token.grad.abs().sum() > 0


def test_mae_learns_on_digits_and_initialises_the_classifier(tmp_path, caplog):
    L.seed_everything(0)
    task = mae_task()
    data = DigitsDataModule(batch_size=64, augment=False)
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    before = trainer.validate(task, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(task, datamodule=data)
    after = trainer.validate(task, datamodule=data, verbose=False)[0]["val/loss"]
    assert after < 0.8 * before, (before, after)
    trainer.save_checkpoint(tmp_path / "mae.ckpt")
    save_weights(tmp_path / "mae.ckpt", tmp_path / "encoder.ckpt")

    classifier = ImageClassificationTask(model=ViTConfig(**{**ENCODER.__dict__, "num_classes": 10}),
                                         init_from=str(tmp_path / "encoder.ckpt"))
    with caplog.at_level("INFO"):
        classifier.setup("fit")
    for name, value in task.model.state_dict().items():
        torch.testing.assert_close(classifier.model.state_dict()[name], value, msg=name)
    assert "missing (kept at their initialisation): ['model.head.weight', 'model.head.bias']" in caplog.text
    assert "'decoder.mask_token'" in caplog.text and "'decoder.head.weight'" in caplog.text


@pytest.mark.parametrize(("changes", "message"), [
    ({"dim": 64, "heads": 4}, r"model.dim: checkpoint 32, this model 64; model.heads: checkpoint 2, this model 4"),
    ({"depth": 3}, r"model.depth: checkpoint 2, this model 3"),
    ({"patch_size": 4}, r"model.patch_size: checkpoint 2, this model 4"),
])
def test_an_encoder_of_another_shape_is_refused_naming_field_and_values(tmp_path, changes, message):
    path = tmp_path / "mae.ckpt"  # hyper-parameters under the old key "vit" (the committed MAE weights have it)
    torch.save({"state_dict": mae_task().state_dict(), "hyper_parameters": {"vit": ENCODER.__dict__}}, path)
    vit = ViTConfig(**{**ENCODER.__dict__, "num_classes": 10, **changes})
    with pytest.raises(ValueError, match=message):
        ImageClassificationTask(model=vit, init_from=str(path)).setup("fit")


def test_a_bare_state_dict_of_another_depth_is_refused_naming_the_blocks(tmp_path):
    path = tmp_path / "deeper.pt"
    torch.save(mae_task(depth=3).model.state_dict(), path)
    with pytest.raises(ValueError, match=r"model.blocks has 3 blocks in the checkpoint, 2 in this model \(depth\)"):
        ImageClassificationTask(model=ViTConfig(**{**ENCODER.__dict__, "num_classes": 10}),
                                init_from=str(path)).setup("fit")


def test_bad_mae_settings_name_the_field():
    with pytest.raises(ValueError, match=r"expected model.num_classes=0, found 10"):
        mae_task(num_classes=10)
    with pytest.raises(ValueError, match=r"expected pretraining.visible_only=true"):
        MAEPretrainTask(ENCODER, pretraining=MaskedModelingConfig(visible_only=False, decoder=DECODER))
    with pytest.raises(ValueError, match=r"needs images of model.img_size=8, found \(16, 16\)"):
        mae_task().tokens((torch.randn(1, 1, 16, 16), None))


@pytest.mark.parametrize("name", ["mae_tiny_digits", "vit_tiny_digits_finetune"])
def test_pretraining_configs_parse(name):
    cli = PolyformerCLI(args=["-c", str(ROOT / "configs" / "vision" / f"{name}.yaml"), "--trainer.logger=false"],
                        run=False)
    assert cli.model.model_config.patch_size == 2
