"""Pieces of a transformer block: norms, dropout, feed-forward variants, stochastic depth and LayerScale (timm's
names). `make_norm` and `make_dropout` are the factories every block builds these from (TransformerConfig's `norm`
and `dropout_mask` choose), so that a domain picks another kind through the config instead of swapping modules."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormKind = Literal["layernorm", "rmsnorm", "batchnorm"]
DropoutMask = Literal["bernoulli", "rand"]
Activation = Literal["relu", "gelu", "silu", "swiglu"]


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last (feature) axis of (... d) tokens, statistics over every other axis (PatchTST's
    norm over batch and tokens)."""

    def forward(self, x: Tensor) -> Tensor:
        # (... d) → ((...) d): the same statistics as over (b d n), without the two transposed copies
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "batchnorm":
        return TokenBatchNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm', 'rmsnorm' or 'batchnorm', found {kind!r}")


class RandDropout(nn.Dropout):
    """nn.Dropout whose mask comes from torch.rand instead of bernoulli_: the same distribution, about 2× faster on
    CPU (where dropout is a third of a tiny, heavily regularised model's step, e.g. PatchTST). Other devices keep
    F.dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        scale = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * scale


def make_dropout(p: float, mask: DropoutMask = "bernoulli") -> nn.Module:
    """Dropout with probability p, its mask drawn by torch's own kernel (bernoulli) or from torch.rand (rand)."""
    if mask == "bernoulli":
        return nn.Dropout(p)
    if mask == "rand":
        return RandDropout(p)
    raise ValueError(f"dropout_mask must be 'bernoulli' or 'rand', found {mask!r}")


class FeedForward(nn.Module):
    """fc1 → activation → dropout → fc2 → dropout; SwiGLU (Shazeer 2020) fuses gate and value in fc1 (2·hidden).

    silu is Swish, the Conformer's feed-forward activation. hidden_dropout=False drops the output only (GPT-2).
    """

    def __init__(self, dim: int, hidden: int, activation: Activation = "gelu", *, bias: bool = True,
                 dropout: float = 0.0, hidden_dropout: bool = True, dropout_mask: DropoutMask = "bernoulli"):
        super().__init__()
        if activation not in ("relu", "gelu", "silu", "swiglu"):
            raise ValueError(f"activation must be 'relu', 'gelu', 'silu' or 'swiglu', found {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden, bias=bias)
        self.drop1 = make_dropout(dropout, dropout_mask) if hidden_dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = make_dropout(dropout, dropout_mask)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        if self.activation == "swiglu":
            value, gate = x.chunk(2, dim=-1)
            x = value * F.silu(gate)
        else:
            x = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[self.activation](x)
        return self.drop2(self.fc2(self.drop1(x)))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops the whole residual branch per sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (Touvron et al. 2021, CaiT), initialised small."""

    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def init_linear_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights and zero biases for Linear layers (ViT / GPT-2 initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
