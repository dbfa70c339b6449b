"""Vision Transformer (Dosovitskiy et al. 2021, https://arxiv.org/abs/2010.11929) and DeiT's distillation token
(Touvron et al. 2021, https://arxiv.org/abs/2012.12877) on the Polyformer core.

Only the image-specific parts live here: patch embedding, prefix tokens (class, registers, distillation), the learned
2-D position table and the pooled classifier head. The blocks and the final norm are the core's `TransformerEncoder`
ones, kept under timm's flat names (`blocks.i.*`, `norm`) so that a timm state dict loads without a key map.

Shapes: b batch, c channels, H W image size, p patch side, (gh gw) patch grid, n = gh*gw patches,
t = prefix tokens + n, d model width, k classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from polyformer.layers import make_norm
from polyformer.positions import resample_2d
from polyformer.transformer import TransformerConfig, TransformerEncoder

log = logging.getLogger(__name__)


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass
class ViTConfig:
    """A ViT / DeiT classifier; the names follow timm's VisionTransformer arguments where they exist."""

    img_size: int | tuple[int, int] = 224  # training resolution; other sizes resample the position table
    patch_size: int = 16  # side of a square patch in pixels
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns pooled features
    dim: int = 192  # timm's embed_dim
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    layer_scale: float | None = None  # timm's init_values
    class_token: bool = True
    reg_tokens: int = 0  # register tokens (Darcet et al. 2024, https://arxiv.org/abs/2309.16588)
    distilled: bool = False  # DeiT distillation token and head_dist
    no_embed_class: bool = False  # positions for patches only, prefix tokens concatenated after (DeiT-3, registers)
    global_pool: Literal["token", "avg"] = "token"
    fc_norm: bool | None = None  # final norm after pooling instead of before; None: on for avg pooling (timm)
    norm_eps: float = 1e-6  # timm's LayerNorm eps
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0  # dropout after adding positions
    proj_drop_rate: float = 0.0  # dropout after attention projection and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly over the blocks

    def __post_init__(self) -> None:
        height, width = pair(self.img_size)
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"img_size {height}x{width} must be divisible by patch_size={self.patch_size}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', found {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' reads the class token, found class_token=False")
        if self.distilled and (not self.class_token or self.reg_tokens or self.global_pool != "token"):
            raise ValueError(f"a distilled model reads the class and distillation tokens: it needs class_token=True, "
                             f"reg_tokens=0 and global_pool='token', found class_token={self.class_token}, "
                             f"reg_tokens={self.reg_tokens}, global_pool={self.global_pool!r}")

    @property
    def grid(self) -> tuple[int, int]:
        height, width = pair(self.img_size)
        return height // self.patch_size, width // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens + int(self.distilled)

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def encoder(self) -> TransformerConfig:
        """The core stack of a timm ViT block: pre-norm LayerNorm, exact GELU, biases everywhere."""
        return TransformerConfig(
            dim=self.dim, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio, activation="gelu",
            norm="layernorm", norm_eps=self.norm_eps, prenorm=True, final_norm=not self.use_fc_norm,
            position="none", qk_norm=self.qk_norm, bias=True, dropout=self.proj_drop_rate,
            attn_dropout=self.attn_drop_rate, drop_path=self.drop_path_rate, layer_scale=self.layer_scale,
        )


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches projected by one strided convolution: (b c H W) → (b n d) and the grid."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if images.ndim != 4:
            raise ValueError(f"images must be (batch, channels, height, width), found shape {tuple(images.shape)}")
        _, channels, height, width = images.shape
        if channels != self.in_chans:
            raise ValueError(f"images have {channels} channels, the model expects in_chans={self.in_chans} "
                             f"(input shape {tuple(images.shape)})")
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}; expected "
                             f"multiples of {p} (e.g. {height // p * p}x{width // p * p})")
        x = self.proj(images)  # (b d gh gw)
        return rearrange(x, "b d gh gw -> b (gh gw) d"), (height // p, width // p)


class VisionTransformer(nn.Module):
    """Images (b c H W) → logits (b k); timm's module names and API (forward_features, forward_head, ...)."""

    def __init__(self, config: ViTConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else ViTConfig()
        self.grid = c.grid
        self.num_prefix_tokens = c.num_prefix_tokens
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, c.dim)) if c.reg_tokens else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.distilled else None
        positions = c.grid[0] * c.grid[1] + self.prefix_positions
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, c.dim))
        self.pos_drop = nn.Dropout(c.pos_drop_rate)
        # the core encoder builds the blocks (drop-path schedule, init); its modules are kept under timm's names
        encoder = TransformerEncoder(c.encoder())
        self.blocks, self.norm = encoder.blocks, encoder.norm
        self.fc_norm = make_norm("layernorm", c.dim, c.norm_eps) if c.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = self.new_head(c.num_classes)
        self.head_dist = self.new_head(c.num_classes) if c.distilled else None
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT initialisation: truncated-normal positions and heads, near-zero class and register tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)

    def new_head(self, num_classes: int) -> nn.Module:
        """A classifier (d → k), truncated-normal weights and zero bias; Identity for num_classes=0."""
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.config.dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    # ---- positions --------------------------------------------------------------------------------------------
    def position_table(self, grid: tuple[int, int]) -> Tensor:
        """(1, positions, d) for a patch grid; bicubically resampled when it differs from the training grid,
        prefix rows untouched (timm's dynamic_img_size / resample_abs_pos_embed)."""
        if tuple(grid) == tuple(self.grid):
            return self.pos_embed
        return self.resample_table(self.pos_embed, self.grid, grid)

    @property
    def prefix_positions(self) -> int:
        """Rows of the position table that belong to prefix tokens (none with no_embed_class)."""
        return 0 if self.config.no_embed_class else self.num_prefix_tokens

    def resample_table(self, table: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
        """(1, prefix + old patches, d) → (1, prefix + new patches, d): patch rows resampled, prefix rows kept."""
        prefix = self.prefix_positions
        patches = resample_2d(table[0, prefix:], old_grid, new_grid)
        return torch.cat((table[:, :prefix], patches[None]), dim=1)

    def set_image_size(self, img_size: int | tuple[int, int]) -> None:
        """Resamples the position table to a new training resolution for good (fine-tuning at another size)."""
        self.config.img_size = img_size
        self.config.__post_init__()
        new_grid = self.config.grid
        with torch.no_grad():
            table = self.position_table(new_grid).clone()
        self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        self.grid = new_grid

    def prefix_tokens(self, batch: int) -> list[Tensor]:
        # class, distillation, registers (a distilled model has no registers, so timm's orders agree)
        tokens = (self.cls_token, self.dist_token, self.reg_token)
        return [token.expand(batch, -1, -1) for token in tokens if token is not None]

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward_features(self, images: Tensor, *, query_index: slice | None = None) -> Tensor:
        """(b c H W) → (b t d): prefix tokens then patch tokens, after the blocks and the final norm.

        query_index: only these tokens come out (b t' d); the last block computes its queries there alone
        (`readout_tokens` is what the classifier reads with token pooling).
        """
        x, grid = self.patch_embed(images)  # (b n d)
        positions = self.position_table(grid)
        return self.forward_tokens(x + positions[:, self.prefix_positions:], query_index=query_index)

    def forward_tokens(self, x: Tensor, *, query_index: slice | None = None) -> Tensor:
        """Patch tokens with their positions added (b n d), any n (MAE passes the visible ones) → (b t d): the
        prefix tokens (with their own positions) in front, then the blocks and the final norm."""
        prefix = self.prefix_tokens(x.shape[0])
        if prefix and self.prefix_positions:
            prefix = [torch.cat(prefix, dim=1) + self.pos_embed[:, :self.prefix_positions]]
        x = self.pos_drop(torch.cat(prefix + [x], dim=1))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, query_index=query_index if i == last else None)
        return self.norm(x)

    @property
    def readout_tokens(self) -> slice | None:
        """The tokens the head reads: class (and distillation) token with token pooling; None (all) for avg."""
        if self.config.global_pool == "avg":
            return None
        return slice(0, 2 if self.dist_token is not None else 1)

    def pool(self, x: Tensor) -> Tensor:
        """(b t d) → (b d): the class token (first), or the mean of the patch tokens."""
        return x[:, 0] if self.config.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(b t d) → (b k); a distilled model averages its class and distillation heads (DeiT inference)."""
        if self.dist_token is not None:
            cls_logits, dist_logits = self.forward_heads(x, pre_logits)
            return (cls_logits + dist_logits) / 2
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward_heads(self, x: Tensor, pre_logits: bool = False) -> tuple[Tensor, Tensor]:
        """Distilled models: (class-head logits, distillation-head logits), each (b k), for DeiT's training loss."""
        if self.dist_token is None:
            raise ValueError("forward_heads needs a distilled model (config.distilled=True), found distilled=False")
        cls, dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        return (cls, dist) if pre_logits else (self.head(cls), self.head_dist(dist))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images, query_index=self.readout_tokens))

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised head (and distillation head) for num_classes (0: features only)."""
        self.config.num_classes = num_classes
        self.head = self.new_head(num_classes)
        if self.head_dist is not None:
            self.head_dist = self.new_head(num_classes)

    def load_pretrained(self, state_dict: dict[str, Tensor]) -> None:
        """Loads timm-named weights from a model of another resolution or class count (see adapt_pretrained); every
        other tensor must be there and fit."""
        state = self.adapt_pretrained(state_dict)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith(("head.", "head_dist."))]
        if missing or unexpected:
            raise ValueError(f"pretrained weights do not fit this ViT: missing {missing}, unexpected {unexpected}")

    def adapt_pretrained(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm-named weights of a model of another resolution or class count made to fit this one: the position
        table resampled to this grid (square source grid, as timm assumes for checkpoints), a head of another class
        count left out (this model keeps its fresh one)."""
        state = dict(state_dict)
        table = state.get("pos_embed")
        if table is not None and table.shape != self.pos_embed.shape:
            prefix = self.prefix_positions
            side = round((table.shape[1] - prefix) ** 0.5)
            if side * side != table.shape[1] - prefix:
                raise ValueError(f"pos_embed of shape {tuple(table.shape)} is not a square grid plus {prefix} prefix "
                                 f"rows; cannot resample it to grid {self.grid}")
            state["pos_embed"] = self.resample_table(table, (side, side), self.grid)
            log.info("resampled pos_embed from grid %sx%s to %s", side, side, self.grid)
        own = self.state_dict()
        for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
            if key in state and (key not in own or state[key].shape != own[key].shape):
                log.info("not loading %s of shape %s: this model's head differs", key, tuple(state[key].shape))
                del state[key]
        return state
