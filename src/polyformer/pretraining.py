"""Masked pre-training on the core: hide tokens, encode, predict what was hidden; the loss counts masked tokens only.

Two styles, one switch (`MaskedModelingConfig.visible_only`):
- MAE (He et al. 2022, https://arxiv.org/abs/2111.06377): the encoder sees only the visible tokens, gathered by
  index; a light decoder of core blocks puts them back in place among learned mask tokens and predicts every token.
- BERT-style (Devlin et al. 2019; PatchTST's self-supervised recipe, Nie et al. 2023 §3.3): masked tokens are replaced
  by a learned mask token before the encoder, which sees all n; a decoder (or, with `decoder: null`, one linear
  layer, as in PatchTST) predicts every token.

A domain derives from `MaskedPretrainingTask`, keeps the encoder it will later fine-tune as `self.model` (the same
class as its supervised task's model, so `init_from` finds the same names) and supplies its tokeniser and target:
`tokens(batch)` and `encode(tokens, keep, padding)`. The decoder, the mask token and the loss are here: the mean squared
error of real-valued targets (pixels, patches) or the cross-entropy of discrete ones (`loss: cross_entropy`: bytes,
symbols — BERT's masked-token prediction), over the masked tokens that are not padding.

Shapes: b batch, n tokens, k visible, d encoder width, t target values per token (classes for cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyformer.masking import Mask, MaskingConfig, gather_tokens, masked_mean, replace_masked, restore_tokens
from polyformer.training import OptimizerConfig, PolyformerTask
from polyformer.transformer import TransformerConfig, TransformerEncoder


def _light_decoder() -> TransformerConfig:
    # MAE's decoder is narrow and shallow next to its encoder (512 wide, 8 blocks for ViT-L); positions are the
    # decoder's own, since it sees every token in order
    return TransformerConfig(dim=64, depth=2, heads=4, mlp_ratio=4.0, position="learned")


@dataclass
class MaskedModelingConfig:
    """What is masked and what predicts it."""

    masking: MaskingConfig = field(default_factory=MaskingConfig)
    visible_only: bool = True  # MAE: the encoder sees visible tokens only; False: BERT-style mask tokens in place
    decoder: TransformerConfig | None = field(default_factory=_light_decoder)  # None: a linear head (BERT-style)
    loss: Literal["mse", "cross_entropy"] = "mse"  # cross_entropy: targets are class indices (b n)

    def __post_init__(self) -> None:
        if self.visible_only and self.decoder is None:
            raise ValueError("visible_only=true (MAE) needs a decoder to see the masked positions; found decoder=None "
                             "(set a decoder, or visible_only=false for a linear head)")
        if self.decoder is not None and self.decoder.causal:
            raise ValueError("the masked-modelling decoder reads every token: expected decoder.causal=false")
        if self.loss not in ("mse", "cross_entropy"):
            raise ValueError(f"pretraining.loss must be 'mse' or 'cross_entropy', found {self.loss!r}")


class MaskedDecoder(nn.Module):
    """Encoder outputs → per-token predictions (b n t): of the visible tokens (b k d) among learned mask tokens
    (MAE), or of all tokens (b n d); through core blocks, or through one linear layer when config is None."""

    def __init__(self, encoder_dim: int, target_dim: int, num_tokens: int, config: TransformerConfig | None):
        super().__init__()
        width = config.dim if config is not None else encoder_dim
        self.embed = nn.Linear(encoder_dim, width) if config is not None else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(width)) if config is not None else None
        self.stack = TransformerEncoder(replace(config, max_len=num_tokens)) if config is not None else None
        self.head = nn.Linear(width, target_dim)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded: Tensor, mask: Mask) -> Tensor:
        x = self.embed(encoded)
        if x.shape[1] != mask.num_tokens:  # the encoder saw the visible tokens only
            if self.mask_token is None:
                raise ValueError(f"a linear head predicts the tokens it is given: found {x.shape[1]} encoder outputs "
                                 f"for {mask.num_tokens} tokens (use a decoder for visible-only encoding)")
            x = restore_tokens(x, mask, self.mask_token)
        if self.stack is not None:
            x = self.stack(x)
        return self.head(x)


class MaskedPretrainingTask(PolyformerTask):
    """Base of masked pre-training: a domain sets `self.model` and calls `build_decoder`, then implements
    `tokens(batch)`, `encode(tokens, keep)` and, for 2-D block masking, `token_grid`."""

    def __init__(self, pretraining: MaskedModelingConfig | None = None, optimizer: OptimizerConfig | None = None):
        super().__init__(optimizer)
        self.pretraining = pretraining if pretraining is not None else MaskedModelingConfig()

    def build_decoder(self, encoder_dim: int, target_dim: int, num_tokens: int) -> None:
        """The decoder, and for BERT-style input the encoder-side mask token (b n d)."""
        c = self.pretraining
        self.decoder = MaskedDecoder(encoder_dim, target_dim, num_tokens, c.decoder)
        self.mask_token = None if c.visible_only else nn.Parameter(torch.zeros(encoder_dim).normal_(std=0.02))

    # ---- what a domain implements -------------------------------------------------------------------------------
    def tokens(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(embedded tokens (b n d) before positions, targets (b n t), or class indices (b n) for cross-entropy)."""
        raise NotImplementedError(f"{type(self).__name__} must implement tokens(batch)")

    def encode(self, tokens: Tensor, keep: Tensor | None, padding: Tensor | None) -> Tensor:
        """Encoder outputs for tokens (b k d) at positions keep (b k), or for all n tokens in order (keep=None);
        padding (b n), True at padding, is what `padding(batch)` returned."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode(tokens, keep, padding)")

    def padding(self, batch: Any) -> Tensor | None:
        """(b n) True where a batch of sequences of unequal lengths is padded; None when every token is real."""
        return None

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """The (gh gw) grid of the tokens, for block masking; None for sequences."""
        return None

    # ---- the method -----------------------------------------------------------------------------------------------
    def predict_masked(self, batch: Any) -> tuple[Tensor, Tensor, Mask]:
        """(predictions (b n t), targets (b n t) or (b n), mask) of one batch."""
        tokens, targets = self.tokens(batch)
        padding = self.padding(batch)
        b, n, _ = tokens.shape
        mask = self.pretraining.masking.sample(b, self.token_grid or n, device=tokens.device)
        if padding is not None and self.pretraining.visible_only:
            raise ValueError("padded sequences need mask tokens in place: expected pretraining.visible_only=false")
        if self.pretraining.visible_only:
            keep = mask.keep
            encoded = self.encode(gather_tokens(tokens, keep), keep, None)  # (b k d)
        else:
            encoded = self.encode(replace_masked(tokens, mask, self.mask_token), None, padding)  # (b n d)
        return self.decoder(encoded, mask), targets, mask

    def step(self, batch: Any, stage: str) -> Tensor:
        predictions, targets, mask = self.predict_masked(batch)
        padding = self.padding(batch)  # masked padding is not counted
        if self.pretraining.loss == "cross_entropy":
            per_token = F.cross_entropy(predictions.float().transpose(1, 2), targets, reduction="none")  # (b n)
            accuracy = masked_mean((predictions.argmax(-1) == targets).float(), mask, padding)
            self.log(f"{stage}/masked_acc", accuracy, on_epoch=True, sync_dist=True, batch_size=targets.shape[0])
            return masked_mean(per_token, mask, padding)
        return masked_mean((predictions.float() - targets.float()).pow(2).mean(dim=-1), mask, padding)
