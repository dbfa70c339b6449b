"""Conformer blocks (Gulati et al. 2020, https://arxiv.org/abs/2005.08100) on the core's multi-head attention.

A block: ½·FFN (macaron) → multi-head self-attention → convolution module → ½·FFN → LayerNorm, each a pre-norm
residual branch. The feed-forward modules are the core `FeedForward` with Swish (`activation="silu"`), their
LayerNorms held by the block. Attention is the core `MultiHeadAttention` with RoPE, ALiBi or no position scheme (the original
uses Transformer-XL relative positions; rotary positions are the common modern substitute).

`Conformer.from_torchaudio` copies a `torchaudio.models.Conformer` into this stack (parity tested to 1e-4).
Shapes: b batch, n frames, d model width, c convolution channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polyformer.attention import MultiHeadAttention
from polyformer.layers import DropPath, FeedForward


@dataclass
class ConformerConfig:
    """Shape of a Conformer stack; the defaults are a ~2 M-parameter CPU model."""

    dim: int = 144  # model width d
    depth: int = 4  # number of Conformer blocks
    heads: int = 4
    ffn_ratio: float = 4.0  # feed-forward hidden width = ffn_ratio * dim
    kernel_size: int = 31  # depthwise convolution kernel (odd: 'same' padding)
    position: Literal["none", "rope", "alibi"] = "rope"  # inside attention
    conv_norm: Literal["batchnorm", "groupnorm"] = "batchnorm"  # groupnorm: batch-independent, for tiny batches
    mask_conv_padding: bool = True  # zero padded frames before the depthwise convolution (torchaudio does not)
    norm_eps: float = 1e-5
    dropout: float = 0.1  # feed-forward, attention output and convolution module outputs
    attn_dropout: float = 0.1  # on attention weights
    drop_path: float = 0.0  # stochastic depth, rising linearly over the blocks

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"conformer dim={self.dim} must be divisible by heads={self.heads}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"conformer kernel_size must be odd for 'same' padding, found {self.kernel_size}")


class ConvolutionModule(nn.Module):
    """LayerNorm → pointwise conv (2c) → GLU → depthwise conv → BatchNorm → Swish → pointwise conv → dropout."""

    def __init__(self, dim: int, kernel_size: int, *, norm: str, mask_padding: bool, dropout: float, eps: float):
        super().__init__()
        self.mask_padding = mask_padding
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise1 = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv_norm = nn.BatchNorm1d(dim) if norm == "batchnorm" else nn.GroupNorm(1, dim)
        self.pointwise2 = nn.Conv1d(dim, dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = rearrange(self.norm(x), "b n d -> b d n")
        x = F.glu(self.pointwise1(x), dim=1)  # (b d n)
        if self.mask_padding and key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask[:, None, :], 0.0)  # padding must not leak into real frames
        x = self.pointwise2(F.silu(self.conv_norm(self.depthwise(x))))
        return self.drop(rearrange(x, "b d n -> b n d"))


class ConformerBlock(nn.Module):
    """ffn1_norm/ffn1 (×½) → norm_attn/attn → conv → ffn2_norm/ffn2 (×½) → norm_out."""

    def __init__(self, config: ConformerConfig, drop_path: float = 0.0):
        super().__init__()
        c = config
        hidden = int(c.ffn_ratio * c.dim)
        self.ffn1_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.ffn1 = FeedForward(c.dim, hidden, "silu", dropout=c.dropout)
        self.norm_attn = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = MultiHeadAttention(c.dim, c.heads, position=c.position, attn_dropout=c.attn_dropout,
                                       dropout=c.dropout)
        self.conv = ConvolutionModule(c.dim, c.kernel_size, norm=c.conv_norm, mask_padding=c.mask_conv_padding,
                                      dropout=c.dropout, eps=c.norm_eps)
        self.ffn2_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.ffn2 = FeedForward(c.dim, hidden, "silu", dropout=c.dropout)
        self.norm_out = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + 0.5 * self.drop_path(self.ffn1(self.ffn1_norm(x)))  # macaron: half-step residual
        x = x + self.drop_path(self.attn(self.norm_attn(x), key_padding_mask=key_padding_mask))
        x = x + self.drop_path(self.conv(x, key_padding_mask))
        x = x + 0.5 * self.drop_path(self.ffn2(self.ffn2_norm(x)))
        return self.norm_out(x)


class Conformer(nn.Module):
    """A stack of Conformer blocks: (b n d) and a (b n) padding mask → (b n d)."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.config = config
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(ConformerBlock(config, r) for r in rates)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return x

    @classmethod
    def from_torchaudio(cls, reference: nn.Module) -> Conformer:
        """A stack with the same hyper-parameters and weights as a `torchaudio.models.Conformer` (no positions)."""
        layers = reference.conformer_layers
        first = layers[0]
        if first.convolution_first:
            raise ValueError("from_torchaudio: convolution_first=True is not supported, found it set")
        sequential = first.conv_module.sequential
        dim = first.self_attn.embed_dim
        config = ConformerConfig(
            dim=dim, depth=len(layers), heads=first.self_attn.num_heads,
            ffn_ratio=first.ffn1.sequential[1].out_features / dim, kernel_size=sequential[2].kernel_size[0],
            position="none", conv_norm="groupnorm" if isinstance(sequential[3], nn.GroupNorm) else "batchnorm",
            mask_conv_padding=False, norm_eps=first.final_layer_norm.eps,
            dropout=first.self_attn_dropout.p, attn_dropout=first.self_attn.dropout,
        )
        model = cls(config)
        model.load_state_dict({f"blocks.{i}.{ours}": value for i, layer in enumerate(layers)
                               for ours, value in _torchaudio_layer_state(layer).items()})
        return model


def _torchaudio_layer_state(layer: nn.Module) -> dict[str, Tensor]:
    """One torchaudio ConformerLayer's tensors under this module's names."""
    state = layer.state_dict()
    names = {
        # torchaudio's FeedForwardModule: Sequential(LayerNorm, Linear, SiLU, Dropout, Linear, Dropout)
        "ffn1_norm": "ffn1.sequential.0", "ffn1.fc1": "ffn1.sequential.1", "ffn1.fc2": "ffn1.sequential.4",
        "ffn2_norm": "ffn2.sequential.0", "ffn2.fc1": "ffn2.sequential.1", "ffn2.fc2": "ffn2.sequential.4",
        "norm_attn": "self_attn_layer_norm", "attn.proj": "self_attn.out_proj", "norm_out": "final_layer_norm",
        "conv.norm": "conv_module.layer_norm", "conv.pointwise1": "conv_module.sequential.0",
        "conv.depthwise": "conv_module.sequential.2", "conv.conv_norm": "conv_module.sequential.3",
        "conv.pointwise2": "conv_module.sequential.5",
    }
    ours = {}
    for new, old in names.items():
        for key, value in state.items():
            if key.startswith(old + "."):
                ours[new + key[len(old):]] = value
    # torch.nn.MultiheadAttention keeps q, k, v in one (3d, d) in_proj: exactly the core's fused qkv layout
    ours["attn.qkv.weight"] = state["self_attn.in_proj_weight"]
    ours["attn.qkv.bias"] = state["self_attn.in_proj_bias"]
    return ours
