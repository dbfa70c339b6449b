"""Long Range Arena (Tay et al. 2021): ListOps, byte-level IMDB and Pathfinder-32 on the core's encoder, with LSTM and
S4D peers and self-pretraining on each task's own inputs (Amos et al. 2024)."""

from polyformer.domains.longrange.data import (
    ListOpsDataModule,
    LoaderConfig,
    PathfinderDataModule,
    SequenceDataModule,
    TextDataModule,
    collate,
    read_reviews,
)
from polyformer.domains.longrange.listops import ListOpsSpec
from polyformer.domains.longrange.model import (
    LSTMConfig,
    S4DConfig,
    SequenceClassifier,
    SequenceClassifierConfig,
)
from polyformer.domains.longrange.pathfinder import PathfinderSpec
from polyformer.domains.longrange.task import LongRangePretrainTask, LongRangeTask, TokenMeter

__all__ = [
    "ListOpsDataModule", "LoaderConfig", "PathfinderDataModule", "SequenceDataModule", "TextDataModule", "collate",
    "read_reviews", "ListOpsSpec", "LSTMConfig", "S4DConfig", "SequenceClassifier", "SequenceClassifierConfig",
    "PathfinderSpec", "LongRangePretrainTask", "LongRangeTask", "TokenMeter",
]
