"""Multi-head attention with three kernels behind one seam.

- full:   softmax attention on torch's scaled_dot_product_attention (flash / memory-efficient kernels where the
          device has them), with padding, causal, sliding-window and ALiBi masks; an explicit math path returns weights.
- local:  sliding-window softmax attention computed block by block, O(n·w) time and memory (no n×n matrix).
- linear: kernelized attention with feature map elu(x) + 1 (Katharopoulos et al. 2020,
          https://arxiv.org/abs/2006.16236), O(n) time and memory, causal form computed chunk by chunk.

Shapes: b batch, h heads, n query tokens, m key tokens, e head width, d model width.
Masks: `key_padding_mask` is (b, m) bool, True where a key is padding (torch.nn.MultiheadAttention's convention).
A window w lets query i see key j when |i - j| < w (causal: 0 <= i - j < w), so w >= n means full attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from polyformer.layers import DropoutMask, make_dropout
from polyformer.positions import RotaryEmbedding, alibi_bias, alibi_slopes

AttentionKind = Literal["full", "local", "linear"]
PositionInAttention = Literal["none", "rope", "alibi"]


def visible(offset: Tensor, *, causal: bool, window: int | None) -> Tensor:
    """True where a query may see a key `offset` = query position − key position away: causal keeps offset ≥ 0, a
    window keeps the keys less than `window` tokens away (behind the query only, when causal). The one definition of
    the masks that SDPA, the local kernel and the fixed-size export cache apply."""
    allowed = offset >= 0 if causal else torch.ones_like(offset, dtype=torch.bool)
    if window is not None:
        allowed = allowed & ((offset < window) if causal else (offset.abs() < window))
    return allowed


def allowed_keys(
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: Tensor | None,
) -> Tensor | None:
    """Boolean (b or 1, 1, n, m) mask, True where query i may attend key j; None when everything is allowed."""
    allowed = None
    if causal or window is not None:
        offset = query_positions[:, None] - key_positions[None, :]  # (n, m)
        allowed = visible(offset, causal=causal, window=window)[None, None]
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return allowed


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Explicit softmax(q kᵀ / √e + bias) v; returns the output and the (b h n m) weights for visualisation."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    slopes: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Sliding-window attention over blocks of w queries, each against its own and the neighbouring key blocks.

    q, k, v: (b h n e) at the same positions. Scores are (b·c h w 3w) for c = n/w blocks: memory O(n·w), never n×n.
    The blocks are folded into the batch so that SDPA sees 4-D inputs and takes its fused kernel (on CPU too, where
    5-D inputs fall back to the explicit softmax: 2.4× slower at n = 4,096, w = 256).
    """
    b, h, n, e = q.shape
    w = min(window, n)
    blocks = math.ceil(n / w)
    pad = blocks * w - n
    q_blocks = rearrange(F.pad(q, (0, 0, 0, pad)), "b h (c w) e -> (b c) h w e", w=w)
    # keys padded by one block on the left and one (+ tail) on the right; block c sees key positions [c·w − w, c·w + 2w)
    k_blocks, v_blocks = (rearrange(F.pad(t, (0, 0, w, w + pad)).unfold(2, 3 * w, w), "b h c e s -> (b c) h s e")
                          for t in (k, v))
    query_pos = torch.arange(blocks * w, device=q.device).view(blocks, w)
    key_pos = torch.arange(blocks, device=q.device)[:, None] * w - w + torch.arange(3 * w, device=q.device)
    offset = query_pos[:, :, None] - key_pos[:, None, :]  # (c w 3w)
    allowed = visible(offset, causal=causal, window=w)
    allowed = (allowed & (key_pos >= 0)[:, None, :] & (key_pos < n)[:, None, :])[None]  # (1 c w 3w)
    if key_padding_mask is not None:
        real = F.pad(~key_padding_mask, (w, w + pad), value=False).unfold(1, 3 * w, w)  # (b c 3w)
        allowed = allowed & real[:, :, None, :]
    # a row with no visible key (only padded queries past the end) would give NaN: let it see its block instead
    allowed = (allowed | ~allowed.any(dim=-1, keepdim=True)).expand(b, -1, -1, -1)
    mask = rearrange(allowed, "b c w s -> (b c) 1 w s")
    if slopes is not None:
        bias = -slopes.to(q.dtype)[:, None, None, None] * offset.abs().to(q.dtype)  # (h c w 3w)
        mask = repeat(bias, "h c w s -> (b c) h w s", b=b).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask, dropout_p=dropout_p)
    return rearrange(out, "(b c) h w e -> b h (c w) e", b=b)[:, :, :n]


@dataclass
class LinearState:
    """Running sums of the causal linear kernel: Σ φ(k) vᵀ (b h e e) and Σ φ(k) (b h e)."""

    kv: Tensor
    k_sum: Tensor


def linear_feature_map(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    state: LinearState | None = None,
    chunk: int = 64,
    eps: float = 1e-6,
) -> tuple[Tensor, LinearState | None]:
    """out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j), j over all keys (or j <= i when causal).

    The causal form runs over chunks of `chunk` tokens: exact quadratic attention inside a chunk plus the running
    sums of earlier chunks, so memory is O(n·chunk + n/chunk·e²). It starts from and returns `state` (decoding).
    """
    compute = torch.promote_types(q.dtype, torch.float32)  # the running sums need at least fp32
    qf, kf, vf = linear_feature_map(q.to(compute)), linear_feature_map(k.to(compute)), v.to(compute)
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    if not causal:
        kv = torch.einsum("bhme,bhmf->bhef", kf, vf)
        numerator = torch.einsum("bhne,bhef->bhnf", qf, kv)
        denominator = torch.einsum("bhne,bhe->bhn", qf, kf.sum(dim=2))
        return (numerator / (denominator[..., None] + eps)).to(q.dtype), None

    b, h, n, e = q.shape
    c = min(chunk, n)
    pad = -n % c
    qf, kf, vf = (rearrange(F.pad(t, (0, 0, 0, pad)), "b h (C c) e -> b h C c e", c=c) for t in (qf, kf, vf))
    kv_chunks = torch.einsum("bhCce,bhCcf->bhCef", kf, vf)
    k_chunks = kf.sum(dim=3)  # (b h C e)
    kv_before = kv_chunks.cumsum(dim=2) - kv_chunks  # sums over earlier chunks only
    k_before = k_chunks.cumsum(dim=2) - k_chunks
    if state is not None:
        kv_before = kv_before + state.kv[:, :, None]
        k_before = k_before + state.k_sum[:, :, None]
    within = torch.einsum("bhCce,bhCde->bhCcd", qf, kf).tril()  # (b h C c c), j <= i inside the chunk
    numerator = torch.einsum("bhCce,bhCef->bhCcf", qf, kv_before) + within @ vf
    denominator = torch.einsum("bhCce,bhCe->bhCc", qf, k_before) + within.sum(dim=-1)
    out = rearrange(numerator / (denominator[..., None] + eps), "b h C c e -> b h (C c) e")[:, :, :n]
    new_state = LinearState(
        kv=kv_chunks.sum(dim=2) + (state.kv if state is not None else 0.0),
        k_sum=k_chunks.sum(dim=2) + (state.k_sum if state is not None else 0.0),
    )
    return out.to(q.dtype), new_state


@dataclass
class LayerCache:
    """What one attention layer keeps between decoding steps: keys and values (or the linear state) and a count."""

    keys: Tensor | None = None  # (b h m e), rotated when RoPE is on; at most `window` of them when windowed
    values: Tensor | None = None
    padding: Tensor | None = None  # (b m) bool, True where a cached key is padding
    linear: LinearState | None = None
    seen: int = 0  # positions processed so far; the next token has position `seen`


class MultiHeadAttention(nn.Module):
    """Self-attention (fused `qkv` projection) or cross-attention (`q` and `kv` projections), timm's naming."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        cross: bool = False,
        causal: bool = False,
        kind: AttentionKind = "full",
        window: int | None = None,
        position: PositionInAttention = "none",
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        bias: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        dropout_mask: DropoutMask = "bernoulli",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim={dim} must be divisible by heads={heads}")
        if kind == "local" and window is None:
            raise ValueError("attention kind 'local' needs a window (tokens), found window=None")
        if kind == "linear" and (position == "alibi" or window is not None):
            raise ValueError(f"linear attention has no score matrix: position 'alibi' and windows do not apply "
                             f"(found position={position!r}, window={window})")
        if cross and (causal or position != "none"):
            raise ValueError("cross-attention takes neither a causal mask nor RoPE/ALiBi positions")
        self.heads, self.head_dim = heads, dim // heads
        self.cross, self.causal, self.kind, self.window = cross, causal, kind, window
        if cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if position == "rope" else None
        self.register_buffer("slopes", alibi_slopes(heads) if position == "alibi" else None, persistent=False)
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = make_dropout(dropout, dropout_mask)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        need_weights: bool = False,
        query_index: slice | None = None,
        attn_bias: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (b n d); context: (b m d) for cross-attention; key_padding_mask: (b m), or (b n) for self-attention.
        attn_bias: added to the attention scores, broadcastable to (b h n m) (e.g. a relative position bias);
        -inf where a key is excluded. Softmax kernels only.

        query_index: the tokens of x whose outputs are wanted, e.g. slice(0, 1) for a class token; queries are
        projected and attend only there (softmax kernels; the linear kernel computes all and selects), keys and
        values come from all of x. Output (b n' d), n' tokens selected.
        """
        query_index = None if query_index == slice(None) else query_index  # all tokens: keep the fast paths
        # linear attention's causal form runs over every query in order: it computes all, then selects
        subset = query_index if self.kind != "linear" else None
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context (b m d), found None")
            q = self.q(x if subset is None else x[:, subset])
            k, v = self.kv(context).chunk(2, dim=-1)
        elif subset is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:  # the fused weight's rows [q; k; v]: queries for the selected tokens only
            q, k, v = self.project(x[:, subset], x, x)
        return self._attention(q, k, v, x.shape[1], key_padding_mask=key_padding_mask, cache=cache,
                               need_weights=need_weights, subset=subset, query_index=query_index, attn_bias=attn_bias)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Tensor | None = None,
               attn_bias: Tensor | None = None) -> Tensor:
        """Attention with separate inputs for the queries (b n d) and the keys and values (b m d), as torch's
        nn.MultiheadAttention takes them (DETR adds positions to the first two only). Self-attention takes n = m,
        its keys at the queries' positions; no cache."""
        if not self.cross and query.shape[1] != key.shape[1]:
            raise ValueError(f"self-attention's queries and keys are the same tokens: expected as many, found "
                             f"{query.shape[1]} and {key.shape[1]}")
        q, k, v = self.project(query, key, value)
        return self._attention(q, k, v, query.shape[1], key_padding_mask=key_padding_mask, attn_bias=attn_bias)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each part of the fused projection ([q; k; v] rows, or q and [k; v]) applied to its own input; the [k; v]
        rows in one product when key is value."""
        d = query.shape[-1]

        def rows(layer: nn.Linear, inputs: Tensor, start: int, stop: int) -> Tensor:
            return F.linear(inputs, layer.weight[start:stop], None if layer.bias is None else layer.bias[start:stop])

        if self.cross:
            q, layer, first = self.q(query), self.kv, 0
        else:
            q, layer, first = rows(self.qkv, query, 0, d), self.qkv, d
        if key is value:
            return q, *rows(layer, key, first, first + 2 * d).chunk(2, dim=-1)
        return q, rows(layer, key, first, first + d), rows(layer, value, first + d, first + 2 * d)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, n: int, *, key_padding_mask: Tensor | None = None,
                   cache: LayerCache | None = None, need_weights: bool = False, subset: slice | None = None,
                   query_index: slice | None = None, attn_bias: Tensor | None = None
                   ) -> Tensor | tuple[Tensor, Tensor]:
        """Projected q (b n' d), k, v (b m d) → heads, positions, the kernel, the output projection; n: the tokens of
        x (n' = n unless `subset` selects queries)."""
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        start = cache.seen if cache is not None else 0  # position of the first token of x (plain ints)
        key_start = 0 if self.cross else start
        query_pos = torch.arange(start, start + n, device=q.device)
        query_pos = query_pos if subset is None else query_pos[subset]
        if self.rope is not None:
            q = self.rope(q, query_pos)
            k = self.rope(k, torch.arange(key_start, key_start + k.shape[2], device=q.device))

        weights = None
        if self.kind == "linear":
            if attn_bias is not None:
                raise ValueError("attn_bias: linear attention forms no score matrix to add it to; use kind='full'")
            if need_weights:
                raise ValueError("need_weights: linear attention forms no weight matrix; use kind='full'")
            out, state = linear_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                          state=cache.linear if cache is not None else None)
            if cache is not None:
                cache.linear, cache.seen = state, start + n
            out = out if query_index is None else out[:, :, query_index]
        else:
            if cache is not None:
                k, v, key_padding_mask, key_start = self._extend_cache(cache, k, v, key_padding_mask)
            # queries and keys at the same positions: the block-wise local kernel and SDPA's causal path apply
            aligned = not self.cross and subset is None and key_start == start and n == k.shape[2]
            out, weights = self._softmax_attention(q, k, v, query_pos, key_start, aligned, key_padding_mask,
                                                   need_weights, attn_bias)

        out = self.proj_drop(self.proj(rearrange(out, "b h n e -> b n (h e)")))
        return (out, weights) if need_weights else out

    def forward_fixed_cache(self, x: Tensor, keys: Tensor, values: Tensor, key_valid: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """Causal windowed self-attention of n new tokens over a cache of fixed size w = window, for export (a
        graph with the cache as tensors in and out, no Python state).

        x (b n d) new tokens; keys, values (b h w e): the w tokens before them (oldest first); key_valid (b w+n):
        True where a cached or new token is real. Returns the output (b n d) and the cache advanced by n tokens
        (the last w keys and values). A token that is not real still attends to itself, so that every output is
        finite; no real token attends to it.
        """
        if self.cross or not self.causal or self.window is None or self.kind == "linear" or self.rope is not None \
                or self.slopes is not None:
            raise ValueError(f"a fixed-size cache needs causal softmax self-attention with a window and no RoPE or "
                             f"ALiBi, found cross={self.cross}, causal={self.causal}, window={self.window}, "
                             f"kind={self.kind!r}, rope={self.rope is not None}, alibi={self.slopes is not None}")
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = self.q_norm(q), self.k_norm(k)
        w, n = keys.shape[2], x.shape[1]
        k, v = torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2)  # (b h w+n e)
        offset = (w + torch.arange(n, device=x.device))[:, None] - torch.arange(w + n, device=x.device)[None]
        allowed = (visible(offset, causal=True, window=self.window) & key_valid[:, None, None, :]) | (offset == 0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        out = self.proj_drop(self.proj(rearrange(out, "b h n e -> b n (h e)")))
        return out, k[:, :, n:], v[:, :, n:]

    def _extend_cache(self, cache: LayerCache, k: Tensor, v: Tensor, padding: Tensor | None):
        """Appends this step's keys to the cache and trims it to the window; returns all keys to attend to and the
        position of the first of them."""
        new = k.shape[2]
        if cache.keys is not None:
            if padding is not None or cache.padding is not None:
                b, cached = cache.keys.shape[0], cache.keys.shape[2]
                old = cache.padding if cache.padding is not None else k.new_zeros(b, cached, dtype=torch.bool)
                fresh = padding if padding is not None else k.new_zeros(b, new, dtype=torch.bool)
                padding = torch.cat((old, fresh), dim=1)
            k, v = torch.cat((cache.keys, k), dim=2), torch.cat((cache.values, v), dim=2)
        key_start = cache.seen + new - k.shape[2]
        keep = k.shape[2] if self.window is None else min(self.window, k.shape[2])
        cache.keys, cache.values = k[:, :, -keep:], v[:, :, -keep:]
        cache.padding = padding[:, -keep:] if padding is not None else None
        cache.seen += new
        return k, v, padding, key_start

    def _softmax_attention(self, q, k, v, query_pos: Tensor, key_start: int, aligned: bool, key_padding_mask,
                           need_weights, attn_bias: Tensor | None = None):
        dropout_p = self.attn_dropout if self.training else 0.0
        if attn_bias is not None and self.kind == "local":
            raise ValueError("attn_bias: the local kernel takes no additive bias; use kind='full' with a window")
        if self.kind == "local" and aligned and not need_weights:
            out = local_attention(q, k, v, window=self.window, causal=self.causal,
                                  key_padding_mask=key_padding_mask, slopes=self.slopes, dropout_p=dropout_p)
            return out, None
        # the causal-only case goes to SDPA's is_causal fast path (flash on GPU) instead of an explicit mask
        if self.causal and aligned and not need_weights and self.window is None and key_padding_mask is None \
                and self.slopes is None and attn_bias is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True), None
        key_pos = torch.arange(key_start, key_start + k.shape[2], device=q.device)
        mask = allowed_keys(query_pos, key_pos, causal=self.causal, window=self.window,
                            key_padding_mask=key_padding_mask)
        bias = alibi_bias(self.slopes, query_pos, key_pos).to(q.dtype)[None] if self.slopes is not None else None
        if attn_bias is not None:
            bias = attn_bias.to(q.dtype) if bias is None else bias + attn_bias.to(q.dtype)
        if bias is not None:
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
        if need_weights:
            return math_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
