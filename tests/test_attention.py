"""Core attention: parity with torch.nn, cache decoding, local/linear kernels, RoPE and ALiBi properties."""

import pytest
import torch
from torch import nn

from polyformer import MultiHeadAttention, TransformerConfig, TransformerDecoder, TransformerEncoder
from polyformer.attention import linear_attention, linear_feature_map, local_attention, math_attention
from polyformer.positions import RotaryEmbedding, alibi_slopes

TOL = dict(atol=1e-5, rtol=0)


def padding_mask(lengths, n):
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def copy_mha(ours: MultiHeadAttention, theirs: nn.MultiheadAttention):
    with torch.no_grad():
        if ours.cross:
            d = ours.q.weight.shape[0]
            ours.q.weight.copy_(theirs.in_proj_weight[:d]); ours.q.bias.copy_(theirs.in_proj_bias[:d])
            ours.kv.weight.copy_(theirs.in_proj_weight[d:]); ours.kv.bias.copy_(theirs.in_proj_bias[d:])
        else:
            ours.qkv.weight.copy_(theirs.in_proj_weight); ours.qkv.bias.copy_(theirs.in_proj_bias)
        ours.proj.weight.copy_(theirs.out_proj.weight); ours.proj.bias.copy_(theirs.out_proj.bias)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_multihead_attention(causal):
    torch.manual_seed(0)
    ours, theirs = MultiHeadAttention(32, 4, causal=causal).eval(), nn.MultiheadAttention(32, 4, batch_first=True).eval()
    copy_mha(ours, theirs)
    x = torch.randn(3, 10, 32)
    pad = padding_mask([10, 7, 3], 10)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(10) if causal else None
    expected, expected_w = theirs(x, x, x, key_padding_mask=pad, attn_mask=causal_mask, average_attn_weights=False)
    torch.testing.assert_close(ours(x, key_padding_mask=pad), expected, **TOL)
    out, weights = ours(x, key_padding_mask=pad, need_weights=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(weights, expected_w, **TOL)


def test_cross_attention_matches_torch():
    torch.manual_seed(0)
    ours, theirs = MultiHeadAttention(32, 4, cross=True).eval(), nn.MultiheadAttention(32, 4, batch_first=True).eval()
    copy_mha(ours, theirs)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    pad = padding_mask([9, 4], 9)
    expected, _ = theirs(x, mem, mem, key_padding_mask=pad)
    torch.testing.assert_close(ours(x, mem, key_padding_mask=pad), expected, **TOL)


def copy_block(ours, theirs, decoder=False):
    with torch.no_grad():
        copy_mha(ours.attn, theirs.self_attn)
        ours.norm1.load_state_dict(theirs.norm1.state_dict())
        ours.mlp.fc1.load_state_dict(theirs.linear1.state_dict())
        ours.mlp.fc2.load_state_dict(theirs.linear2.state_dict())
        if decoder:
            copy_mha(ours.cross_attn, theirs.multihead_attn)
            ours.norm_cross.load_state_dict(theirs.norm2.state_dict())
            ours.norm2.load_state_dict(theirs.norm3.state_dict())
        else:
            ours.norm2.load_state_dict(theirs.norm2.state_dict())


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(prenorm, activation):
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, depth=1, heads=4, mlp_ratio=2.0, activation=activation, prenorm=prenorm,
                            final_norm=False)
    ours = TransformerEncoder(cfg).eval()
    theirs = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=activation, batch_first=True,
                                        norm_first=prenorm).eval()
    copy_block(ours.blocks[0], theirs)
    x, pad = torch.randn(3, 12, 32), padding_mask([12, 8, 5], 12)
    with torch.no_grad():  # no_grad also exercises torch's fused "fast path" on its side
        torch.testing.assert_close(ours(x, key_padding_mask=pad)[~pad], theirs(x, src_key_padding_mask=pad)[~pad],
                                   **TOL)
    torch.testing.assert_close(ours(x, key_padding_mask=pad), theirs(x, src_key_padding_mask=pad), **TOL)


@pytest.mark.parametrize("prenorm", [True, False])
def test_decoder_layer_matches_torch(prenorm):
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, depth=1, heads=4, mlp_ratio=2.0, activation="relu", prenorm=prenorm,
                            final_norm=False, causal=True)
    ours = TransformerDecoder(cfg).eval()
    theirs = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=prenorm).eval()
    copy_block(ours.blocks[0], theirs, decoder=True)
    x, mem = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    tgt_pad, mem_pad = padding_mask([7, 6], 7), padding_mask([11, 5], 11)
    expected = theirs(x, mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(7), tgt_is_causal=True,
                      tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=mem_pad)
    got = ours(x, mem, key_padding_mask=tgt_pad, memory_padding_mask=mem_pad)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("kind,position,window", [
    ("full", "none", None), ("full", "rope", None), ("full", "alibi", None), ("full", "learned", None),
    ("full", "sinusoidal", 5), ("local", "rope", 4), ("linear", "none", None),
])
def test_kv_cache_decoding_equals_full_causal_forward(kind, position, window):
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, depth=3, heads=4, causal=True, attention=kind, window=window, position=position,
                            max_len=64)
    enc = TransformerEncoder(cfg).eval()
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        full = enc(x)
        cache = enc.new_cache()
        steps = [enc(x[:, :3], cache=cache)]  # a prompt, then one token at a time
        steps += [enc(x[:, i : i + 1], cache=cache) for i in range(3, 13)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


@pytest.mark.parametrize("causal,kind,position,window,prenorm", [
    (False, "full", "none", None, True), (True, "full", "rope", None, True), (True, "full", "alibi", 6, True),
    (False, "full", "learned", None, False), (True, "local", "rope", 4, True), (True, "linear", "none", None, True),
    (False, "linear", "sinusoidal", None, True),
])
@pytest.mark.parametrize("query_index", [slice(0, 1), slice(1, None, 3), slice(-1, None)])
def test_query_index_equals_full_forward_then_select(causal, kind, position, window, prenorm, query_index):
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, depth=3, heads=4, causal=causal, attention=kind, window=window,
                            position=position, prenorm=prenorm, max_len=64, qk_norm=True)
    enc = TransformerEncoder(cfg).eval()
    x = torch.randn(2, 12, 32, requires_grad=True)
    pad = padding_mask([12, 9], 12) if kind != "linear" or not causal else None
    full = enc(x, key_padding_mask=pad)[:, query_index]
    selected = enc(x, key_padding_mask=pad, query_index=query_index)
    torch.testing.assert_close(selected, full, **TOL)
    # the same gradient reaches every input token, through the keys and values of the last block
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    (grad_selected,) = torch.autograd.grad(selected.square().sum(), x)
    torch.testing.assert_close(grad_selected, grad_full, **TOL)


def test_query_index_with_kv_cache_and_cross_attention():
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, depth=2, heads=4, causal=True, position="rope")
    enc, dec = TransformerEncoder(cfg).eval(), TransformerDecoder(cfg).eval()
    x, memory = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        cache = enc.new_cache()
        enc(x[:, :6], cache=cache)
        last = enc(x[:, 6:], cache=cache, query_index=slice(-1, None))  # decoding: only the newest output
        torch.testing.assert_close(last, enc(x)[:, -1:], **TOL)
        torch.testing.assert_close(dec(x, memory, query_index=slice(2, 5)), dec(x, memory)[:, 2:5], **TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [False, True])
def test_local_attention_with_large_window_equals_full(causal, alibi):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 37, 8).unbind(0)
    pad = padding_mask([37, 30], 37)
    slopes = alibi_slopes(4) if alibi else None
    ref_mha = MultiHeadAttention(32, 4, causal=causal, position="alibi" if alibi else "none")
    full = ref_mha._softmax_attention(q, k, v, torch.arange(37), 0, False, pad, need_weights=False)[0]
    for window in (37, 64):
        local = local_attention(q, k, v, window=window, causal=causal, key_padding_mask=pad, slopes=slopes)
        torch.testing.assert_close(local, full, **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_small_window_equals_masked_full(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 50, 8).unbind(0)
    pos = torch.arange(50)
    offset = pos[:, None] - pos[None, :]
    allowed = (offset >= 0) & (offset < 7) if causal else offset.abs() < 7
    expected, _ = math_attention(q, k, v, allowed[None, None])
    torch.testing.assert_close(local_attention(q, k, v, window=7, causal=causal), expected, **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_equals_naive_quadratic_kernel(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 150, 8, dtype=torch.float64).unbind(0)
    pad = padding_mask([150, 120], 150)
    scores = linear_feature_map(q) @ linear_feature_map(k).transpose(-1, -2)  # (b h n m), the O(n²) form
    scores = scores.masked_fill(pad[:, None, None, :], 0.0)
    if causal:
        scores = scores.tril()
    expected = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)
    got, _ = linear_attention(q, k, v, causal=causal, key_padding_mask=pad, chunk=32)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(16), torch.randn(16)
    def score(i, j):
        qi = rope(q.view(1, 1, 1, 16), torch.tensor([i]))
        kj = rope(k.view(1, 1, 1, 16), torch.tensor([j]))
        return (qi * kj).sum()
    for offset in (0, 1, 5, -3, 40):
        reference = score(100 + offset, 100)
        for i in (0, 7, 333, 2048):
            if i + offset >= 0:
                torch.testing.assert_close(score(i + offset, i), reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 0), score(6, 0))  # and it does depend on the offset


def test_attn_bias_adds_to_scores_and_combines_with_masks():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2, causal=True).eval()
    x = torch.randn(3, 6, 16)
    bias = torch.randn(3, 2, 6, 6)
    with torch.no_grad():
        out, weights = attn(x, attn_bias=bias, need_weights=True)
        q, k, _ = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in attn.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-2, -1) / 8 ** 0.5 + bias
        expected = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        assert torch.allclose(weights, expected, atol=1e-6)
        assert torch.allclose(attn(x, attn_bias=bias), out, atol=1e-6)  # the SDPA path, same result
        # -inf in the bias excludes a key exactly as a padding mask does
        padding = torch.zeros(3, 6, dtype=torch.bool)
        padding[:, 4:] = True
        excluded = torch.zeros(3, 1, 1, 6).masked_fill(padding[:, None, None], float("-inf"))
        assert torch.allclose(MultiHeadAttention.forward(attn, x, attn_bias=excluded),
                              attn(x, key_padding_mask=padding), atol=1e-6)
    with pytest.raises(ValueError, match="linear attention forms no score matrix"):
        MultiHeadAttention(16, 2, kind="linear")(x, attn_bias=bias)


def test_separate_query_key_value_inputs_match_torch():
    """attend(query, key, value): torch's MHA given the three inputs (DETR's q = k = x + pos, v = x)."""
    torch.manual_seed(0)
    x, pos, memory, memory_pos = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 7, 16), \
        torch.randn(2, 7, 16)
    ours, theirs = MultiHeadAttention(16, 4).eval(), nn.MultiheadAttention(16, 4, batch_first=True).eval()
    copy_mha(ours, theirs)
    expected = theirs(x + pos, x + pos, x, need_weights=False)[0]
    assert torch.allclose(ours.attend(x + pos, x + pos, x), expected, **TOL)
    assert torch.allclose(ours.attend(x, x, x), ours(x), **TOL)  # one input: forward()
    cross, theirs = MultiHeadAttention(16, 4, cross=True).eval(), nn.MultiheadAttention(16, 4, batch_first=True).eval()
    copy_mha(cross, theirs)
    expected = theirs(x + pos, memory + memory_pos, memory, need_weights=False)[0]
    assert torch.allclose(cross.attend(x + pos, memory + memory_pos, memory), expected, **TOL)
    with pytest.raises(ValueError, match="expected as many, found 5 and 7"):
        ours.attend(x, memory, memory)
