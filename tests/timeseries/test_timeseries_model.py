"""Forecasters: parity with HF transformers' PatchTST (weights copied), DLinear's decomposition, RevIN, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyformer.domains.timeseries.model import (
    DLinear,
    DLinearConfig,
    EncoderDecoderConfig,
    EncoderDecoderForecaster,
    PatchTST,
    PatchTSTConfig,
    RevIN,
)
from polyformer.layers import RandDropout, TokenBatchNorm
from polyformer.transformer import TransformerConfig


def tiny_patchtst(norm: str = "layernorm", **overrides) -> PatchTSTConfig:
    encoder = TransformerConfig(dim=16, depth=2, heads=4, mlp_ratio=4.0, prenorm=False, position="learned",
                                norm=norm)
    return PatchTSTConfig(**{"lookback": 64, "horizon": 24, "encoder": encoder, "embed_dropout": 0.0, **overrides})


@pytest.mark.parametrize("norm, padding", [("layernorm", "none"), ("batchnorm", "none"), ("batchnorm", "end")])
def test_patchtst_matches_hf_transformers_with_copied_weights(norm, padding):
    """The reported setting is BatchNorm with end padding. HF drops leading steps instead of padding the end, so for
    'end' HF reads the window with the padding already appended (stride more steps, the last one repeated); HF's
    scaling would then see the padded steps, so that case compares the two without instance normalisation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    end = padding == "end"
    hf_config = transformers.PatchTSTConfig(
        num_input_channels=3, context_length=64 + 8 * end, prediction_length=24, patch_length=16, patch_stride=8,
        d_model=16, num_attention_heads=4, num_hidden_layers=2, ffn_dim=64, norm_type=norm, pre_norm=False,
        positional_encoding_type="random", use_cls_token=False, scaling=None if end else "std", loss="mse",
        do_mask_input=False, attention_dropout=0.0, positional_dropout=0.0, path_dropout=0.0, ff_dropout=0.0,
        head_dropout=0.0, activation_function="gelu", share_projection=True, pooling_type=None, share_embedding=True,
        norm_eps=1e-5,
    )
    hf = transformers.PatchTSTForPrediction(hf_config).eval()
    ours = PatchTST(tiny_patchtst(norm, padding=padding, revin=not end)).eval()
    assert ours.config.num_patches == 7 + end  # (64 − 16) / 8 + 1, and one more from the padding
    src = hf.model.encoder
    with torch.no_grad():
        for module in hf.modules():  # running statistics away from (0, 1), so that copying them matters
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        ours.patch_embed.proj.load_state_dict(src.embedder.input_embedding.state_dict())
        ours.encoder.pos_embed.weight.copy_(src.positional_encoder.position_enc)
        for block, layer in zip(ours.encoder.blocks, src.layers, strict=True):
            attn = layer.self_attn
            block.attn.qkv.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            block.attn.qkv.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            block.attn.proj.load_state_dict(attn.out_proj.state_dict())
            for ours_norm, hf_norm in ((block.norm1, layer.norm_sublayer1), (block.norm2, layer.norm_sublayer3)):
                ours_norm.load_state_dict(getattr(hf_norm, "batchnorm", hf_norm).state_dict())
            block.mlp.fc1.load_state_dict(layer.ff[0].state_dict())
            block.mlp.fc2.load_state_dict(layer.ff[3].state_dict())
        ours.head.load_state_dict(hf.head.projection.state_dict())
    x = torch.randn(5, 64, 3) * 3 + 2
    hf_input = torch.cat((x, x[:, -1:].expand(-1, 8, -1)), dim=1) if end else x
    with torch.no_grad():
        expected = hf(past_values=hf_input).prediction_outputs
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_end_padding_repeats_the_last_value_into_one_more_patch():
    model = PatchTST(tiny_patchtst())
    assert model.config.num_patches == 8 and PatchTSTConfig().num_patches == 42  # PatchTST/42 at L = 336
    series = torch.arange(64.0).view(1, 1, 64)
    patches = model.patch_embed.patchify(series)  # (b c n p)
    assert patches.shape == (1, 1, 8, 16)
    assert patches[0, 0, 3].tolist() == list(range(24, 40))
    assert patches[0, 0, -1].tolist() == list(range(56, 64)) + [63.0] * 8  # ReplicationPad1d((0, stride))


def test_revin_makes_patchtst_equivariant_to_scale_and_shift():
    torch.manual_seed(0)
    model = PatchTST(tiny_patchtst()).eval()
    x = torch.randn(4, 64, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x * 5.0 + 3.0), model(x) * 5.0 + 3.0, atol=1e-4, rtol=1e-4)
    normalised, mean, std = RevIN().normalise(x)
    torch.testing.assert_close(RevIN.denormalise(normalised, mean, std), x, atol=1e-5, rtol=1e-5)


def test_channels_are_forecast_independently():
    torch.manual_seed(0)
    model = PatchTST(tiny_patchtst()).eval()
    x = torch.randn(2, 64, 3)
    changed = x.clone()
    changed[:, :, 1] = torch.randn(2, 64)
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :, [0, 2]], b[:, :, [0, 2]])
    assert not torch.allclose(a[:, :, 1], b[:, :, 1])


def test_batchnorm_option_builds_the_block_norms():
    model = PatchTST(tiny_patchtst("batchnorm"))
    assert all(isinstance(b.norm1, TokenBatchNorm) and isinstance(b.norm2, TokenBatchNorm)
               for b in model.encoder.blocks)
    tokens = torch.randn(6, 8, 16) * 4 + 1
    norm = model.encoder.blocks[0].norm1
    reference = nn.BatchNorm1d(16)  # the reference's layout: BatchNorm1d over (b d n), transposed in and out
    for _ in range(2):  # training mode twice: same outputs and the same running statistics
        expected = reference(tokens.transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(norm(tokens), expected)
    torch.testing.assert_close(norm.running_var, reference.running_var)


def test_the_old_encoder_norm_key_is_read_with_a_deprecation_message():
    with pytest.warns(DeprecationWarning, match="encoder.norm: batchnorm"):
        config = tiny_patchtst(encoder_norm="batchnorm")
    assert config.encoder.norm == "batchnorm" and config.encoder_norm is None
    assert isinstance(PatchTST(config).encoder.blocks[0].norm2, TokenBatchNorm)
    with pytest.raises(ValueError, match="encoder_norm must be 'core' or 'batchnorm', found 'group'"):
        tiny_patchtst(encoder_norm="group")


def reference_series_decomp(x: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DLinear's series_decomp as in its repository (x: b L c): repeat the ends, AvgPool1d(kernel, stride=1)."""
    front = x[:, 0:1, :].repeat(1, (kernel - 1) // 2, 1)
    end = x[:, -1:, :].repeat(1, (kernel - 1) // 2, 1)
    padded = torch.cat([front, x, end], dim=1)
    trend = nn.AvgPool1d(kernel_size=kernel, stride=1, padding=0)(padded.permute(0, 2, 1)).permute(0, 2, 1)
    return x - trend, trend


def test_dlinear_matches_the_reference_decomposition_and_maps():
    torch.manual_seed(0)
    model = DLinear(DLinearConfig(lookback=48, horizon=12, kernel=25))
    nn.init.normal_(model.seasonal.weight)
    x = torch.randn(3, 48, 4)
    seasonal, trend = reference_series_decomp(x, 25)
    ours_seasonal, ours_trend = model.decompose(x.transpose(1, 2))
    torch.testing.assert_close(ours_trend, trend.transpose(1, 2))
    torch.testing.assert_close(ours_seasonal, seasonal.transpose(1, 2))
    expected = (model.seasonal(seasonal.transpose(1, 2)) + model.trend(trend.transpose(1, 2))).transpose(1, 2)
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="odd"):
        DLinearConfig(kernel=24)


def test_encoder_decoder_forecaster_uses_the_core_decoder():
    torch.manual_seed(0)
    enc = TransformerConfig(dim=16, depth=1, heads=2, position="sinusoidal")
    dec = TransformerConfig(dim=16, depth=1, heads=2, position="sinusoidal", causal=True)
    model = EncoderDecoderForecaster(EncoderDecoderConfig(lookback=32, horizon=8, channels=3, label_len=8,
                                                          encoder=enc, decoder=dec))
    x = torch.randn(2, 32, 3)
    y = model(x)
    assert y.shape == (2, 8, 3)
    F.mse_loss(y, torch.zeros_like(y)).backward()
    assert model.decoder.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0  # the forecast reads the memory
    with pytest.raises(ValueError, match=r"expected 3 channels \(config.channels\), found 4"):
        model(torch.randn(2, 32, 4))


def test_wrong_lookback_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected a lookback window \(batch, 64, channels\), found \(2, 60, 3\)"):
        PatchTST(tiny_patchtst())(torch.randn(2, 60, 3))


def test_rand_dropout_matches_dropout_in_distribution_and_is_built_by_the_config():
    encoder = TransformerConfig(dim=16, depth=1, heads=4, prenorm=False, dropout=0.3, dropout_mask="rand")
    model = PatchTST(tiny_patchtst(encoder=encoder))
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert sum(isinstance(m, RandDropout) for m in model.modules()) == 5  # embedding, attn proj, mlp ×2, head
    drop = RandDropout(0.3)
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = drop(x)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.005  # kept with probability 0.7 ...
    assert abs(y.mean().item() - 1.0) < 0.01  # ... and scaled by 1 / 0.7, as nn.Dropout does
    assert torch.equal(drop.eval()(x), x)
