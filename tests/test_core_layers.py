"""Core positions, blocks and training base: formulas, options and the optimiser's parameter groups."""

import math

import pytest
import torch
from torch import nn

from polyformer import (
    DropPath,
    FeedForward,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEmbedding,
    TransformerConfig,
    TransformerEncoder,
    alibi_slopes,
    resample_2d,
)
from polyformer.toy import SortingTask
from polyformer.training import OptimizerConfig


def test_sinusoidal_table_follows_vaswani_formula():
    x = torch.zeros(1, 50, 16)
    table = SinusoidalPositionalEmbedding(16, max_len=8)(x)[0]  # grows past its cached length
    for pos, i in [(0, 0), (3, 2), (49, 7)]:
        angle = pos / 10000 ** (2 * i / 16)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_learned_positions_interpolate_to_other_lengths():
    torch.manual_seed(0)
    pos = LearnedPositionalEmbedding(8, max_len=10)
    assert torch.equal(pos(torch.zeros(1, 7, 8))[0], pos.weight[:7])  # within the table: its own rows
    assert torch.equal(pos(torch.zeros(1, 3, 8), offset=4)[0], pos.weight[4:7])
    with torch.no_grad():
        pos.weight.copy_(torch.linspace(0, 9, 10)[:, None].expand(10, 8))
    stretched = pos(torch.zeros(1, 20, 8))[0, :, 0]
    assert stretched.diff().ge(0).all() and stretched[0] < 0.3 and stretched[-1] > 8.7  # monotone ramp kept


def test_resample_2d_keeps_identity_and_matches_timm():
    timm_pos = pytest.importorskip("timm.layers").resample_abs_pos_embed
    torch.manual_seed(0)
    table = torch.randn(4 * 6, 8)
    assert torch.equal(resample_2d(table, (4, 6), (4, 6)), table)
    ours = resample_2d(table, (4, 6), (7, 5))
    theirs = timm_pos(table[None], new_size=(7, 5), old_size=(4, 6), num_prefix_tokens=0)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected 3\\*3=9"):
        resample_2d(table, (3, 3), (4, 4))


def test_alibi_slopes_are_the_papers():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(6).shape == (6,) and alibi_slopes(6).gt(0).all()


@pytest.mark.parametrize("options", [
    dict(activation="swiglu", norm="rmsnorm"),
    dict(prenorm=False, activation="relu"),
    dict(layer_scale=1e-4, drop_path=0.2, qk_norm=True),
    dict(attention="local", window=4, position="rope"),
    dict(attention="linear", position="sinusoidal"),
    dict(position="alibi", causal=True, window=6),
    dict(prenorm=False, norm="batchnorm", dropout=0.1, dropout_mask="rand", ffn_hidden_dropout=False),
])
def test_encoder_options_train(options):
    torch.manual_seed(0)
    enc = TransformerEncoder(TransformerConfig(dim=32, depth=2, heads=4, **options))
    x = torch.randn(2, 11, 32, requires_grad=True)
    pad = torch.arange(11)[None] >= torch.tensor([[11], [6]])
    out = enc(x, key_padding_mask=pad)
    assert out.shape == (2, 11, 32) and torch.isfinite(out).all()
    out[~pad].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters() if p.requires_grad)


def test_padding_does_not_leak_into_real_tokens():
    torch.manual_seed(0)
    enc = TransformerEncoder(TransformerConfig(dim=32, depth=2, heads=4)).eval()
    x = torch.randn(1, 9, 32)
    pad = torch.arange(9)[None] >= 6
    noisy = x.clone()
    noisy[:, 6:] = torch.randn(1, 3, 32) * 100
    torch.testing.assert_close(enc(x, key_padding_mask=pad)[:, :6], enc(noisy, key_padding_mask=pad)[:, :6])
    torch.testing.assert_close(enc(x, key_padding_mask=pad)[:, :6], enc(x[:, :6]), atol=1e-5, rtol=0)


def test_swiglu_and_drop_path():
    ff = FeedForward(8, 16, "swiglu")
    assert ff.fc1.out_features == 32 and ff(torch.randn(3, 8)).shape == (3, 8)
    drop = DropPath(0.5).train()
    x = torch.ones(4000, 3)
    y = drop(x)
    kept = y[:, 0] != 0
    assert 0.4 < kept.float().mean() < 0.6 and torch.allclose(y[kept], torch.full_like(y[kept], 2.0))
    assert torch.equal(drop.eval()(x), x)


def test_norm_and_dropout_kinds_are_chosen_by_the_config():
    """The config's factories build every block's norms and dropouts: no domain swaps modules after construction."""
    from polyformer.layers import RandDropout, TokenBatchNorm

    block = TransformerEncoder(TransformerConfig(dim=16, depth=1, heads=2, norm="batchnorm", dropout=0.1,
                                                 dropout_mask="rand", ffn_hidden_dropout=False)).blocks[0]
    assert isinstance(block.norm1, TokenBatchNorm) and isinstance(block.norm2, TokenBatchNorm)
    assert isinstance(block.mlp.drop1, nn.Identity)  # GPT-2's feed-forward: its output is dropped, not its hidden
    assert isinstance(block.mlp.drop2, RandDropout) and isinstance(block.attn.proj_drop, RandDropout)
    plain = TransformerEncoder(TransformerConfig(dim=16, depth=1, heads=2, dropout=0.1)).blocks[0]
    assert type(plain.mlp.drop1) is nn.Dropout and type(plain.attn.proj_drop) is nn.Dropout
    assert isinstance(plain.norm1, nn.LayerNorm)


def test_bad_transformer_config_names_the_field():
    with pytest.raises(ValueError, match="dim=30 must be divisible by heads=4"):
        TransformerConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="attention='local' needs window"):
        TransformerConfig(attention="local")
    with pytest.raises(ValueError, match="attention must be"):
        TransformerConfig(attention="fancy")
    with pytest.raises(ValueError, match="position='rope'"):
        TransformerConfig(attention="linear", position="rope")
    with pytest.raises(ValueError, match="dropout must be in"):
        TransformerConfig(dropout=1.5)
    with pytest.raises(ValueError, match="norm must be 'layernorm', 'rmsnorm' or 'batchnorm', found 'groupnorm'"):
        TransformerConfig(norm="groupnorm")
    with pytest.raises(ValueError, match="dropout_mask must be 'bernoulli' or 'rand', found 'gauss'"):
        TransformerConfig(dropout_mask="gauss")


def test_weight_decay_skips_norms_biases_and_positions():
    task = SortingTask(encoder=TransformerConfig(dim=32, depth=1, heads=4, position="learned", max_len=16))
    decay, no_decay = task.parameter_groups()
    names = {id(p): n for n, p in task.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "model.encoder.pos_embed.weight" not in decayed
    assert not any(n.endswith(".bias") or ".norm" in n for n in decayed)
    assert "model.encoder.blocks.0.attn.qkv.weight" in decayed and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.parameters()))


def test_warmup_then_cosine_schedule():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    factors = [cfg.lr_factor(step, total_steps=110) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    constant = OptimizerConfig(warmup_steps=5, schedule="constant")
    assert [constant.lr_factor(s, 100) for s in (4, 50, 99)] == [1.0, 1.0, 1.0]


def test_sorting_task_learns(tmp_path):
    """A seeded 2-layer encoder sorts 6 symbols after a few hundred steps (the core demo in miniature)."""
    import lightning as L

    from polyformer.toy import SortingDataModule

    L.seed_everything(0, verbose=False)
    data = SortingDataModule(length=6, vocab=5, train_size=2048, val_size=256, test_size=256, batch_size=64)
    task = SortingTask(vocab=5, encoder=TransformerConfig(dim=48, depth=2, heads=4, mlp_ratio=2.0,
                                                          position="learned", max_len=16),
                       optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=20))
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, data)
    result = trainer.test(task, data, verbose=False)[0]
    assert result["test/token_acc"] > 0.95, result
