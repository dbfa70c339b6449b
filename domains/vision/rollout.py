"""Attention rollout (Abnar & Zuidema 2020, https://arxiv.org/abs/2005.00928): how much each patch flows, through all
the layers, into the token(s) the head reads (the class token, or the mean of the patch tokens for avg pooling).

Shapes: b batch, h heads, t tokens (prefix + patches), (gh gw) patch grid.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from polyformer.domains.vision.model import VisionTransformer
from polyformer.training import eval_mode


@contextmanager
def capture_attention(model: VisionTransformer):
    """Within the block, every forward of `model` appends each block's attention weights (b h t' t) to the list it
    yields: t' = t for `forward_features(images)`, while `model(images)` with token pooling computes the last block
    for the class token alone (t' = 1 there). A hook reruns the block's own attention with need_weights=True on the
    same input, so the residual path is whatever the block does (pre- or post-norm)."""
    maps: list[Tensor] = []

    def hook(module, args, kwargs, output):
        _, weights = module.forward(*args, **kwargs, need_weights=True)  # .forward: no hook recursion
        maps.append(weights.detach())

    handles = [block.attn.register_forward_hook(hook, with_kwargs=True) for block in model.blocks]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_rollout(model: VisionTransformer, images: Tensor, residual: float = 0.5) -> Tensor:
    """(b c H W) → (b gh gw) share of the pooled token's rolled-out attention per patch (sums to ≤ 1 per image).

    Per layer the head-averaged weights A are mixed with the identity for the residual connection,
    Â = residual·I + (1 − residual)·A, rows renormalised, and the layers multiplied: R = Â_L ⋯ Â_1.
    """
    with eval_mode(model), capture_attention(model) as maps:
        model.forward_features(images)
    t = maps[0].shape[-1]
    rollout = torch.eye(t, device=images.device).expand(images.shape[0], t, t)
    for weights in maps:
        mixed = residual * torch.eye(t, device=images.device) + (1 - residual) * weights.mean(dim=1)  # (b t t)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    gh, gw = images.shape[-2] // model.config.patch_size, images.shape[-1] // model.config.patch_size
    pooled = model.pool(rollout)  # (b t): the class token's row, or the mean of the patch tokens' rows
    return pooled[:, model.num_prefix_tokens:].reshape(-1, gh, gw)
