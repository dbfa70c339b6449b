"""Speech front end: 80-dim log-mel features, global mean/variance normalisation, SpecAugment, ×4 subsampling.

Shapes: b batch, s samples, f mel bins, t feature frames (10 ms), n encoder frames (40 ms), d model width.
Lengths travel beside padded tensors as (b,) integer tensors; masks are derived from them by shape only (no `.item()`),
so the forward pass can be traced and exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio
from einops import rearrange
from torch import Tensor, nn


def padding_mask(lengths: Tensor, n: int) -> Tensor:
    """(b, n) bool, True at padding (torch.nn's convention), from (b,) lengths."""
    return torch.arange(n, device=lengths.device)[None, :] >= lengths[:, None]


@dataclass
class FeatureConfig:
    """Log-mel features: 25 ms windows every 10 ms."""

    sample_rate: int = 16_000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512


@dataclass
class SpecAugmentConfig:
    """SpecAugment (Park et al. 2019, https://arxiv.org/abs/1904.08779), LibriSpeech-double (LD) style.

    Time masks are scaled to each utterance: a mask is at most min(time_mask_width, time_mask_ratio · frames) wide.
    """

    freq_masks: int = 2
    freq_mask_width: int = 27  # F in the paper
    time_masks: int = 2
    time_mask_width: int = 100  # T in the paper
    time_mask_ratio: float = 0.05  # p: the cap relative to the utterance's own length

    def __post_init__(self) -> None:
        if min(self.freq_masks, self.time_masks, self.freq_mask_width, self.time_mask_width) < 0:
            raise ValueError(f"SpecAugment counts and widths must be >= 0, found {self}")
        if not 0.0 <= self.time_mask_ratio <= 1.0:
            raise ValueError(f"time_mask_ratio must be in [0, 1], found {self.time_mask_ratio}")


class LogMel(nn.Module):
    """(b s) waveforms and (b,) sample counts → (b t f) log-mel features and (b,) frame counts."""

    def __init__(self, config: FeatureConfig):
        super().__init__()
        self.hop = round(config.sample_rate * config.hop_ms / 1000)
        window = round(config.sample_rate * config.win_ms / 1000)
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=config.sample_rate, n_fft=config.n_fft,
                                                        win_length=window, hop_length=self.hop,
                                                        n_mels=config.n_mels, center=True)

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        features = self.mel(waveforms.float())  # (b f t), t = s // hop + 1 with center=True
        frames = torch.div(lengths, self.hop, rounding_mode="floor") + 1
        return rearrange((features + 1e-6).log(), "b f t -> b t f"), frames


class GlobalNormalizer(nn.Module):
    """(x - mean) / std per mel bin; mean and std are buffers estimated from training data and saved with the model."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("std", torch.ones(n_mels))
        self.register_buffer("frames_seen", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return bool(self.frames_seen > 0)

    @torch.no_grad()
    def fit(self, batches) -> None:
        """Estimates mean and std from an iterable of ((t f) features) tensors, in float64."""
        total, total_sq, count = 0.0, 0.0, 0
        for features in batches:
            features = features.double()
            total = total + features.sum(dim=0)
            total_sq = total_sq + (features ** 2).sum(dim=0)
            count += features.shape[0]
        if count == 0:
            raise ValueError("normalisation statistics need at least one frame of training audio, found none")
        mean = total / count
        self.mean.copy_(mean)
        self.std.copy_((total_sq / count - mean ** 2).clamp_min(1e-10).sqrt())
        self.frames_seen.fill_(count)

    def forward(self, features: Tensor) -> Tensor:
        return (features - self.mean) / self.std


class SpecAugment(nn.Module):
    """Frequency masks (torchaudio's FrequencyMasking, independent per utterance) and time masks scaled per utterance.

    torchaudio's TimeMasking caps a mask at p × the padded length of the batch; here each utterance draws its own
    masks with the same rule applied to its own length: width uniform in [0, min(T, p · frames)), start uniform in
    the remaining frames. Vectorised over the batch (no per-utterance loop).
    """

    def __init__(self, config: SpecAugmentConfig):
        super().__init__()
        self.config = config
        self.freq_mask = torchaudio.transforms.FrequencyMasking(config.freq_mask_width, iid_masks=True)

    def forward(self, features: Tensor, frames: Tensor) -> Tensor:
        """features: (b t f), zero-mean (masked values are set to 0, the mean); frames: (b,)."""
        x = rearrange(features, "b t f -> b f t")
        for _ in range(self.config.freq_masks):
            x = self.freq_mask(x)
        x = rearrange(x, "b f t -> b t f")
        if self.config.time_masks == 0:
            return x
        c = self.config
        b, t = x.shape[:2]
        max_width = torch.clamp(frames.float() * c.time_mask_ratio, max=float(c.time_mask_width))  # (b,)
        widths = (torch.rand(c.time_masks, b, device=x.device) * max_width).floor()  # (m b)
        starts = (torch.rand(c.time_masks, b, device=x.device) * (frames - widths).clamp_min(0)).floor()
        position = torch.arange(t, device=x.device)[None, None, :]  # (1 1 t)
        masked = ((position >= starts[..., None]) & (position < (starts + widths)[..., None])).any(dim=0)  # (b t)
        return x.masked_fill(masked[..., None], 0.0)


class ConvSubsampling(nn.Module):
    """Two 3×3 stride-2 convolutions with ReLU over (time, mel), then a linear map: (b t f) → (b t/4 d)."""

    def __init__(self, n_mels: int, dim: int, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(),
        )
        self.out = nn.Linear(channels * self.output_length(torch.tensor(n_mels)).item(), dim)

    @staticmethod
    def output_length(lengths: Tensor) -> Tensor:
        """Frames after two unpadded kernel-3 stride-2 convolutions: ⌊(⌊(t − 1)/2⌋ − 1)/2⌋."""
        once = torch.div(lengths - 1, 2, rounding_mode="floor")
        return torch.div(once - 1, 2, rounding_mode="floor").clamp_min(0)

    def forward(self, features: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv(features[:, None])  # (b c t/4 f/4)
        x = self.out(rearrange(x, "b c n f -> b n (c f)"))
        return x, self.output_length(frames)
