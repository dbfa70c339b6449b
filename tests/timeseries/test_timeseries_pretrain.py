"""PatchTST's masked-patch pre-training: it learns to fill in hidden patches, its encoder initialises a forecaster
(on another table with another channel count), and mismatched encoders or settings fail naming the field."""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from polyformer.domains.timeseries import CSVForecastDataModule, PatchTSTConfig, PatchTSTPretrainTask, PatchTSTTask
from polyformer.checkpoint import save_weights
from polyformer.finetune import FinetuneConfig
from polyformer.masking import MaskingConfig
from polyformer.pretraining import MaskedModelingConfig
from polyformer.training import OptimizerConfig
from polyformer.transformer import TransformerConfig

# sinusoidal positions: with learned ones (initialised near zero) the loss sits on a plateau for a few hundred steps
ENCODER = TransformerConfig(dim=16, depth=2, heads=2, mlp_ratio=2.0, prenorm=False, position="sinusoidal")


def series_csv(path, channels: int, rows: int = 600):
    rng = np.random.default_rng(channels)
    t = np.arange(rows)
    columns = {f"c{i}": np.sin(2 * np.pi * t / (12 + 6 * i) + i) + 0.05 * rng.standard_normal(rows)
               for i in range(channels)}
    pd.DataFrame({"date": pd.date_range("2021-01-01", periods=rows, freq="h"), **columns}).to_csv(path, index=False)
    return path


def pretrain_task(**changes) -> PatchTSTPretrainTask:
    config = PatchTSTConfig(**{"lookback": 48, "horizon": 0, "patch_len": 8, "stride": 8, "padding": "none",
                               "encoder": ENCODER, "embed_dropout": 0.0, **changes})
    return PatchTSTPretrainTask(config, optimizer=OptimizerConfig(lr=5e-3, weight_decay=0.0))


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kwargs)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pre-trained encoder on a 2-channel table: (weights path, validation losses before and after)."""
    tmp_path = tmp_path_factory.mktemp("pretrain")
    L.seed_everything(0)
    data = CSVForecastDataModule(str(series_csv(tmp_path / "two.csv", 2)), lookback=48, horizon=1, batch_size=16)
    task = pretrain_task()
    run = trainer(tmp_path, max_epochs=10)
    before = run.validate(task, datamodule=data, verbose=False)[0]["val/loss"]
    run.fit(task, datamodule=data)
    after = run.validate(task, datamodule=data, verbose=False)[0]["val/loss"]
    run.save_checkpoint(tmp_path / "full.ckpt")
    save_weights(tmp_path / "full.ckpt", tmp_path / "encoder.ckpt")
    return tmp_path / "encoder.ckpt", before, after


def test_pretraining_learns_to_fill_in_masked_patches(pretrained):
    _, before, after = pretrained
    assert after < 0.5 * before, (before, after)


def test_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    task = pretrain_task()
    x = torch.randn(4, 48, 3)
    torch.manual_seed(1)  # the same mask in both calls below (nothing else draws random numbers here)
    predictions, targets, mask = task.predict_masked((x, None))
    assert predictions.shape == targets.shape == (12, 6, 8)  # (b c) series, 6 patches of 8
    assert mask.mask.sum(dim=1).eq(6 - int(6 * 0.6)).all()
    exact = torch.where(mask.mask[..., None], targets, predictions)  # perfect on masked patches only
    task.decoder.forward = lambda encoded, mask: exact
    torch.manual_seed(1)
    assert task.step((x, None), "train").item() == 0.0


def test_encoder_fine_tunes_a_forecaster_on_a_table_with_other_channels(tmp_path, pretrained, caplog):
    weights, *_ = pretrained
    data = CSVForecastDataModule(str(series_csv(tmp_path / "three.csv", 3)), lookback=48, horizon=12, batch_size=32)
    config = PatchTSTConfig(lookback=48, horizon=12, patch_len=8, stride=8, padding="none", encoder=ENCODER,
                            embed_dropout=0.0)
    L.seed_everything(0)
    task = PatchTSTTask(config, OptimizerConfig(lr=5e-3, weight_decay=0.0), init_from=str(weights),
                        finetune=FinetuneConfig(freeze_steps=5))
    with caplog.at_level("INFO"):
        run = trainer(tmp_path, max_epochs=4)
        run.fit(task, datamodule=data)
    assert "missing (kept at their initialisation): ['model.head.weight', 'model.head.bias']" in caplog.text
    assert "unexpected (not used): ['mask_token', 'decoder.head.weight', 'decoder.head.bias']" in caplog.text
    metrics = run.test(task, datamodule=data, verbose=False)[0]
    zero_forecast = float(torch.stack([y for _, y in data.datasets["test"]]).pow(2).mean())
    assert metrics["test/mse"] < 0.3 * zero_forecast


def test_an_encoder_of_another_shape_is_refused_naming_field_and_values(pretrained):
    weights, *_ = pretrained
    other = PatchTSTConfig(lookback=48, horizon=12, patch_len=12, stride=12, padding="none", encoder=ENCODER)
    task = PatchTSTTask(other, init_from=str(weights))
    with pytest.raises(ValueError, match=r"does not match this model: model.patch_len: checkpoint 8, this model 12; "
                                         r"model.stride: checkpoint 8, this model 12"):
        task.setup("fit")
    wide = PatchTSTConfig(lookback=48, horizon=12, patch_len=8, stride=8, padding="none",
                          encoder=TransformerConfig(**{**ENCODER.__dict__, "dim": 32, "depth": 3}))
    with pytest.raises(ValueError, match=r"model.encoder.dim: checkpoint 16, this model 32; model.encoder.depth: "
                                         r"checkpoint 2, this model 3"):
        PatchTSTTask(wide, init_from=str(weights)).setup("fit")


@pytest.mark.parametrize(("changes", "pretraining", "message"), [
    ({"horizon": 96}, None, r"expected model.horizon=0 \(no forecasting head\), found 96"),
    ({"stride": 4}, None, r"expected model.stride == model.patch_len, found stride=4, patch_len=8"),
    ({}, MaskedModelingConfig(masking=MaskingConfig(ratio=0.4)), r"expected pretraining.visible_only=false"),
])
def test_bad_pretraining_settings_name_the_field(changes, pretraining, message):
    config = PatchTSTConfig(**{"lookback": 48, "horizon": 0, "patch_len": 8, "stride": 8, "padding": "none",
                               "encoder": ENCODER, **changes})
    with pytest.raises(ValueError, match=message):
        PatchTSTPretrainTask(config, pretraining)
