"""Forecasters on the shared core: PatchTST, and two baselines trained the same way (DLinear, an encoder–decoder).

Every model maps a lookback window x (b L c) to a forecast (b H c) of the same c channels, on scaled values.

- PatchTST (Nie et al. 2023, https://arxiv.org/abs/2211.14730): RevIN, then each channel on its own (channel
  independence: c series share all weights) is cut into patches of `patch_len` every `stride` steps (the end padded by
  repeating the last value, one extra patch), embedded, encoded by the core's TransformerEncoder and flattened into a
  linear head. Departures from the reference code: no residual attention ("res_attention"), dropout on the patch
  embedding before the core adds positions (the reference drops after adding them), core initialisation, and
  dropout masks drawn with torch.rand on CPU (the core's `dropout_mask: rand`, same distribution, faster than
  bernoulli_). The reference's BatchNorm over tokens is the core's `norm: batchnorm`.
- DLinear (Zeng et al. 2023, https://arxiv.org/abs/2205.13504): moving-average trend + remainder, one linear map
  L → H each, shared by the channels (individual=False, as in its ETTh1 scripts).
- EncoderDecoderForecaster: a vanilla Transformer (Vaswani et al. 2017) in the Informer layout: one token per time
  step (all channels embedded together), the encoder reads the lookback, the core's TransformerDecoder reads the last
  `label_len` steps followed by H zero placeholders and emits the whole horizon at once.

Shapes: b batch, L lookback, H horizon, c channels, n patches, p patch length, d model width.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polyformer.layers import make_dropout
from polyformer.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder


def check_window(x: Tensor, lookback: int, name: str) -> None:
    if x.ndim != 3 or x.shape[1] != lookback:
        raise ValueError(f"{name}: expected a lookback window (batch, {lookback}, channels), found {tuple(x.shape)}")


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al. 2022), without the affine part (PatchTST's default affine=0):
    each series of a window is standardised by its own mean and std, the forecast mapped back with them."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def normalise(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (b L c) → (x − mean) / std, mean (b 1 c), std (b 1 c); std = sqrt(var + eps), var biased."""
        mean = x.mean(dim=1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        return (x - mean) / std, mean, std

    @staticmethod
    def denormalise(y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return y * std + mean


# ---- PatchTST -----------------------------------------------------------------------------------------------------
def _patchtst_encoder() -> TransformerConfig:
    # PatchTST/42 on ETTh1: d_model 16, 4 heads, 3 layers, d_ff 128, dropout 0.3, post-norm, learned positions
    return TransformerConfig(dim=16, depth=3, heads=4, mlp_ratio=8.0, prenorm=False, dropout=0.3,
                             position="learned", max_len=64, dropout_mask="rand")


@dataclass
class PatchTSTConfig:
    lookback: int = 336  # L, input steps
    horizon: int = 96  # H, forecast steps; 0: no forecasting head (the encoder alone, for pre-training)
    patch_len: int = 16  # p, steps per patch
    stride: int = 8  # steps between patch starts
    padding: Literal["end", "none"] = "end"  # end: repeat the last value `stride` times, one more patch
    revin: bool = True  # instance normalisation of each input series
    encoder: TransformerConfig = field(default_factory=_patchtst_encoder)  # max_len is set to the patch count
    encoder_norm: Literal["core", "batchnorm"] | None = None  # deprecated: set encoder.norm (batchnorm: reference's)
    embed_dropout: float = 0.3  # on the patch embedding, before the encoder
    head_dropout: float = 0.0  # before the flatten head's linear map

    def __post_init__(self) -> None:
        if self.horizon < 0:
            raise ValueError(f"horizon must be >= 0 (0: no forecasting head), found {self.horizon}")
        if self.patch_len < 1 or self.stride < 1:
            raise ValueError(f"patch_len and stride must be positive, found {self.patch_len} and {self.stride}")
        if self.lookback < self.patch_len:
            raise ValueError(f"lookback={self.lookback} must be at least patch_len={self.patch_len}")
        if self.padding not in ("end", "none"):
            raise ValueError(f"padding must be 'end' or 'none', found {self.padding!r}")
        if self.encoder_norm is not None:  # the key of releases up to 0.1.0, read for one more release
            if self.encoder_norm not in ("core", "batchnorm"):
                raise ValueError(f"encoder_norm must be 'core' or 'batchnorm', found {self.encoder_norm!r}")
            warnings.warn(f"PatchTSTConfig.encoder_norm is deprecated and will be removed: write encoder.norm: "
                          f"{'batchnorm' if self.encoder_norm == 'batchnorm' else self.encoder.norm} instead",
                          DeprecationWarning, stacklevel=3)
            if self.encoder_norm == "batchnorm":
                self.encoder = replace(self.encoder, norm="batchnorm")
            self.encoder_norm = None

    @property
    def num_patches(self) -> int:
        return (self.lookback - self.patch_len) // self.stride + 1 + (self.padding == "end")


class PatchEmbed(nn.Module):
    """(b c L) series → (b c n d) patch embeddings; unfold keeps the first n·stride + p − stride steps."""

    def __init__(self, patch_len: int, stride: int, padding: Literal["end", "none"], dim: int):
        super().__init__()
        self.patch_len, self.stride, self.padding = patch_len, stride, padding
        self.proj = nn.Linear(patch_len, dim)

    def patchify(self, x: Tensor) -> Tensor:
        """(b c L) → (b c n p)."""
        if self.padding == "end":
            x = F.pad(x, (0, self.stride), mode="replicate")
        return x.unfold(-1, self.patch_len, self.stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.patchify(x))


class PatchTST(nn.Module):
    """(b L c) → (b H c): RevIN, per-channel patches → core encoder → flatten head, channels sharing all weights."""

    export_axes = {0: {0: "batch", 2: "channels"}}  # polyformer.deploy: any number of channels

    def __init__(self, config: PatchTSTConfig):
        super().__init__()
        self.config = c = config
        encoder = replace(c.encoder, max_len=c.num_patches)
        self.revin = RevIN() if c.revin else None
        self.patch_embed = PatchEmbed(c.patch_len, c.stride, c.padding, encoder.dim)
        self.embed_drop = make_dropout(c.embed_dropout, encoder.dropout_mask)
        self.encoder = TransformerEncoder(encoder)
        self.head_drop = make_dropout(c.head_dropout, encoder.dropout_mask)
        self.head = nn.Linear(c.num_patches * encoder.dim, c.horizon) if c.horizon else None

    def patches(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (b L c) → patches of every channel's normalised series (b c n p), and RevIN's mean and std (b 1 c)."""
        check_window(x, self.config.lookback, "PatchTST input")
        mean = std = None
        if self.revin is not None:
            x, mean, std = self.revin.normalise(x)
        return self.patch_embed.patchify(rearrange(x, "b L c -> b c L")), mean, std

    def encode(self, tokens: Tensor) -> Tensor:
        """Patch embeddings of single series ((b c) n d) → encoder outputs ((b c) n d); positions added inside."""
        return self.encoder(self.embed_drop(tokens))

    def forward(self, x: Tensor) -> Tensor:
        if self.head is None:
            raise ValueError("this PatchTST has no forecasting head (horizon=0): it is an encoder for pre-training")
        patches, mean, std = self.patches(x)
        b = patches.shape[0]
        tokens = self.encode(rearrange(self.patch_embed.proj(patches), "b c n d -> (b c) n d"))
        y = self.head(self.head_drop(rearrange(tokens, "(b c) n d -> b c (n d)", b=b)))  # (b c H)
        y = rearrange(y, "b c H -> b H c")
        return RevIN.denormalise(y, mean, std) if self.revin is not None else y


# ---- DLinear ------------------------------------------------------------------------------------------------------
@dataclass
class DLinearConfig:
    lookback: int = 336
    horizon: int = 96
    kernel: int = 25  # moving-average window of the trend (odd, so the trend keeps the series' length)

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, found {self.kernel}")


class DLinear(nn.Module):
    """(b L c) → (b H c): trend = moving average (ends padded by repetition), seasonal = x − trend, one linear map each."""

    def __init__(self, config: DLinearConfig):
        super().__init__()
        self.config = config
        self.seasonal = nn.Linear(config.lookback, config.horizon)
        self.trend = nn.Linear(config.lookback, config.horizon)
        for linear in (self.seasonal, self.trend):  # start from "repeat the window mean" (the reference's init)
            nn.init.constant_(linear.weight, 1.0 / config.lookback)

    def decompose(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (b c L) → seasonal, trend, both (b c L)."""
        half = (self.config.kernel - 1) // 2
        trend = F.avg_pool1d(F.pad(x, (half, half), mode="replicate"), self.config.kernel, stride=1)
        return x - trend, trend

    def forward(self, x: Tensor) -> Tensor:
        check_window(x, self.config.lookback, "DLinear input")
        seasonal, trend = self.decompose(rearrange(x, "b L c -> b c L"))
        return rearrange(self.seasonal(seasonal) + self.trend(trend), "b c H -> b H c")


# ---- encoder–decoder Transformer ----------------------------------------------------------------------------------
def _seq2seq_encoder() -> TransformerConfig:
    return TransformerConfig(dim=64, depth=2, heads=4, mlp_ratio=4.0, dropout=0.1, position="sinusoidal")


def _seq2seq_decoder() -> TransformerConfig:
    return TransformerConfig(dim=64, depth=1, heads=4, mlp_ratio=4.0, dropout=0.1, position="sinusoidal", causal=True)


@dataclass
class EncoderDecoderConfig:
    lookback: int = 336
    horizon: int = 96
    channels: int = 7  # c: every time step is one token of all channels
    label_len: int = 48  # known steps that start the decoder input (Informer's "start token")
    revin: bool = True
    encoder: TransformerConfig = field(default_factory=_seq2seq_encoder)
    decoder: TransformerConfig = field(default_factory=_seq2seq_decoder)

    def __post_init__(self) -> None:
        if self.encoder.dim != self.decoder.dim:
            raise ValueError(f"encoder.dim={self.encoder.dim} and decoder.dim={self.decoder.dim} must match")
        if not 0 <= self.label_len <= self.lookback:
            raise ValueError(f"label_len must be in [0, lookback={self.lookback}], found {self.label_len}")
        if self.channels < 1:
            raise ValueError(f"channels must be positive, found {self.channels}")


class EncoderDecoderForecaster(nn.Module):
    """(b L c) → (b H c): encoder over the lookback steps, decoder over [last label_len steps, H zeros]."""

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        self.config = c = config
        self.revin = RevIN() if c.revin else None
        self.enc_embed = nn.Linear(c.channels, c.encoder.dim)
        self.dec_embed = nn.Linear(c.channels, c.decoder.dim)
        self.encoder = TransformerEncoder(c.encoder)
        self.decoder = TransformerDecoder(c.decoder)
        self.head = nn.Linear(c.decoder.dim, c.channels)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        check_window(x, c.lookback, "EncoderDecoderForecaster input")
        if x.shape[2] != c.channels:
            raise ValueError(f"EncoderDecoderForecaster input: expected {c.channels} channels (config.channels), "
                             f"found {x.shape[2]}")
        if self.revin is not None:
            x, mean, std = self.revin.normalise(x)
        memory = self.encoder(self.enc_embed(x))  # (b L d)
        start = x[:, x.shape[1] - c.label_len :]
        queries = torch.cat((start, x.new_zeros(x.shape[0], c.horizon, x.shape[2])), dim=1)  # (b label+H c)
        y = self.head(self.decoder(self.dec_embed(queries), memory))[:, c.label_len :]  # (b H c)
        return RevIN.denormalise(y, mean, std) if self.revin is not None else y
