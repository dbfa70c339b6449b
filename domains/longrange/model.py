"""Sequence classifiers for Long Range Arena: token embedding → a sequence mixer → pooling → a linear head.

Three mixers, one interface ((b n d) and padding (b n) → (b n d)), so that the transformer and its peers differ only
in how tokens exchange information:
- `transformer`: the core's `TransformerEncoder` — full (SDPA), local (sliding window) or linear attention, any of the
  core's positions;
- `lstm`: `torch.nn.LSTM` (Hochreiter & Schmidhuber 1997), bidirectional by default, over packed sequences so that
  padding never enters the recurrence;
- `s4d`: a diagonal state-space model, S4D (Gu, Gupta, Goel & Ré 2022, "On the Parameterization and Initialization
  of Diagonal State Space Models", https://arxiv.org/abs/2206.11893), below.

S4D, per channel h of the width d: a state of N/2 complex modes with A_n = −exp(a_n) + iπn (S4D-Lin: a_n = log ½),
B = 1 and C_n learned (complex), a learned step Δ = exp(log Δ), log Δ ~ U[log 0.001, log 0.1). Discretised by zero-order
hold, the layer is the convolution of its input with the kernel K_l = 2·Re Σ_n C_n (exp(ΔA_n) − 1)/A_n · exp(ΔA_n·l),
l < n, computed at once (a Vandermonde product) and applied by FFT; plus a skip D·u. Bidirectional (as S4 on LRA):
a second kernel runs over the reversed sequence and the two are added. A block: y = u + Dropout(GLU(W·GELU(SSM(norm u)))).

Departures from the papers' code: one learning rate for all parameters (S4 gives A and Δ a smaller one, without weight
decay; here they get no weight decay only); padding is zeroed before every S4D layer, so that the reversed kernel
sees nothing of it.

Shapes: b batch, n tokens, d width, h channels (= d), s state modes (N/2), c classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polyformer.transformer import TransformerConfig, TransformerEncoder

Mixer = Literal["transformer", "lstm", "s4d"]


@dataclass
class LSTMConfig:
    dim: int = 128  # hidden units per direction
    layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.0  # between layers

    def __post_init__(self) -> None:
        if self.dim < 1 or self.layers < 1:
            raise ValueError(f"lstm.dim and lstm.layers must be at least 1, found {self.dim} and {self.layers}")


@dataclass
class S4DConfig:
    dim: int = 128  # channels h
    depth: int = 4
    state: int = 64  # N: N/2 complex modes per channel
    bidirectional: bool = True
    dropout: float = 0.0
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self) -> None:
        if self.dim < 1 or self.depth < 1 or self.state < 2 or self.state % 2:
            raise ValueError(f"s4d: expected dim, depth >= 1 and an even state >= 2, found dim={self.dim}, "
                             f"depth={self.depth}, state={self.state}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"s4d: expected 0 < dt_min <= dt_max, found {self.dt_min}, {self.dt_max}")


@dataclass
class SequenceClassifierConfig:
    """The classifier; `mixer` picks which of `transformer`, `lstm`, `s4d` is built (the others are unused)."""

    vocab_size: int = 258  # bytes + padding + mask token; the data module's vocab_size
    num_classes: int = 2
    mixer: Mixer = "transformer"
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        dim=64, depth=2, heads=4, mlp_ratio=2.0, position="sinusoidal", max_len=4096))
    lstm: LSTMConfig = field(default_factory=LSTMConfig)
    s4d: S4DConfig = field(default_factory=S4DConfig)
    pooling: Literal["mean", "cls"] = "mean"  # cls: a learned class token first (transformer only)
    embed_dropout: float = 0.0
    head_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.mixer not in ("transformer", "lstm", "s4d"):
            raise ValueError(f"model.mixer must be 'transformer', 'lstm' or 's4d', found {self.mixer!r}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"model.pooling must be 'mean' or 'cls', found {self.pooling!r}")
        if self.pooling == "cls" and self.mixer != "transformer":
            raise ValueError(f"pooling 'cls' reads a class token that attention fills; with mixer={self.mixer!r} use "
                             f"pooling 'mean'")
        if self.vocab_size < 3 or self.num_classes < 2:
            raise ValueError(f"model.vocab_size must be >= 3 (padding, mask, a symbol) and num_classes >= 2, found "
                             f"{self.vocab_size} and {self.num_classes}")

    @property
    def width(self) -> int:
        """d: the embedding width and the mixer's output width."""
        if self.mixer == "transformer":
            return self.transformer.dim
        if self.mixer == "lstm":
            return self.lstm.dim * (2 if self.lstm.bidirectional else 1)
        return self.s4d.dim


class S4DKernel(nn.Module):
    """The convolution kernels (k h n) of h diagonal state-space channels, k = 1 or 2 directions."""

    def __init__(self, channels: int, state: int, directions: int, dt_min: float, dt_max: float):
        super().__init__()
        modes = state // 2
        log_dt = torch.rand(directions, channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)  # (k h)
        self.log_a_real = nn.Parameter(torch.full((directions, channels, modes), math.log(0.5)))  # (k h s)
        self.a_imag = nn.Parameter(math.pi * torch.arange(modes).float().expand(directions, channels, modes).clone())
        # C ~ CN(0, 1), as S4D's reference initialisation; stored as (real, imaginary)
        self.c = nn.Parameter(torch.randn(directions, channels, modes, 2) * 0.5 ** 0.5)

    def no_weight_decay(self) -> set[str]:
        return {"log_dt", "log_a_real", "a_imag"}

    def forward(self, length: int) -> Tensor:
        dt = self.log_dt.exp()[..., None]  # (k h 1)
        a = torch.complex(-self.log_a_real.exp(), self.a_imag)  # (k h s)
        dt_a = a * dt
        c = torch.view_as_complex(self.c) * (dt_a.exp() - 1) / a  # ZOH with B = 1 folded into C
        powers = dt_a[..., None] * torch.arange(length, device=a.device)  # (k h s n)
        return 2 * torch.einsum("khs,khsn->khn", c, powers.exp()).real


class S4DBlock(nn.Module):
    """u + Dropout(GLU(Linear(GELU(S4D(LayerNorm(u)))))) over (b n h)."""

    def __init__(self, config: S4DConfig):
        super().__init__()
        self.directions = 2 if config.bidirectional else 1
        self.norm = nn.LayerNorm(config.dim)
        self.kernel = S4DKernel(config.dim, config.state, self.directions, config.dt_min, config.dt_max)
        self.skip = nn.Parameter(torch.randn(config.dim))  # D
        self.out = nn.Linear(config.dim, 2 * config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def convolve(self, u: Tensor) -> Tensor:
        """(b h n) → (b h n): the causal convolution with each direction's kernel, by FFT of length 2n."""
        n = u.shape[-1]
        k = self.kernel(n)  # (k h n)
        spectrum = torch.fft.rfft(k, n=2 * n)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * n) * spectrum[0], n=2 * n)[..., :n]
        if self.directions == 2:
            reverse = torch.fft.irfft(torch.fft.rfft(u.flip(-1), n=2 * n) * spectrum[1], n=2 * n)[..., :n]
            y = y + reverse.flip(-1)
        return y + u * self.skip[:, None]

    def forward(self, x: Tensor, padding: Tensor | None) -> Tensor:
        u = self.norm(x)
        if padding is not None:
            u = u.masked_fill(padding[:, :, None], 0.0)
        y = rearrange(self.convolve(rearrange(u.float(), "b n h -> b h n")), "b h n -> b n h").to(x.dtype)
        return x + self.dropout(F.glu(self.out(F.gelu(y)), dim=-1))


class S4D(nn.Module):
    def __init__(self, config: S4DConfig):
        super().__init__()
        self.blocks = nn.ModuleList(S4DBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, x: Tensor, padding: Tensor | None) -> Tensor:
        for block in self.blocks:
            x = block(x, padding)
        return self.norm(x)


class LSTM(nn.Module):
    def __init__(self, config: LSTMConfig, input_dim: int):
        super().__init__()
        self.rnn = nn.LSTM(input_dim, config.dim, num_layers=config.layers, bidirectional=config.bidirectional,
                           dropout=config.dropout if config.layers > 1 else 0.0, batch_first=True)

    def forward(self, x: Tensor, padding: Tensor | None) -> Tensor:
        if padding is None:
            return self.rnn(x)[0]
        lengths = (~padding).sum(dim=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class SequenceClassifier(nn.Module):
    """tokens (b n), padding (b n) → logits (b c); `encode` gives the mixer's outputs (b n d) (self-pretraining)."""

    def __init__(self, config: SequenceClassifierConfig):
        super().__init__()
        self.config = config
        d = config.width
        self.embed = nn.Embedding(config.vocab_size, d)
        self.embed_dropout = nn.Dropout(config.embed_dropout)
        if config.mixer == "transformer":
            self.mixer = TransformerEncoder(config.transformer)
        elif config.mixer == "lstm":
            self.mixer = LSTM(config.lstm, d)
        else:
            self.mixer = S4D(config.s4d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.pooling == "cls" else None
        self.head_dropout = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(d, config.num_classes)
        nn.init.normal_(self.embed.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"} if self.cls_token is not None else set()

    def encode(self, x: Tensor, padding: Tensor | None) -> Tensor:
        """Embedded tokens (b n d) → mixer outputs (b n d); padding (b n) True at padding."""
        x = self.embed_dropout(x)
        if self.config.mixer == "transformer":
            return self.mixer(x, key_padding_mask=padding)
        return self.mixer(x, padding)

    def forward(self, tokens: Tensor, padding: Tensor | None = None) -> Tensor:
        x = self.embed(tokens)  # (b n d)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if padding is not None:
                padding = F.pad(padding, (1, 0), value=False)
            pooled = self.encode(x, padding)[:, 0]
        else:
            h = self.encode(x, padding)  # (b n d)
            if padding is None:
                pooled = h.mean(dim=1)
            else:
                real = (~padding)[:, :, None].to(h.dtype)
                pooled = (h * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        return self.head(self.head_dropout(pooled))
