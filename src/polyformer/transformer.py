"""Transformer blocks, encoder and decoder, built from one typed config.

A block is attention + feed-forward, each a residual branch, pre-norm (x + f(norm(x))) or post-norm
(norm(x + f(x))); a decoder block adds cross-attention to a memory in between. The encoder is bidirectional or
causal; a causal encoder decodes incrementally with a KV cache (`new_cache()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from polyformer.attention import AttentionKind, LayerCache, MultiHeadAttention
from polyformer.layers import (Activation, DropoutMask, DropPath, FeedForward, LayerScale, NormKind,
                               init_linear_weights, make_norm)
from polyformer.positions import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding

PositionKind = Literal["none", "sinusoidal", "learned", "rope", "alibi"]
KVCache = list[LayerCache]


@dataclass
class TransformerConfig:
    """Everything that shapes an encoder or decoder stack."""

    dim: int = 256  # model width d
    depth: int = 6  # number of blocks
    heads: int = 8  # attention heads; dim must be divisible by heads
    mlp_ratio: float = 4.0  # feed-forward hidden width = mlp_ratio * dim
    activation: Activation = "gelu"  # relu | gelu | silu | swiglu
    norm: NormKind = "layernorm"  # layernorm | rmsnorm | batchnorm (over batch and tokens, PatchTST's)
    norm_eps: float = 1e-5  # timm's ViTs use 1e-6
    prenorm: bool = True  # False: post-norm as in the original Transformer
    final_norm: bool = True  # a norm after the last pre-norm block
    causal: bool = False  # token i attends to j <= i only
    attention: AttentionKind = "full"  # full (SDPA) | local (sliding window, O(n·w)) | linear (O(n))
    window: int | None = None  # sliding window in tokens: a mask for 'full', the block size for 'local'
    position: PositionKind = "none"  # sinusoidal | learned (added to inputs) | rope | alibi (inside attention)
    max_len: int = 4096  # positions of the learned table (resampled beyond) and of the cached sinusoidal table
    rope_base: float = 10000.0
    qk_norm: bool = False  # normalise queries and keys per head (ViT-22B)
    bias: bool = True  # biases in the linear layers
    dropout: float = 0.0  # after the attention output projection and in the feed-forward
    ffn_hidden_dropout: bool = True  # False: the feed-forward drops its output only (GPT-2, the Decision Transformer)
    dropout_mask: DropoutMask = "bernoulli"  # rand: masks from torch.rand, the same distribution, faster on CPU
    attn_dropout: float = 0.0  # on attention weights (full and local kernels)
    drop_path: float = 0.0  # stochastic depth, rising linearly to this value over the blocks
    layer_scale: float | None = None  # LayerScale initial value; None turns it off

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.depth <= 0 or self.heads <= 0:
            raise ValueError(f"dim, depth and heads must be positive, found dim={self.dim}, depth={self.depth}, "
                             f"heads={self.heads}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        if int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio * dim (the feed-forward width) must be at least 1, found mlp_ratio="
                             f"{self.mlp_ratio}, dim={self.dim}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be at least 1, found {self.max_len}")
        if self.attention not in ("full", "local", "linear"):
            raise ValueError(f"attention must be 'full', 'local' or 'linear', found {self.attention!r}")
        if self.attention == "local" and self.window is None:
            raise ValueError("attention='local' needs window (tokens), found window=None")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1, found {self.window}")
        if self.attention == "linear" and self.position in ("rope", "alibi"):
            raise ValueError(f"position={self.position!r} acts on attention scores, which attention='linear' "
                             f"does not form; use sinusoidal or learned positions")
        if self.norm not in ("layernorm", "rmsnorm", "batchnorm"):
            raise ValueError(f"norm must be 'layernorm', 'rmsnorm' or 'batchnorm', found {self.norm!r}")
        if self.dropout_mask not in ("bernoulli", "rand"):
            raise ValueError(f"dropout_mask must be 'bernoulli' or 'rand', found {self.dropout_mask!r}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), found {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class TransformerBlock(nn.Module):
    """norm1/attn/ls1 and norm2/mlp/ls2 residual branches (timm's names); `cross=True` adds norm_cross/cross_attn."""

    def __init__(self, config: TransformerConfig, *, cross: bool = False, drop_path: float = 0.0):
        super().__init__()
        c = config
        self.prenorm = c.prenorm
        norm = partial(make_norm, c.norm, eps=c.norm_eps)
        self.norm1 = norm(c.dim)
        self.attn = MultiHeadAttention(
            c.dim, c.heads, causal=c.causal, kind=c.attention, window=c.window,
            position=c.position if c.position in ("rope", "alibi") else "none", rope_base=c.rope_base,
            qk_norm=c.qk_norm, norm_layer=norm, bias=c.bias,
            attn_dropout=c.attn_dropout, dropout=c.dropout, dropout_mask=c.dropout_mask,
        )
        self.ls1 = LayerScale(c.dim, c.layer_scale) if c.layer_scale else nn.Identity()
        if cross:
            self.norm_cross = norm(c.dim)
            self.cross_attn = MultiHeadAttention(c.dim, c.heads, cross=True, bias=c.bias, attn_dropout=c.attn_dropout,
                                                 dropout=c.dropout, dropout_mask=c.dropout_mask)
            self.ls_cross = LayerScale(c.dim, c.layer_scale) if c.layer_scale else nn.Identity()
        self.norm2 = norm(c.dim)
        self.mlp = FeedForward(c.dim, int(c.mlp_ratio * c.dim), c.activation, bias=c.bias, dropout=c.dropout,
                               hidden_dropout=c.ffn_hidden_dropout, dropout_mask=c.dropout_mask)
        self.ls2 = LayerScale(c.dim, c.layer_scale) if c.layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def residual(self, x: Tensor, norm: nn.Module, branch, scale: nn.Module,
                 query_index: slice | None = None) -> Tensor:
        """x + branch(norm(x)) or norm(x + branch(x)); with query_index the branch sees all of x and the residual
        keeps only the selected tokens (the branch returns those)."""
        kept = x if query_index is None else x[:, query_index]
        if self.prenorm:
            return kept + self.drop_path(scale(branch(norm(x))))
        return norm(kept + self.drop_path(scale(branch(x))))

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        query_index: slice | None = None,
        attn_bias: Tensor | None = None,
    ) -> Tensor:
        """x (b n d) → (b n d), or (b n' d) for the n' tokens that query_index selects (see MultiHeadAttention).
        attn_bias: added to the self-attention scores (see MultiHeadAttention)."""
        x = self.residual(x, self.norm1, lambda h: self.attn(h, key_padding_mask=key_padding_mask, cache=cache,
                                                             query_index=query_index, attn_bias=attn_bias),
                          self.ls1, query_index)
        if memory is not None:
            x = self.residual(x, self.norm_cross,
                              lambda h: self.cross_attn(h, memory, key_padding_mask=memory_padding_mask),
                              self.ls_cross)
        return self.residual(x, self.norm2, self.mlp, self.ls2)


    def forward_fixed_cache(self, x: Tensor, keys: Tensor, values: Tensor, key_valid: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """forward() of n new tokens over a fixed-size cache (see MultiHeadAttention.forward_fixed_cache)."""
        update: list[Tensor] = []

        def attend(h: Tensor) -> Tensor:
            out, k, v = self.attn.forward_fixed_cache(h, keys, values, key_valid)
            update.extend((k, v))
            return out

        x = self.residual(x, self.norm1, attend, self.ls1)
        return self.residual(x, self.norm2, self.mlp, self.ls2), update[0], update[1]


class _Stack(nn.Module):
    """Additive positions, blocks with linearly rising drop-path, and the final norm of a pre-norm stack."""

    # the block class: a subclass of TransformerBlock whose forward differs (DETR's positions at every layer) takes
    # the same config and keeps the same parameter names
    block_type: type[TransformerBlock] = TransformerBlock

    def __init__(self, config: TransformerConfig, *, cross: bool):
        super().__init__()
        self.config = config
        if config.position == "sinusoidal":
            self.pos_embed = SinusoidalPositionalEmbedding(config.dim, config.max_len)
        elif config.position == "learned":
            self.pos_embed = LearnedPositionalEmbedding(config.dim, config.max_len)
        else:
            self.pos_embed = None
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(self.block_type(config, cross=cross, drop_path=r) for r in rates)
        self.norm = make_norm(config.norm, config.dim, config.norm_eps) if config.prenorm and config.final_norm \
            else nn.Identity()
        self.apply(init_linear_weights)

    def new_cache(self) -> KVCache:
        """Empty per-block caches for incremental decoding (causal stacks only)."""
        if not self.config.causal:
            raise ValueError("a KV cache needs a causal stack (config.causal=True), found causal=False")
        return [LayerCache() for _ in self.blocks]

    def _add_positions(self, x: Tensor, cache: KVCache | None) -> Tensor:
        if self.pos_embed is None:
            return x
        return self.pos_embed(x, offset=cache[0].seen if cache else 0)


class TransformerEncoder(_Stack):
    """Bidirectional or causal self-attention stack: (b n d) → (b n d)."""

    export_axes = {0: {0: "batch", 1: "tokens"}}  # polyformer.deploy: dynamic axes of the inputs

    def __init__(self, config: TransformerConfig):
        super().__init__(config, cross=False)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, cache: KVCache | None = None,
                query_index: slice | None = None) -> Tensor:
        """x: (b n d); key_padding_mask: (b n) True at padding; cache: from new_cache(), extended in place.

        query_index: only these tokens' outputs are wanted (b n' d), e.g. a class token or the last position;
        the last block computes its queries, feed-forward and norm there alone (keys and values from all tokens;
        linear attention computes every output of that block's attention and selects).
        """
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the encoder has {len(self.blocks)}")
        x = self._add_positions(x, cache)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask=key_padding_mask, cache=cache[i] if cache is not None else None,
                      query_index=query_index if i == last else None)
        return self.norm(x)


    def forward_fixed_cache(self, x: Tensor, keys: Tensor, values: Tensor, valid: Tensor, new_valid: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Incremental decoding with the cache as fixed-size tensors in and out, for export (torch.export, ONNX) of
        a causal encoder with a window w and no added or rotary positions.

        x (b n d) new tokens; keys, values (depth b h w e) and valid (b w): the cache, w = config.window slots,
        oldest first, valid False where a slot holds no token yet; new_valid (b n): which new tokens are real.
        Returns the outputs (b n d) and the cache advanced by n tokens. Equals forward() with a KV cache on the
        real tokens. `new_fixed_cache(b)` makes an empty one.
        """
        if self.pos_embed is not None:
            raise ValueError(f"a fixed-size cache needs position 'none' (or the tokens' own embeddings of time), "
                             f"found position={self.config.position!r}")
        key_valid = torch.cat((valid, new_valid), dim=1)  # (b w+n)
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.forward_fixed_cache(x, keys[i], values[i], key_valid)
            new_keys.append(k)
            new_values.append(v)
        return self.norm(x), torch.stack(new_keys), torch.stack(new_values), key_valid[:, x.shape[1]:]

    def new_fixed_cache(self, batch: int, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """An empty cache for forward_fixed_cache: keys, values (depth b h w e) of zeros and valid (b w) False."""
        c = self.config
        if c.window is None:
            raise ValueError("a fixed-size cache needs a window (config.window), found None")
        keys = torch.zeros(c.depth, batch, c.heads, c.window, c.head_dim, device=device)
        return keys, torch.zeros_like(keys), torch.zeros(batch, c.window, dtype=torch.bool, device=device)


class TransformerDecoder(_Stack):
    """Self-attention (causal when config.causal) + cross-attention to a memory: (b n d), (b m d) → (b n d)."""

    export_axes = {0: {0: "batch", 1: "tokens"}, 1: {0: "batch", 1: "memory"}}  # polyformer.deploy

    def __init__(self, config: TransformerConfig):
        super().__init__(config, cross=True)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        query_index: slice | None = None,
    ) -> Tensor:
        """As TransformerEncoder.forward, with a memory (b m d) to cross-attend and its padding mask (b m)."""
        x = self._add_positions(x, cache)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, memory, key_padding_mask=key_padding_mask, memory_padding_mask=memory_padding_mask,
                      cache=cache[i] if cache is not None else None, query_index=query_index if i == last else None)
        return self.norm(x)
