"""Masking utilities and the masked-modelling wrapper: exact counts, index bookkeeping, loss on masked tokens only."""

import pytest
import torch

from polyformer.masking import (
    MaskingConfig,
    block_masking,
    gather_tokens,
    masked_mean,
    random_masking,
    replace_masked,
    restore_tokens,
    span_masking,
)
from polyformer.pretraining import MaskedDecoder, MaskedModelingConfig
from polyformer.transformer import TransformerConfig


@pytest.mark.parametrize("make", [
    lambda: random_masking(8, 16, 0.75),
    lambda: block_masking(8, (4, 4), 0.75, min_block=2),
    lambda: block_masking(8, (14, 14), 0.4, min_block=16),
    lambda: span_masking(8, 50, 0.5, span=5),
])
def test_every_row_masks_exactly_the_count_and_indices_partition_the_tokens(make):
    torch.manual_seed(0)
    mask = make()
    n = mask.num_tokens
    counts = mask.mask.sum(dim=1)
    assert (counts == counts[0]).all() and 0 < counts[0] < n
    keep, masked = mask.keep, mask.masked
    assert keep.shape[1] + masked.shape[1] == n
    union = torch.cat((keep, masked), dim=1).sort(dim=1).values
    assert torch.equal(union, torch.arange(n).expand_as(union))
    assert mask.mask.gather(1, masked).all() and not mask.mask.gather(1, keep).any()


def test_count_follows_mae_and_differs_between_samples():
    torch.manual_seed(0)
    mask = random_masking(64, 196, 0.75)
    assert mask.keep.shape[1] == int(196 * 0.25)  # MAE keeps int(n·(1 − ratio))
    assert len({tuple(row.tolist()) for row in mask.mask}) == 64
    # each token is masked about 75 % of the time: the shuffle is uniform
    frequency = random_masking(4000, 8, 0.5).mask.float().mean(dim=0)
    assert torch.allclose(frequency, torch.full_like(frequency, 0.5), atol=0.04)


def test_block_and_span_masks_are_contiguous_more_than_random_ones():
    torch.manual_seed(0)

    def neighbours_masked(mask, grid):  # fraction of masked tokens whose right neighbour is masked too
        m = mask.mask.view(-1, *grid)
        return ((m[..., :-1] & m[..., 1:]).sum() / m[..., :-1].sum()).item()

    random_grid = random_masking(256, 196, 0.4)
    block_grid = block_masking(256, (14, 14), 0.4, min_block=16)
    assert neighbours_masked(block_grid, (14, 14)) > neighbours_masked(random_grid, (14, 14)) + 0.25
    spans = span_masking(256, 100, 0.5, span=10)
    assert neighbours_masked(spans, (1, 100)) > neighbours_masked(random_masking(256, 100, 0.5), (1, 100)) + 0.25


def test_gather_restore_and_replace_round_trip():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 4)
    mask = random_masking(3, 10, 0.6)
    visible = gather_tokens(x, mask.keep)
    assert visible.shape == (3, 4, 4)
    fill = torch.full((4,), 7.0)
    restored = restore_tokens(visible, mask, fill)
    torch.testing.assert_close(restored[~mask.mask], x[~mask.mask])
    assert (restored[mask.mask] == 7.0).all()
    torch.testing.assert_close(replace_masked(x, mask, fill), restored)


def test_masked_mean_counts_masked_tokens_only():
    mask = random_masking(2, 4, 0.5)
    values = torch.where(mask.mask, torch.tensor(3.0), torch.tensor(100.0))
    assert masked_mean(values, mask).item() == 3.0


def test_gradients_reach_visible_tokens_and_the_mask_token():
    torch.manual_seed(0)
    decoder = MaskedDecoder(8, 5, 12, TransformerConfig(dim=16, depth=1, heads=2, position="learned"))
    mask = random_masking(2, 12, 0.75)
    visible = torch.randn(2, 3, 8, requires_grad=True)
    out = decoder(visible, mask)
    assert out.shape == (2, 12, 5)
    out.pow(2).sum().backward()
    assert visible.grad.abs().sum() > 0 and decoder.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratio": 0.0}, r"masking.ratio must be in \(0, 1\), found 0.0"),
    ({"ratio": 1.0}, r"masking.ratio must be in \(0, 1\), found 1.0"),
    ({"ratio": 1.5}, r"found 1.5"),
    ({"kind": "checkerboard"}, r"masking.kind must be 'random', 'block' or 'span', found 'checkerboard'"),
    ({"span": 0}, r"masking.span and masking.min_block must be at least 1, found 0"),
])
def test_bad_masking_configs_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**kwargs)


def test_masks_that_leave_nothing_visible_or_nothing_masked_are_refused():
    with pytest.raises(ValueError, match=r"mask ratio 0.95 of 16 tokens leaves no visible token; expected a ratio of "
                                         r"at most 0.9375"):
        random_masking(1, 16, 0.95)
    with pytest.raises(ValueError, match=r"mask ratio 1e-17 of 16 tokens masks no token"):
        random_masking(1, 16, 1e-17)
    with pytest.raises(ValueError, match=r"masking.kind='block' needs a \(height, width\) token grid, found 16 tokens"):
        MaskingConfig(kind="block").sample(2, 16)
    with pytest.raises(ValueError, match=r"span must be in \[1, 8\] for 8 tokens, found 9"):
        span_masking(1, 8, 0.5, span=9)
    with pytest.raises(ValueError, match=r"visible_only=true \(MAE\) needs a decoder"):
        MaskedModelingConfig(visible_only=True, decoder=None)
