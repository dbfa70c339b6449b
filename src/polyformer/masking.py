"""Token masking for masked pre-training: which tokens an encoder sees and which it must predict.

Three ways to choose the masked tokens, each giving the same `Mask`:
- `random_masking`: a uniformly random subset (MAE, He et al. 2022, https://arxiv.org/abs/2111.06377; PatchTST §3.3);
- `block_masking`: rectangles on a 2-D grid until the ratio is reached (BEiT, Bao et al. 2022,
  https://arxiv.org/abs/2106.08254, Algorithm 1);
- `span_masking`: runs of `span` consecutive tokens of a sequence (wav2vec 2.0, Baevski et al. 2020; BEST-RQ,
  Chiu et al. 2022, https://arxiv.org/abs/2202.01855).

Every sample of a batch masks the same number of tokens, so an encoder can take the visible ones as one dense
(b k d) tensor (`gather_tokens`, MAE-style, no mask tokens in the encoder) or see all n with a learned token in place
of the masked ones (`replace_masked`, BERT-style); `restore_tokens` puts visible tokens back among mask tokens.

Shapes: b batch, n tokens, k visible, m masked (k + m = n), d width, (gh gw) a token grid with gh·gw = n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MaskingKind = Literal["random", "block", "span"]


@dataclass
class Mask:
    """Which tokens of each sample are masked: `mask` (b n) bool, True where masked, the same count m per row."""

    mask: Tensor  # (b n) bool

    @property
    def keep(self) -> Tensor:
        """(b k) indices of the visible tokens, ascending."""
        return (~self.mask).nonzero()[:, 1].view(self.mask.shape[0], -1)

    @property
    def masked(self) -> Tensor:
        """(b m) indices of the masked tokens, ascending."""
        return self.mask.nonzero()[:, 1].view(self.mask.shape[0], -1)

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]


def count_masked(num_tokens: int, ratio: float) -> int:
    """m for n tokens at a ratio: n − int(n·(1 − ratio)) (MAE's count), at least one masked and one visible token."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), found {ratio}")
    visible = int(num_tokens * (1 - ratio))
    if visible < 1:
        raise ValueError(f"mask ratio {ratio} of {num_tokens} tokens leaves no visible token; expected a ratio of at "
                         f"most {1 - 1 / num_tokens:.4f} for {num_tokens} tokens")
    if visible == num_tokens:
        raise ValueError(f"mask ratio {ratio} of {num_tokens} tokens masks no token; expected a larger ratio")
    return num_tokens - visible


def exactly(candidates: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """(b n) bool with exactly `count` True per row: candidates first (a random subset if too many), then random
    others if too few."""
    priority = candidates.float() * 2 + torch.rand(candidates.shape, generator=generator, device=candidates.device)
    chosen = priority.topk(count, dim=1).indices
    return torch.zeros_like(candidates).scatter_(1, chosen, True)


def random_masking(batch: int, num_tokens: int, ratio: float, *, device: torch.device | str | None = None,
                   generator: torch.Generator | None = None) -> Mask:
    """A uniformly random `ratio` of the n tokens of each sample (MAE's per-sample shuffle)."""
    count = count_masked(num_tokens, ratio)
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    masked = noise.argsort(dim=1)[:, num_tokens - count:]
    return Mask(torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter_(1, masked, True))


def block_masking(batch: int, grid: tuple[int, int], ratio: float, *, min_block: int = 4,
                  aspect: tuple[float, float] = (0.3, 1 / 0.3), device: torch.device | str | None = None,
                  generator: torch.Generator | None = None) -> Mask:
    """Rectangles of at least `min_block` tokens and a log-uniform aspect ratio on a (gh gw) grid, placed at random
    until the ratio is covered (BEiT's block-wise masking), then trimmed or topped up to exactly m tokens."""
    gh, gw = grid
    num_tokens = gh * gw
    count = count_masked(num_tokens, ratio)
    if min_block < 1:
        raise ValueError(f"min_block must be at least 1, found {min_block}")
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    candidates = torch.zeros(batch, gh, gw, dtype=torch.bool)
    for sample in candidates:
        for _ in range(10 * num_tokens):  # BEiT bounds its attempts too; `exactly` tops up what is left
            covered = int(sample.sum())
            if covered >= count:
                break
            area = uniform(min(min_block, count - covered), count - covered)
            shape = math.exp(uniform(*log_aspect))
            h, w = round(math.sqrt(area * shape)), round(math.sqrt(area / shape))
            if not (1 <= h <= gh and 1 <= w <= gw):
                continue
            top = int(torch.randint(0, gh - h + 1, (), generator=generator))
            left = int(torch.randint(0, gw - w + 1, (), generator=generator))
            sample[top:top + h, left:left + w] = True
    return Mask(exactly(candidates.flatten(1), count, generator).to(device))


def span_masking(batch: int, num_tokens: int, ratio: float, *, span: int = 10,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Mask:
    """Runs of `span` consecutive tokens at random starts, ⌈m / span⌉ of them per sample (overlaps allowed, as in
    wav2vec 2.0), then trimmed or topped up to exactly m tokens."""
    count = count_masked(num_tokens, ratio)
    if not 1 <= span <= num_tokens:
        raise ValueError(f"span must be in [1, {num_tokens}] for {num_tokens} tokens, found {span}")
    spans = math.ceil(count / span)
    starts = torch.randint(0, num_tokens - span + 1, (batch, spans), generator=generator)
    covered = (starts[:, :, None] + torch.arange(span)).flatten(1)  # (b spans·span)
    candidates = torch.zeros(batch, num_tokens, dtype=torch.bool).scatter_(1, covered, True)
    return Mask(exactly(candidates, count, generator).to(device))


@dataclass
class MaskingConfig:
    """How masked pre-training hides tokens."""

    ratio: float = 0.75  # fraction of the tokens masked (MAE 0.75, PatchTST 0.4, BEiT 0.4)
    kind: MaskingKind = "random"  # random | block (2-D grids) | span (sequences)
    span: int = 10  # span masking: tokens per span
    min_block: int = 4  # block masking: fewest tokens in one rectangle

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"masking.ratio must be in (0, 1), found {self.ratio}")
        if self.kind not in ("random", "block", "span"):
            raise ValueError(f"masking.kind must be 'random', 'block' or 'span', found {self.kind!r}")
        if self.span < 1 or self.min_block < 1:
            raise ValueError(f"masking.span and masking.min_block must be at least 1, found {self.span} and "
                             f"{self.min_block}")

    def sample(self, batch: int, shape: int | tuple[int, int], device: torch.device | str | None = None) -> Mask:
        """A mask for `batch` samples of `shape` tokens: n for a sequence, (gh gw) for a grid (needed by 'block')."""
        num_tokens = shape if isinstance(shape, int) else shape[0] * shape[1]
        if self.kind == "block":
            if isinstance(shape, int):
                raise ValueError(f"masking.kind='block' needs a (height, width) token grid, found {shape} tokens")
            return block_masking(batch, shape, self.ratio, min_block=self.min_block, device=device)
        if self.kind == "span":
            return span_masking(batch, num_tokens, self.ratio, span=self.span, device=device)
        return random_masking(batch, num_tokens, self.ratio, device=device)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (b n d), index (b k) → (b k d): the tokens at `index` of each sample."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def restore_tokens(visible: Tensor, mask: Mask, fill: Tensor) -> Tensor:
    """visible (b k d) at mask.keep, fill (d,) or (1 1 d) → (b n d): visible tokens back in place, `fill` (a mask
    token) at every masked position. Gradients reach both."""
    b, _, d = visible.shape
    full = fill.reshape(1, 1, d).to(visible.dtype).expand(b, mask.num_tokens, d)
    return full.scatter(1, mask.keep[:, :, None].expand(-1, -1, d), visible)


def replace_masked(x: Tensor, mask: Mask, token: Tensor) -> Tensor:
    """x (b n d) with `token` (d,) at every masked position (BERT-style input)."""
    return torch.where(mask.mask[:, :, None], token.reshape(1, 1, -1).to(x.dtype), x)


def masked_mean(values: Tensor, mask: Mask, padding: Tensor | None = None) -> Tensor:
    """The mean of per-token values (b n) over the masked tokens only, leaving out padding (b n) where given."""
    counted = mask.mask if padding is None else mask.mask & ~padding
    weights = counted.to(values.dtype)
    return (values * weights).sum() / weights.sum()
