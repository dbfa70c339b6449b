"""ViT / DeiT parity with timm (weights copied both ways, fp32 eval, max abs logit diff <= 1e-5), position resampling
at a second image size, and clear errors for bad input and unsupported timm variants."""

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from polyformer.domains.vision import ViTConfig, VisionTransformer
from polyformer.domains.vision.rollout import attention_rollout, capture_attention
from polyformer.domains.vision.timm_compat import vit_from_timm, vit_to_timm

TOL = dict(atol=1e-5, rtol=0)


def perturbed_timm(name: str, **kwargs) -> torch.nn.Module:
    """A timm model (no download) whose parameters are all moved off their init, so every weight matters."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_from_timm_matches_at_224_and_at_a_second_size(name):
    theirs = perturbed_timm(name, dynamic_img_size=True)
    ours = vit_from_timm(theirs).eval()
    torch.manual_seed(1)
    for size in (224, 160):  # 160: both resample the 14x14 position table to 10x10 on the fly
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            expected, found = theirs(images), ours(images)
        assert expected.abs().max() > 0.1  # logits far from zero, so the tolerance is meaningful
        torch.testing.assert_close(found, expected, **TOL)


def test_set_image_size_matches_timm_set_input_size():
    theirs = perturbed_timm("vit_tiny_patch16_224", depth=2)
    ours = vit_from_timm(theirs).eval()
    theirs.set_input_size(img_size=(256, 192))
    ours.set_image_size((256, 192))
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed, **TOL)
    images = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), **TOL)


@pytest.mark.parametrize("kwargs", [
    dict(reg_tokens=4, no_embed_class=True),  # register tokens, positions for patches only
    dict(global_pool="avg", class_token=False),  # avg pool and fc_norm
    dict(init_values=1e-5, qk_norm=True),  # LayerScale and per-head q/k norm
])
def test_from_timm_variants(kwargs):
    theirs = perturbed_timm("vit_tiny_patch16_224", img_size=64, depth=2, **kwargs)
    ours = vit_from_timm(theirs).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), **TOL)


def test_state_dict_exports_to_timm_without_a_key_map():
    torch.manual_seed(0)
    config = ViTConfig(img_size=32, patch_size=8, num_classes=7, dim=64, depth=2, heads=4, distilled=True)
    ours = VisionTransformer(config).eval()
    theirs = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                               num_classes=7, embed_dim=64, depth=2, num_heads=4).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    rebuilt = vit_to_timm(ours).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), ours(images), **TOL)
        torch.testing.assert_close(rebuilt(images), ours(images), **TOL)


def test_load_pretrained_resamples_positions_and_skips_a_foreign_head():
    source = perturbed_timm("vit_tiny_patch16_224", depth=2)
    model = VisionTransformer(ViTConfig(img_size=96, patch_size=16, num_classes=10, dim=192, depth=2, heads=3))
    fresh_head = model.head.weight.clone()
    model.load_pretrained(source.state_dict())
    expected = resample_abs_pos_embed(source.pos_embed, (6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed, expected, **TOL)
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight, **TOL)
    torch.testing.assert_close(model.head.weight, fresh_head)


def test_bad_inputs_name_expected_and_found():
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, num_classes=3, dim=32, depth=1, heads=2))
    with pytest.raises(ValueError, match=r"1 channels, the model expects in_chans=3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"30x32 is not divisible by the patch size 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"img_size 30x30 must be divisible by patch_size=8"):
        ViTConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match=r"not reproducible: no norm before the blocks \(pre_norm=False\)"):
        vit_from_timm(timm.create_model("vit_tiny_patch16_224", pre_norm=True, img_size=32))
    with pytest.raises(ValueError, match=r"expected a timm VisionTransformer instance, found ResNet"):
        vit_from_timm(timm.create_model("resnet10t"))


def test_attention_rollout_and_captured_weights():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=16, patch_size=4, num_classes=3, dim=32, depth=2, heads=2)).eval()
    images = torch.randn(2, 3, 16, 16)
    with capture_attention(model) as maps:
        logits = model(images)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 17))
    torch.testing.assert_close(model(images), logits)  # hooks removed, forward unchanged
    heat = attention_rollout(model, images)
    assert heat.shape == (2, 4, 4)
    assert (heat >= 0).all() and (heat.sum(dim=(1, 2)) <= 1 + 1e-6).all()


def test_reset_classifier_and_feature_only_model():
    model = VisionTransformer(ViTConfig(img_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2,
                                        distilled=True)).eval()
    images = torch.randn(2, 3, 16, 16)
    model.reset_classifier(0)
    assert model(images).shape == (2, 32)  # pooled features (mean of class and distillation tokens)
    model.reset_classifier(5)
    assert model(images).shape == (2, 5) and model.head_dist.out_features == 5
