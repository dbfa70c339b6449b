"""PatchTST's self-supervised pre-training (Nie et al. 2023, https://arxiv.org/abs/2211.14730, §3.3) on the core's
masked modelling.

Each channel's lookback window, normalised by RevIN, is cut into non-overlapping patches (overlapping ones would
show the encoder parts of the masked patches); a random 40 % of every series' patches is replaced by a learned mask
token, the encoder — the same `PatchTST` the forecaster fine-tunes, without its head (horizon 0) — sees every patch
at its position, and one linear layer reconstructs the masked patches (MSE on those only). Channels are independent
series sharing all weights, so a model pre-trained on one table fine-tunes on another with any channel count.

Departure from the reference code: a learned mask token after the patch projection, where the reference zeroes the
masked patches before it (the projection of zeros is a fixed vector; the learned token generalises it).

Shapes: b batch, L lookback, c channels, n patches, p patch length, d width.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from polyformer.domains.timeseries.model import PatchTST, PatchTSTConfig
from polyformer.masking import MaskingConfig
from polyformer.pretraining import MaskedModelingConfig, MaskedPretrainingTask
from polyformer.training import OptimizerConfig


def patchtst_pretraining() -> MaskedModelingConfig:
    """The paper's recipe: 40 % of the patches masked at random, mask tokens in place, a linear reconstruction."""
    return MaskedModelingConfig(masking=MaskingConfig(ratio=0.4), visible_only=False, decoder=None)


class PatchTSTPretrainTask(MaskedPretrainingTask):
    """A PatchTST encoder (model.horizon = 0, patch_len = stride) pre-trained by masked patch reconstruction.
    Batches are the forecasting data's (x (b L c), y): y is unused."""

    def __init__(self, model: PatchTSTConfig | None = None, pretraining: MaskedModelingConfig | None = None,
                 optimizer: OptimizerConfig | None = None):
        super().__init__(pretraining if pretraining is not None else patchtst_pretraining(), optimizer)
        self.model_config = model if model is not None else PatchTSTConfig(horizon=0, stride=16, padding="none")
        config = self.model_config
        if config.horizon != 0:
            raise ValueError(f"pre-training trains the encoder alone: expected model.horizon=0 (no forecasting "
                             f"head), found {config.horizon}")
        if config.stride != config.patch_len:
            raise ValueError(f"masked patches must not overlap: expected model.stride == model.patch_len, found "
                             f"stride={config.stride}, patch_len={config.patch_len}")
        if self.pretraining.visible_only:
            raise ValueError("PatchTST's encoder adds positions to all patches in order: expected "
                             "pretraining.visible_only=false (mask tokens in place)")
        self.model = PatchTST(config)
        self.build_decoder(config.encoder.dim, config.patch_len, config.num_patches)

    def tokens(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, _ = batch
        patches, _, _ = self.model.patches(x)  # (b c n p)
        patches = rearrange(patches, "b c n p -> (b c) n p")  # every channel a series of its own
        return self.model.patch_embed.proj(patches), patches

    def encode(self, tokens: Tensor, keep: Tensor | None, padding: Tensor | None) -> Tensor:
        return self.model.encode(tokens)

    def batch_size(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].shape[0]
