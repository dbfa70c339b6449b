"""Pieces of a transformer block: norms, feed-forward variants, stochastic depth and LayerScale (timm's names)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormKind = Literal["layernorm", "rmsnorm"]
Activation = Literal["relu", "gelu", "silu", "swiglu"]


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', found {kind!r}")


class FeedForward(nn.Module):
    """fc1 → activation → dropout → fc2 → dropout; SwiGLU (Shazeer 2020) fuses gate and value in fc1 (2·hidden).

    silu is Swish, the Conformer's feed-forward activation.
    """

    def __init__(self, dim: int, hidden: int, activation: Activation = "gelu", *, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if activation not in ("relu", "gelu", "silu", "swiglu"):
            raise ValueError(f"activation must be 'relu', 'gelu', 'silu' or 'swiglu', found {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden, bias=bias)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(dropout)

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
