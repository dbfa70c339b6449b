"""Forecasting tasks end to end: training beats the zero forecast, checkpoints reload, configs parse, checks fire."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from polyformer.cli import PolyformerCLI
from polyformer.domains.timeseries import (
    CSVForecastDataModule,
    DLinearConfig,
    DLinearTask,
    EncoderDecoderConfig,
    EncoderDecoderTask,
    PatchTSTConfig,
    PatchTSTTask,
)
from polyformer.training import OptimizerConfig
from polyformer.transformer import TransformerConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "timeseries").glob("*.yaml"))


@pytest.fixture()
def sine_csv(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(400)
    frame = pd.DataFrame({"date": pd.date_range("2021-01-01", periods=400, freq="h"),
                          "a": np.sin(2 * np.pi * t / 24) + 0.05 * rng.standard_normal(400),
                          "b": np.cos(2 * np.pi * t / 12) * 2 + 0.05 * rng.standard_normal(400)})
    frame.to_csv(tmp_path / "sine.csv", index=False)
    return tmp_path / "sine.csv"


def tiny_patchtst_task(lookback: int = 48) -> PatchTSTTask:
    encoder = TransformerConfig(dim=16, depth=1, heads=2, mlp_ratio=2.0, prenorm=False, position="learned")
    return PatchTSTTask(PatchTSTConfig(lookback=lookback, horizon=12, patch_len=8, stride=8, encoder=encoder,
                                       embed_dropout=0.0), OptimizerConfig(lr=1e-2, weight_decay=0.0))


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def fit_and_test(tmp_path, make_task, sine_csv, epochs: int):
    """Seeded build, fit and test on the sine series: (test metrics, the zero forecast's MSE, task, trainer, data)."""
    L.seed_everything(0)
    data = CSVForecastDataModule(str(sine_csv), lookback=48, horizon=12, batch_size=32)
    task = make_task()
    run = trainer(tmp_path, max_epochs=epochs)
    run.fit(task, datamodule=data)
    metrics = run.test(task, datamodule=data, verbose=False)[0]
    zero_forecast = float(torch.stack([y for _, y in data.datasets["test"]]).pow(2).mean())
    return metrics, zero_forecast, task, run, data


def test_patchtst_learns_a_periodic_series_and_reloads(tmp_path, sine_csv):
    metrics, zero_forecast, task, run, data = fit_and_test(tmp_path, tiny_patchtst_task, sine_csv, epochs=4)
    assert metrics["test/mse"] < 0.3 * zero_forecast, (metrics, zero_forecast)
    assert metrics["test/mae"] > 0

    path = tmp_path / "task.ckpt"
    run.save_checkpoint(path)
    reloaded = PatchTSTTask.load_from_checkpoint(path).eval()
    x = data.datasets["test"][0][0][None]
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), task(x))


# (task, fraction of the zero forecast's MSE to beat): the vanilla Transformer learns slowest of the three
@pytest.mark.parametrize("make_task, fraction", [
    (lambda: DLinearTask(DLinearConfig(lookback=48, horizon=12, kernel=5), OptimizerConfig(lr=1e-2, weight_decay=0.0)), 0.5),
    (lambda: EncoderDecoderTask(EncoderDecoderConfig(
        lookback=48, horizon=12, channels=2, label_len=12,
        encoder=TransformerConfig(dim=16, depth=1, heads=2, position="sinusoidal"),
        decoder=TransformerConfig(dim=16, depth=1, heads=2, position="sinusoidal", causal=True)),
        OptimizerConfig(lr=5e-3, weight_decay=0.0, warmup_steps=5)), 0.9),
], ids=["dlinear", "encoder_decoder"])
def test_baselines_train_and_test_the_same_way(tmp_path, sine_csv, make_task, fraction):
    metrics, zero_forecast, *_ = fit_and_test(tmp_path, make_task, sine_csv, epochs=8)
    assert metrics["test/mse"] < fraction * zero_forecast, (metrics, zero_forecast)


def test_data_and_model_windows_must_agree(tmp_path, sine_csv):
    data = CSVForecastDataModule(str(sine_csv), lookback=36, horizon=12)
    with pytest.raises(ValueError, match=r"data.lookback=36 but model.lookback=48"):
        trainer(tmp_path, max_steps=1).fit(tiny_patchtst_task(), datamodule=data)
    task = EncoderDecoderTask(EncoderDecoderConfig(lookback=36, horizon=12, channels=7, label_len=12))
    with pytest.raises(ValueError, match=r"the data has 2 channels \(\['a', 'b'\]\) but model.channels=7"):
        trainer(tmp_path, max_steps=1).fit(task, datamodule=data)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_configs_parse_and_agree(config):
    cli = PolyformerCLI(args=["-c", str(config), "--trainer.logger=false"], run=False)
    model_config, data = cli.model.model.config, cli.datamodule
    if "pretrain" in config.stem:  # the encoder alone: no horizon of its own
        assert model_config.lookback == data.lookback and model_config.horizon == 0
    else:
        assert (model_config.lookback, model_config.horizon) == (data.lookback, data.horizon)
