"""Positional schemes.

Additive (added to token embeddings before the encoder):
- sinusoidal: fixed sines and cosines (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762)
- learned: one trained vector per position, resampled to other lengths (1-D) or grids (2-D), as timm does for ViT

Inside attention (applied to queries and keys, or to the scores):
- RoPE: rotary embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864)
- ALiBi: linear distance penalty per head (Press et al. 2022, https://arxiv.org/abs/2108.12409)

Shapes: b batch, n tokens, d model width, h heads, e head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_table(length: int, dim: int, base: float = 10000.0) -> Tensor:
    """(length, dim) table: even channels sin(p / base^(2i/d)), odd channels cos of the same angle."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, found dim={dim}")
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds the fixed sinusoidal table to x (b n d); any length, computed on the fly past the cached one."""

    def __init__(self, dim: int, max_len: int = 4096, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("table", sinusoidal_table(max_len, dim, base), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        n = x.shape[1]
        if offset + n > self.table.shape[0]:
            self.table = sinusoidal_table(offset + n, self.dim, self.base).to(self.table.device)
        return x + self.table[offset : offset + n].to(x.dtype)


def resample_1d(table: Tensor, length: int) -> Tensor:
    """Linearly interpolates a (n, d) table of learned positions to (length, d)."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.T[None], size=length, mode="linear", align_corners=False)
    return resized[0].T


def resample_2d(table: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubically resamples a (gh*gw, d) table of patch positions to another grid (timm's resample_abs_pos_embed)."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    gh, gw = old_grid
    if table.shape[0] != gh * gw:
        raise ValueError(f"position table has {table.shape[0]} rows, expected {gh}*{gw}={gh * gw} for grid {old_grid}")
    grid = table.reshape(1, gh, gw, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(table.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per position; `forward` adds it to x (b n d), interpolating when n differs."""

    def __init__(self, dim: int, max_len: int, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_len, dim) * init_std)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        n = x.shape[1]
        if offset + n <= self.weight.shape[0]:
            return x + self.weight[offset : offset + n].to(x.dtype)
        if offset:
            raise ValueError(f"positions {offset}..{offset + n} exceed the {self.weight.shape[0]} learned ones")
        return x + resample_1d(self.weight, n).to(x.dtype)

    def no_weight_decay(self) -> set[str]:
        return {"weight"}


class RotaryEmbedding(nn.Module):
    """Rotates pairs of channels (i, i + e/2) of q and k by angle p * base^(-2i/e), so q·k depends on offsets only."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head width, found head_dim={head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin, each (n, e), for integer positions (n,)."""
        freqs = positions.float()[:, None] * self.inv_freq[None]
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (b h n e), positions: (n,) → x rotated."""
        cos, sin = self.angles(positions)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def alibi_slopes(heads: int) -> Tensor:
    """Per-head slopes 2^(-8i/h), with the paper's interleaving when h is not a power of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return torch.tensor(power_of_two(heads))
    closest = 2 ** math.floor(math.log2(heads))
    extra = power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


def alibi_bias(slopes: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """(h, q, k) additive bias -slope * |i - j| (for causal attention only j <= i survives the mask anyway)."""
    distance = (query_positions[:, None] - key_positions[None, :]).abs().float()
    return -slopes.float()[:, None, None] * distance[None]
