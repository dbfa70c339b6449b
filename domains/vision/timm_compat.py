"""Interchange with timm: `vit_from_timm` (our VisionTransformer of a timm VisionTransformer's architecture and
weights), `vit_to_timm` (the reverse), and timm's pretrained weights for `init_from: timm:<name>`.

The state-dict names are the same on both sides (patch_embed.proj, cls_token, reg_token, dist_token, pos_embed,
blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm, fc_norm, head, head_dist),
so weights move with `load_state_dict` alone; this file only checks that the architecture is one we reproduce.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from polyformer.domains.vision.model import ViTConfig, VisionTransformer


def _unsupported(what: str, found: object) -> ValueError:
    return ValueError(f"timm model not reproducible: {what} (found {found})")


def config_from_timm(model: nn.Module) -> ViTConfig:
    """The ViTConfig of a timm VisionTransformer / VisionTransformerDistilled; a clear error for variants
    (pre-norm, attention pooling, fused-block or gated layers, no qkv bias, ...) the core blocks do not express."""
    from timm.layers import Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer as TimmViT

    if not isinstance(model, TimmViT):
        raise ValueError(f"expected a timm VisionTransformer instance, found {type(model).__name__}")
    embed = model.patch_embed
    checks = {
        "patch embedding is timm's PatchEmbed": type(embed) is PatchEmbed,
        "square patches": embed.patch_size[0] == embed.patch_size[1],
        "no norm in the patch embedding": isinstance(embed.norm, nn.Identity),
        "no dynamic image padding": not getattr(embed, "dynamic_img_pad", False),
        "a learned position table": model.pos_embed is not None,
        "no norm before the blocks (pre_norm=False)": isinstance(model.norm_pre, nn.Identity),
        "patch projection with bias": embed.proj.bias is not None,
        "no attention pooling": getattr(model, "attn_pool", None) is None,
        "global_pool 'token' or 'avg'": model.global_pool in ("token", "avg"),
        "no patch dropout": isinstance(model.patch_drop, nn.Identity),
        "pooling without prefix tokens": not getattr(model, "pool_include_prefix", False),
        "a final norm (final_norm=True)": not (isinstance(model.norm, nn.Identity)
                                               and isinstance(model.fc_norm, nn.Identity)),
    }
    for what, ok in checks.items():
        if not ok:
            raise _unsupported(what, type(model).__name__)
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            raise _unsupported(f"blocks.{i} must be timm's Block(Attention, Mlp)",
                               f"{type(block).__name__}({type(block.attn).__name__}, {type(block.mlp).__name__})")
        act = block.mlp.act
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            raise _unsupported(f"blocks.{i}.mlp.act must be exact GELU", act)
        if not (isinstance(block.attn.norm, nn.Identity) and isinstance(block.mlp.norm, nn.Identity)):
            raise _unsupported(f"blocks.{i}: no scale norms in attention or MLP", "scale_attn/mlp_norm")
        if getattr(block.attn, "gate", None) is not None:
            raise _unsupported(f"blocks.{i}.attn: no attention gate", "a gate")
        biases = (block.attn.qkv.bias, block.attn.proj.bias, block.mlp.fc1.bias, block.mlp.fc2.bias)
        if any(bias is None for bias in biases):
            raise _unsupported(f"blocks.{i}: biases in qkv, proj, fc1 and fc2 (the core has one bias flag)",
                               [bias is not None for bias in biases])
    first, last = model.blocks[0], model.blocks[-1]
    layer_scale = None
    if not isinstance(first.ls1, nn.Identity):
        layer_scale = float(first.ls1.gamma.detach().flatten()[0])  # the init value only; weights are copied after
    drop_path = getattr(last.drop_path1, "drop_prob", 0.0)
    return ViTConfig(
        img_size=tuple(embed.img_size), patch_size=embed.patch_size[0], in_chans=embed.proj.in_channels,
        num_classes=model.num_classes, dim=model.embed_dim, depth=len(model.blocks), heads=first.attn.num_heads,
        mlp_ratio=first.mlp.fc1.out_features / model.embed_dim, qk_norm=not isinstance(first.attn.q_norm, nn.Identity),
        layer_scale=layer_scale, class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
        distilled=getattr(model, "dist_token", None) is not None, no_embed_class=model.no_embed_class,
        global_pool=model.global_pool, fc_norm=not isinstance(model.fc_norm, nn.Identity), norm_eps=first.norm1.eps,
        drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p, proj_drop_rate=first.attn.proj_drop.p,
        attn_drop_rate=first.attn.attn_drop.p, drop_path_rate=drop_path,
    )


def timm_model_for(config: ViTConfig, *, dynamic_img_size: bool = True) -> nn.Module:
    """An untrained timm model with the architecture of `config` (dynamic_img_size: resample positions on the fly,
    as ours always does)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    c = config
    kwargs = dict(
        img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=c.num_classes,
        global_pool=c.global_pool, embed_dim=c.dim, depth=c.depth, num_heads=c.heads, mlp_ratio=c.mlp_ratio,
        qkv_bias=True, qk_norm=c.qk_norm, init_values=c.layer_scale, class_token=c.class_token,
        no_embed_class=c.no_embed_class, reg_tokens=c.reg_tokens, fc_norm=c.use_fc_norm,
        norm_layer=partial(nn.LayerNorm, eps=c.norm_eps), dynamic_img_size=dynamic_img_size, drop_rate=c.drop_rate,
        pos_drop_rate=c.pos_drop_rate, proj_drop_rate=c.proj_drop_rate, attn_drop_rate=c.attn_drop_rate,
        drop_path_rate=c.drop_path_rate,
    )
    return VisionTransformerDistilled(**kwargs) if c.distilled else TimmViT(**kwargs)


def vit_from_timm(timm_model: nn.Module) -> VisionTransformer:
    """Same architecture and weights as a timm VisionTransformer (or VisionTransformerDistilled) instance."""
    model = VisionTransformer(config_from_timm(timm_model))
    model.load_state_dict(timm_model.state_dict(), strict=True)
    return model


def vit_to_timm(model: VisionTransformer) -> nn.Module:
    """A timm model of the same architecture holding `model`'s weights (timm's own forward)."""
    theirs = timm_model_for(model.config)
    theirs.load_state_dict(model.state_dict(), strict=True)
    return theirs


def timm_weights(source: str) -> dict[str, Tensor]:
    """The weights of `timm:<model name>`: timm's pretrained download (needs network access)."""
    import timm

    return timm.create_model(source.removeprefix("timm:"), pretrained=True).state_dict()
