"""The CTC recognizer: waveform → log-mel → normalisation (→ SpecAugment) → ×4 subsampling → encoder → CTC head.

The encoder is a Conformer stack (`conformer.py`) or the core's plain `TransformerEncoder`, chosen in the config.
Shapes: b batch, s samples, t feature frames (10 ms), n encoder frames (40 ms), d width, v output classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from polyformer.domains.speech.conformer import Conformer, ConformerConfig
from polyformer.domains.speech.frontend import (
    ConvSubsampling,
    FeatureConfig,
    GlobalNormalizer,
    LogMel,
    SpecAugment,
    SpecAugmentConfig,
    padding_mask,
)
from polyformer.transformer import TransformerConfig, TransformerEncoder


@dataclass
class SpeechModelConfig:
    """Front end, encoder choice and sizes of a CTC recognizer."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    specaugment: SpecAugmentConfig | None = field(default_factory=SpecAugmentConfig)  # None: no augmentation
    subsampling_channels: int = 64  # channels of the ×4 convolutional subsampling (the front end's main cost on CPU)
    encoder: Literal["conformer", "transformer"] = "conformer"
    conformer: ConformerConfig = field(default_factory=ConformerConfig)
    # used when encoder='transformer'; its dim must equal conformer.dim's role: the model width
    transformer: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(dim=144, depth=6, heads=4, position="rope", dropout=0.1))
    head_dropout: float = 0.1

    @property
    def dim(self) -> int:
        return self.conformer.dim if self.encoder == "conformer" else self.transformer.dim

    def __post_init__(self) -> None:
        if self.encoder not in ("conformer", "transformer"):
            raise ValueError(f"encoder must be 'conformer' or 'transformer', found {self.encoder!r}")


class SpeechRecognizer(nn.Module):
    """(b s) waveforms and (b,) sample counts → (b n v) CTC log-probabilities and (b,) frame counts."""

    export_axes = {0: {0: "batch", 1: "samples"}, 1: {0: "batch"}}  # polyformer.deploy: dynamic axes

    def __init__(self, config: SpeechModelConfig, num_classes: int):
        super().__init__()
        self.config = config
        self.features = LogMel(config.features)
        self.normalizer = GlobalNormalizer(config.features.n_mels)
        self.specaugment = SpecAugment(config.specaugment) if config.specaugment is not None else None
        self.subsampling = ConvSubsampling(config.features.n_mels, config.dim, config.subsampling_channels)
        if config.encoder == "conformer":
            self.encoder = Conformer(config.conformer)
        else:
            self.encoder = TransformerEncoder(config.transformer)
        self.head_drop = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(config.dim, num_classes)

    @torch.no_grad()
    def log_mel(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Un-normalised (b t f) features and (b,) frame counts (also what the normaliser is fitted on)."""
        return self.features(waveforms, lengths)

    def forward_features(self, features: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised (b t f) features → (b n d) encoder output and (b,) encoder frame counts."""
        x, lengths = self.subsampling(features, frames)
        x = self.encoder(x, key_padding_mask=padding_mask(lengths, x.shape[1]))
        return x, lengths

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        features, frames = self.log_mel(waveforms, lengths)
        features = self.normalizer(features)
        # padded frames hold the normalised mean (0), whatever the padding samples were
        features = features.masked_fill(padding_mask(frames, features.shape[1])[..., None], 0.0)
        if self.training and self.specaugment is not None:
            features = self.specaugment(features, frames)
        x, out_lengths = self.forward_features(features, frames)
        return self.head(self.head_drop(x)).log_softmax(dim=-1), out_lengths
