"""Swin Transformer (Liu et al. 2021, https://arxiv.org/abs/2103.14030) on the Polyformer core.

A hierarchy of four stages over a (H/4 × W/4) grid of patch tokens. Inside a stage, every block attends within
non-overlapping windows of w × w tokens (window-local cost), with a learned relative position bias per head; every
second block first shifts the grid by w/2 (a cyclic roll) so that windows straddle the previous ones' borders, and a
mask keeps tokens that the roll brought together from different image regions from attending to each other. Between
stages, patch merging concatenates each 2 × 2 neighbourhood (4c channels) and projects it to 2c: the grid halves and
the width doubles, which gives the multi-scale feature maps a detector reads.

The attention, feed-forward and stochastic depth are the core's (`MultiHeadAttention` with an additive `attn_bias`,
`FeedForward`, `DropPath`); module names follow timm's `swin_transformer.py`, so `from_timm` copies a timm model with
two renames (see SWIN_TIMM_RENAMES).

Shapes: b batch, (H W) a stage's token grid, c width, (gh gw) windows per side, (wh ww) window, n = wh·ww tokens per
window, h heads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polyformer.attention import MultiHeadAttention
from polyformer.layers import DropPath, FeedForward, init_linear_weights
from polyformer.domains.vision.model import pair

SWIN_TIMM_RENAMES = {"attn.relative_position_bias_table": "relative_position.table", "head.fc.": "head."}


@dataclass
class SwinConfig:
    """A Swin classifier or backbone; names follow timm's SwinTransformer arguments (swin_tiny_patch4_window7_224 is
    the default)."""

    img_size: int | tuple[int, int] = 224  # fixes each stage's window and shift (as in timm); any size runs, padded
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns pooled features
    dim: int = 96  # timm's embed_dim: stage 1's width, doubled by every patch merging
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window: int = 7  # window side in tokens
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    drop_rate: float = 0.0  # dropout before the head
    proj_drop_rate: float = 0.0  # after attention projection and in the feed-forward
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly over all blocks

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.heads) or not self.depths:
            raise ValueError(f"depths and heads must name the same stages, found depths={self.depths}, "
                             f"heads={self.heads}")
        if min(self.depths) < 1 or min(self.heads) < 1 or self.window < 1 or self.patch_size < 1 or self.dim < 1:
            raise ValueError(f"depths, heads, window, patch_size and dim must be positive, found depths="
                             f"{self.depths}, heads={self.heads}, window={self.window}, patch_size={self.patch_size},"
                             f" dim={self.dim}")
        for stage, heads in enumerate(self.heads):
            if self.stage_dim(stage) % heads:
                raise ValueError(f"stage {stage}: width {self.stage_dim(stage)} is not divisible by heads={heads}")
        for name in ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), found {getattr(self, name)}")

    def stage_dim(self, stage: int) -> int:
        return self.dim * 2 ** stage

    def stage_grid(self, stage: int) -> tuple[int, int]:
        """Tokens per side at a stage for img_size: patches, then halved rounding up (merging pads odd sides)."""
        scale = 2 ** stage
        return tuple(-(-(side // self.patch_size) // scale) for side in pair(self.img_size))


def window_shape(grid: tuple[int, int], window: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window and shift per axis for a stage of this grid: a grid side no larger than the window is one window,
    unshifted (timm's rule)."""
    size = tuple(side if side <= window else window for side in grid)
    shift = tuple(0 if side <= window else window // 2 for side in grid)
    return size, shift


class RelativePositionBias(nn.Module):
    """A learned bias per head for each (Δrow, Δcol) between two tokens of a window: table ((2wh−1)(2ww−1), h)."""

    def __init__(self, window: tuple[int, int], heads: int):
        super().__init__()
        wh, ww = window
        self.table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()  # (n)
        delta_row = rows[:, None] - rows[None, :] + wh - 1  # (n n), from 0
        delta_col = cols[:, None] - cols[None, :] + ww - 1
        self.register_buffer("index", delta_row * (2 * ww - 1) + delta_col, persistent=False)

    def forward(self) -> Tensor:
        return rearrange(self.table[self.index], "n m h -> h n m")


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                        device: torch.device) -> Tensor:
    """(gh·gw, n, n) True where two tokens of a window came from the same image region before the cyclic roll."""
    region = torch.zeros(grid, dtype=torch.long, device=device)
    bands = [(slice(0, -w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
    for label, (rows, cols) in enumerate(itertools.product(*bands)):
        region[rows, cols] = label
    region = rearrange(region, "(gh wh) (gw ww) -> (gh gw) (wh ww)", wh=window[0], ww=window[1])
    return region[:, :, None] == region[:, None, :]


class SwinBlock(nn.Module):
    """Pre-norm block whose attention runs inside (shifted) windows; x (b H W c) → (b H W c)."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int], shift: tuple[int, int], config: SwinConfig,
                 drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = MultiHeadAttention(dim, heads, attn_dropout=config.attn_drop_rate, dropout=config.proj_drop_rate)
        self.relative_position = RelativePositionBias(window, heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = FeedForward(dim, int(dim * config.mlp_ratio), "gelu", dropout=config.proj_drop_rate)
        self.drop_path = DropPath(drop_path)

    def window_attention(self, x: Tensor) -> Tensor:
        """Roll by −shift, pad the grid to whole windows (zeros that take part, as in timm), attend per window,
        undo all three."""
        b, height, width, _ = x.shape
        (wh, ww), shifted = self.window, any(self.shift)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, -width % ww, 0, -height % wh))
        grid = x.shape[1:3]
        windows = rearrange(x, "b (gh wh) (gw ww) c -> (b gh gw) (wh ww) c", wh=wh, ww=ww)
        bias = self.relative_position()[None]  # (1 h n n)
        if shifted:
            same_region = shifted_window_mask(grid, self.window, self.shift, x.device)[:, None]  # (gh·gw 1 n n)
            bias = torch.where(same_region, bias, float("-inf")).repeat(b, 1, 1, 1)  # (b·gh·gw h n n)
        out = self.attn(windows, attn_bias=bias)
        out = rearrange(out, "(b gh gw) (wh ww) c -> b (gh wh) (gw ww) c", b=b, gh=grid[0] // wh, wh=wh, ww=ww)
        out = out[:, :height, :width]
        return torch.roll(out, shifts=self.shift, dims=(1, 2)) if shifted else out

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.window_attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Each 2 × 2 neighbourhood's four tokens, concatenated (4c) then normed and projected to 2c: (b H W c) →
    (b H/2 W/2 2c); an odd side is padded by one."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        return self.reduction(self.norm(rearrange(x, "b (h i) (w j) c -> b h w (j i c)", i=2, j=2)))


class SwinStage(nn.Module):
    """Patch merging (every stage after the first), then blocks alternating plain and shifted windows."""

    def __init__(self, config: SwinConfig, stage: int, drop_paths: list[float]):
        super().__init__()
        dim = config.stage_dim(stage)
        self.downsample = PatchMerging(dim // 2, config.norm_eps) if stage > 0 else nn.Identity()
        window, shift = window_shape(config.stage_grid(stage), config.window)
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, config.heads[stage], window, shift if i % 2 else (0, 0), config, drop_paths[i])
            for i in range(config.depths[stage])
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class PatchEmbed(nn.Module):
    """p × p patches → width c, normed: (b C H W) → (b H/p W/p c)."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.dim, config.patch_size, stride=config.patch_size)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, images: Tensor) -> Tensor:
        return self.norm(rearrange(self.proj(images), "b c h w -> b h w c"))


class SwinTransformer(nn.Module):
    """Swin classifier; `stages()` gives the multi-scale feature maps a detector reads."""

    def __init__(self, config: SwinConfig | None = None):
        super().__init__()
        self.config = c = config or SwinConfig()
        self.patch_embed = PatchEmbed(c)
        rates = torch.linspace(0, c.drop_path_rate, sum(c.depths)).tolist()
        starts = [sum(c.depths[:i]) for i in range(len(c.depths))]
        self.layers = nn.ModuleList([SwinStage(c, i, rates[start:start + c.depths[i]])
                                     for i, start in enumerate(starts)])
        self.num_features = c.stage_dim(len(c.depths) - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=c.norm_eps)
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.apply(init_linear_weights)

    def stages(self, images: Tensor) -> list[Tensor]:
        """(b C H W) → each stage's output (b H/(4·2^i) W/(4·2^i) c·2^i), the last one not yet normed."""
        x, outputs = self.patch_embed(images), []
        for stage in self.layers:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, images: Tensor) -> Tensor:
        """(b C H W) → logits (b k), or pooled features (b c) without a head."""
        pooled = self.norm(self.stages(images)[-1]).mean(dim=(1, 2))
        return self.head(self.head_drop(pooled))

    @classmethod
    def from_timm(cls, model: nn.Module) -> SwinTransformer:
        """A copy of a timm SwinTransformer (its config read from the model, its weights copied)."""
        stages = list(model.layers)
        first_block = stages[0].blocks[0]
        config = SwinConfig(
            img_size=tuple(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
            in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes, dim=model.embed_dim,
            depths=[len(stage.blocks) for stage in stages], heads=[stage.blocks[0].attn.num_heads for stage in stages],
            window=first_block.window_size[0], mlp_ratio=first_block.mlp.fc1.out_features / model.embed_dim,
            norm_eps=first_block.norm1.eps, drop_path_rate=0.0,
        )
        ours = cls(config)
        state = {}
        for key, value in model.state_dict().items():
            for theirs, mine in SWIN_TIMM_RENAMES.items():
                key = key.replace(theirs, mine)
            state[key] = value
        missing, unexpected = ours.load_state_dict(state, strict=False)
        buffers = {name for name, _ in ours.named_buffers()}
        missing = [key for key in missing if key not in buffers]
        unexpected = [key for key in unexpected if not key.endswith(("relative_position_index", "attn_mask"))]
        if missing or unexpected:
            raise ValueError(f"timm Swin state dict does not match: missing {missing}, unexpected {unexpected}")
        return ours
