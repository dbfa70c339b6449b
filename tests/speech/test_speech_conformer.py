"""The Conformer stack against torchaudio's, the recognizer's shapes and lengths, and export."""

from __future__ import annotations

import pytest
import torch
import torchaudio

from polyformer.domains.speech.conformer import Conformer, ConformerConfig
from polyformer.domains.speech.frontend import ConvSubsampling, padding_mask
from polyformer.domains.speech.model import SpeechModelConfig, SpeechRecognizer
from polyformer.transformer import TransformerConfig


@pytest.mark.parametrize("use_group_norm", [False, True])
def test_from_torchaudio_matches_reference(use_group_norm):
    torch.manual_seed(0)
    reference = torchaudio.models.Conformer(input_dim=64, num_heads=4, ffn_dim=128, num_layers=3,
                                            depthwise_conv_kernel_size=7, dropout=0.1,
                                            use_group_norm=use_group_norm)
    for module in reference.modules():  # non-trivial normalisation statistics and affine parameters
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    reference.eval()
    ours = Conformer.from_torchaudio(reference).eval()
    assert ours.config.position == "none" and ours.config.depth == 3 and ours.config.kernel_size == 7
    x = torch.randn(3, 40, 64)
    lengths = torch.tensor([40, 31, 17])
    with torch.no_grad():
        expected, _ = reference(x, lengths)
        found = ours(x, key_padding_mask=padding_mask(lengths, 40))
    valid = ~padding_mask(lengths, 40)
    assert (expected - found)[valid].abs().max() <= 1e-4


def test_masked_convolution_ignores_padding():
    torch.manual_seed(0)
    model = Conformer(ConformerConfig(dim=32, depth=2, heads=4, kernel_size=5, dropout=0.0, attn_dropout=0.0)).eval()
    x = torch.randn(2, 20, 32)
    lengths = torch.tensor([20, 12])
    noisy = x.clone()
    noisy[1, 12:] = 100 * torch.randn(8, 32)  # garbage in the padding must not change real frames
    with torch.no_grad():
        a = model(x, key_padding_mask=padding_mask(lengths, 20))
        b = model(noisy, key_padding_mask=padding_mask(lengths, 20))
    torch.testing.assert_close(a[1, :12], b[1, :12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[0], b[0])


def test_subsampling_lengths_match_the_convolutions():
    sub = ConvSubsampling(80, 16, 4)
    for frames in (7, 8, 9, 50, 101):
        out, lengths = sub(torch.randn(1, frames, 80), torch.tensor([frames]))
        assert out.shape == (1, int(lengths), 16), (frames, out.shape, lengths)


@pytest.mark.parametrize("encoder", ["conformer", "transformer"])
def test_recognizer_shapes_and_padding_independence(encoder):
    torch.manual_seed(0)
    config = SpeechModelConfig(
        subsampling_channels=8, encoder=encoder, specaugment=None, head_dropout=0.0,
        conformer=ConformerConfig(dim=32, depth=1, heads=2, kernel_size=5, dropout=0.0, attn_dropout=0.0),
        transformer=TransformerConfig(dim=32, depth=1, heads=2, position="rope"),
    )
    model = SpeechRecognizer(config, num_classes=29).eval()
    waves = torch.randn(2, 16000) * 0.1
    lengths = torch.tensor([16000, 9000])
    with torch.no_grad():
        log_probs, frames = model(waves, lengths)
        alone, alone_frames = model(waves[1:, :9000], lengths[1:])
    assert log_probs.shape == (2, int(frames.max()), 29)
    assert frames.tolist() == [24, 13]  # 16000 samples → 101 frames of 10 ms → 24 frames of 40 ms
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, log_probs.shape[1]))
    # the same utterance alone or padded in a batch gives the same output on its real frames
    torch.testing.assert_close(log_probs[1, :13], alone[0, :13], atol=2e-4, rtol=1e-4)


def test_recognizer_exports_with_dynamic_lengths():
    torch.manual_seed(0)
    config = SpeechModelConfig(subsampling_channels=4, specaugment=None,
                               conformer=ConformerConfig(dim=16, depth=1, heads=2, kernel_size=3))
    model = SpeechRecognizer(config, num_classes=29).eval()
    waves, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    # Dim.AUTO: the sample axis stays symbolic (a length-dependent .item() or Python branch would specialise it)
    program = torch.export.export(model, (waves, lengths), dynamic_shapes=({1: torch.export.Dim.AUTO}, None))
    longer, longer_lengths = torch.randn(2, 12000), torch.tensor([12000, 7000])
    expected = model(longer, longer_lengths)
    found = program.module()(longer, longer_lengths)
    torch.testing.assert_close(found[0], expected[0])
    assert found[1].tolist() == expected[1].tolist()
