"""Swin Transformer on the core: timm parity (the issue's swin_tiny at 224, and a small model whose grids need
padding and odd-sized merging), the shifted-window mask, and training gradients."""

from __future__ import annotations

import pytest
import timm
import torch

from polyformer.domains.vision.swin import SwinConfig, SwinTransformer, shifted_window_mask, window_shape


def parity(model: torch.nn.Module, images: torch.Tensor) -> float:
    ours = SwinTransformer.from_timm(model.eval()).eval()
    with torch.no_grad():
        return (ours(images) - model(images)).abs().max().item()


def test_swin_tiny_matches_timm(one_torch_thread):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    # random init gives logits of ~0.7; scaling the head makes a difference visible at the 1e-5
    model.head.fc.weight.data.mul_(20)
    assert parity(model, torch.randn(2, 3, 224, 224)) <= 1e-5


def test_swin_with_padded_windows_and_odd_merging_matches_timm():
    torch.manual_seed(0)
    # grids 18×13 (windows of 4: padded to 20×16) then 9×7 (odd: merging pads), 5×4 (window shrinks, no shift)
    model = timm.models.swin_transformer.SwinTransformer(
        img_size=(72, 52), patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4),
        window_size=4, drop_path_rate=0.0)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.2)  # weights far from init, so every tensor matters
    assert parity(model, torch.randn(3, 1, 72, 52)) <= 1e-5


def test_shifted_window_mask_separates_rolled_regions():
    mask = shifted_window_mask((8, 8), (4, 4), (2, 2), torch.device("cpu"))  # 4 windows of 16 tokens
    assert mask.shape == (4, 16, 16)
    assert mask[0].all()  # the top-left window holds one region only
    # the bottom-right window holds four regions of 2×2 tokens: each token sees its own 4
    assert mask[3].sum(dim=-1).tolist() == [4] * 16
    assert window_shape((7, 9), 7) == ((7, 7), (0, 3))  # a side no larger than the window: one window, no shift


def test_swin_trains_and_rejects_bad_configs():
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(img_size=32, patch_size=2, in_chans=3, num_classes=4, dim=16, depths=[2, 2],
                                       heads=[2, 4], window=4, drop_path_rate=0.2, attn_drop_rate=0.1))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    maps = model.stages(images)
    assert [tuple(m.shape) for m in maps] == [(4, 16, 16, 16), (4, 8, 8, 32)]
    with pytest.raises(ValueError, match="depths and heads must name the same stages"):
        SwinConfig(depths=[2, 2], heads=[3])
    with pytest.raises(ValueError, match="stage 1: width 192 is not divisible by heads=5"):
        SwinConfig(heads=[3, 5, 12, 24])


def test_swin_digits_config_trains_from_the_cli_and_its_checkpoint_reloads_and_initialises(tmp_path):
    from pathlib import Path

    import lightning as L

    from polyformer.bench import history
    from polyformer.cli import main
    from polyformer.domains.vision import DigitsDataModule, SwinClassificationTask

    config = Path(__file__).resolve().parents[2] / "configs" / "vision" / "swin_tiny_digits.yaml"
    main(["fit", "-c", str(config), f"--run.root={tmp_path}", "--trainer.max_epochs=2",
          "--trainer.limit_train_batches=10", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=2",
          "--data.init_args.batch_size=32", "--model.init_args.optimizer.warmup_steps=0",
          "--model.init_args.optimizer.schedule=constant"])
    losses = history(tmp_path / "vision" / "swin_tiny_digits", "train/loss")
    assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3])
    assert len(history(tmp_path / "vision" / "swin_tiny_digits", "val/acc1")) == 2
    run = tmp_path / "vision" / "swin_tiny_digits" / "version_0"
    task = SwinClassificationTask.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(task.model, SwinTransformer) and task.model_config.depths == [2, 2]
    assert task.block_types and all(isinstance(b, task.block_types) for b in task.model.layers[0].blocks)
    data = DigitsDataModule()
    data.setup("test")
    metrics = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").test(task, datamodule=data,
                                                                                         verbose=False)[0]
    assert 0.0 <= metrics["test/acc1"] <= metrics["test/acc5"] <= 1.0
    # init_from copies every tensor of a checkpoint of the same architecture; another width is refused by name
    fresh = SwinClassificationTask(task.model_config, init_from=str(run / "checkpoints" / "last.ckpt"))
    fresh.load_pretrained(str(run / "checkpoints" / "last.ckpt"))
    for name, value in task.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    wider = SwinClassificationTask(SwinConfig(img_size=8, patch_size=1, in_chans=1, num_classes=10, dim=32,
                                              depths=[2, 2], heads=[2, 4], window=4))
    with pytest.raises(ValueError, match="model.dim"):
        wider.load_pretrained(str(run / "checkpoints" / "last.ckpt"))
    with pytest.raises(ValueError, match="model.num_classes >= 1"):
        SwinClassificationTask(SwinConfig(num_classes=0))
