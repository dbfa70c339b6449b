"""Time-series forecasting: PatchTST on the shared core, DLinear and an encoder–decoder baseline, ETT-format data."""

from polyformer.domains.timeseries.data import (
    BundledForecastDataModule,
    CSVForecastDataModule,
    ForecastDataModule,
    WindowDataset,
    split_borders,
    validate_frame,
)
from polyformer.domains.timeseries.model import (
    DLinear,
    DLinearConfig,
    EncoderDecoderConfig,
    EncoderDecoderForecaster,
    PatchTST,
    PatchTSTConfig,
    RevIN,
)
from polyformer.domains.timeseries.pretrain import PatchTSTPretrainTask
from polyformer.domains.timeseries.task import DLinearTask, EncoderDecoderTask, ForecastTask, PatchTSTTask
