"""Forecasting tasks: MSE training, MSE and MAE on the scaled values for validation and test; optionally distilled
from a teacher forecaster (`distill`: the MSE to the truth mixed with the MSE to the teacher's forecast).

One task per model so that LightningCLI reads each model's typed config directly:

    model:
      class_path: polyformer.domains.timeseries.PatchTSTTask
      init_args: {model: {lookback: 336, horizon: 96, ...}, optimizer: {lr: 1.0e-4}}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyformer.domains.timeseries.model import (
    DLinear,
    DLinearConfig,
    EncoderDecoderConfig,
    EncoderDecoderForecaster,
    PatchTST,
    PatchTSTConfig,
)
from polyformer.deploy import Exportable
from polyformer.distillation import DistillConfig, TeacherHolder
from polyformer.finetune import FinetuneConfig
from polyformer.training import OptimizerConfig, PolyformerTask


class ForecastTask(PolyformerTask):
    """Batches are (x (b L c), y (b H c)); the loss is the MSE of the forecast."""

    model: nn.Module

    def __init__(self, optimizer: OptimizerConfig | None, init_from: str | None, finetune: FinetuneConfig | None,
                 distill: DistillConfig | None):
        super().__init__(optimizer, init_from=init_from, finetune=finetune)
        self.distill = distill
        self.teacher = TeacherHolder(distill) if distill is not None else None

    def step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        forecast = self.model(x)
        loss = F.mse_loss(forecast, y)
        if stage == "train" and self.teacher is not None:
            teacher_forecast = self.teacher(self, x)
            self.teacher.check(teacher_forecast, forecast, "(batch, horizon, channels)")
            loss = self.distill.mix(loss, F.mse_loss(forecast, teacher_forecast))
        if stage != "train":
            # epoch means weighted by batch size: exactly the mean over every window and channel of the split
            self.log(f"{stage}/mse", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
            self.log(f"{stage}/mae", F.l1_loss(forecast, y), on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        return loss

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def exportable(self) -> Exportable:
        """history (b L c) → forecast (b H c); channels are a dynamic axis unless the model is built for a count."""
        config = self.model.config
        fixed = getattr(config, "channels", None)
        return Exportable(self.model, ["history"], ["forecast"],
                          lambda batch, channels: (torch.randn(batch, config.lookback, fixed or channels),),
                          lengths=(fixed or 1, fixed or 7, fixed or 21),
                          dynamic_axes={"history": {0: "batch"} if fixed else {0: "batch", 2: "channels"}},
                          description=f"history (batch, {config.lookback}, channels) → forecast (batch, "
                                      f"{config.horizon}, channels), scaled values")

    def setup(self, stage: str) -> None:
        """The data's windows and channels must be the ones the model was built for."""
        super().setup(stage)
        datamodule = self.datamodule
        if datamodule is None or not hasattr(datamodule, "lookback"):
            return
        config = self.model.config
        for name in ("lookback", "horizon"):
            if getattr(datamodule, name) != getattr(config, name):
                raise ValueError(f"data.{name}={getattr(datamodule, name)} but model.{name}={getattr(config, name)}; "
                                 f"set both to the same value")
        if hasattr(config, "channels"):  # Lightning has set the data module up before this hook
            if datamodule.num_channels != config.channels:
                raise ValueError(f"the data has {datamodule.num_channels} channels ({datamodule.channels}) but "
                                 f"model.channels={config.channels}")


class PatchTSTTask(ForecastTask):
    architecture_fields = ("model.lookback", "model.patch_len", "model.stride", "model.padding", "model.encoder.dim",
                           "model.encoder.depth", "model.encoder.heads", "model.encoder.mlp_ratio")

    def __init__(self, model: PatchTSTConfig | None = None, optimizer: OptimizerConfig | None = None,
                 init_from: str | None = None, finetune: FinetuneConfig | None = None,
                 distill: DistillConfig | None = None):
        super().__init__(optimizer, init_from, finetune, distill)
        self.model_config = model or PatchTSTConfig()
        self.model = PatchTST(self.model_config)


class DLinearTask(ForecastTask):
    def __init__(self, model: DLinearConfig | None = None, optimizer: OptimizerConfig | None = None,
                 init_from: str | None = None, finetune: FinetuneConfig | None = None,
                 distill: DistillConfig | None = None):
        super().__init__(optimizer, init_from, finetune, distill)
        self.model_config = model or DLinearConfig()
        self.model = DLinear(self.model_config)


class EncoderDecoderTask(ForecastTask):
    def __init__(self, model: EncoderDecoderConfig | None = None, optimizer: OptimizerConfig | None = None,
                 init_from: str | None = None, finetune: FinetuneConfig | None = None,
                 distill: DistillConfig | None = None):
        super().__init__(optimizer, init_from, finetune, distill)
        self.model_config = model or EncoderDecoderConfig()
        self.model = EncoderDecoderForecaster(self.model_config)
