"""MAE pre-training of the ViT (He et al. 2022, https://arxiv.org/abs/2111.06377) on the core's masked modelling.

A random 75 % of the patches is hidden; the encoder — the same `VisionTransformer` the classifier fine-tunes, under
the same names — sees the visible patches with their positions and the prefix tokens; the core's light decoder
predicts the pixels of every patch, normalised per patch (`norm_pix_loss`, MAE's default), and the loss counts the
masked patches only. Labels in the batch, if any, are unused, so any image data module serves (digits, ImageFolder).

Departures from the paper: the decoder's positions are learned, not fixed 2-D sin-cos; the encoder's output goes to
the decoder through its own final norm only when the ViT has one (avg-pool ViTs put theirs after pooling).

Shapes: b batch, c channels, (gh p) (gw q) image of gh·gw patches, n patches, k visible, d width.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from einops import rearrange
from torch import Tensor

from polyformer.domains.vision.model import ViTConfig, VisionTransformer
from polyformer.masking import gather_tokens
from polyformer.pretraining import MaskedModelingConfig, MaskedPretrainingTask
from polyformer.training import OptimizerConfig


class MAEPretrainTask(MaskedPretrainingTask):
    """A ViT encoder (model.num_classes = 0) pre-trained by masked autoencoding of its patches."""

    renamed_hparams = {"vit": "model"}

    def __init__(self, model: ViTConfig | None = None, norm_pix_loss: bool = True,
                 pretraining: MaskedModelingConfig | None = None, optimizer: OptimizerConfig | None = None,
                 vit: ViTConfig | None = None):
        """vit: the old name of `model` (releases up to 0.1.0), read with a deprecation message."""
        super().__init__(pretraining, optimizer)
        self.model_config = self.model_argument(model, partial(ViTConfig, num_classes=0), vit=vit)
        if self.model_config.num_classes != 0:
            raise ValueError(f"MAE pre-trains the encoder alone: expected model.num_classes=0, found "
                             f"{self.model_config.num_classes}")
        if not self.pretraining.visible_only:
            raise ValueError("MAE encodes the visible patches only: expected pretraining.visible_only=true")
        self.norm_pix_loss = norm_pix_loss
        self.model = VisionTransformer(self.model_config)
        c = self.model_config
        gh, gw = c.grid
        self.build_decoder(c.dim, c.patch_size**2 * c.in_chans, gh * gw)

    @property
    def token_grid(self) -> tuple[int, int]:
        return tuple(self.model.grid)

    def tokens(self, batch: Any) -> tuple[Tensor, Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch  # labels unused
        x, grid = self.model.patch_embed(images)  # (b n d)
        if tuple(grid) != tuple(self.model.grid):
            raise ValueError(f"MAE pre-training needs images of model.img_size={self.model_config.img_size}, found "
                             f"{tuple(images.shape[-2:])}")
        p = self.model_config.patch_size
        targets = rearrange(images, "b c (gh p) (gw q) -> b (gh gw) (p q c)", p=p, q=p)
        if self.norm_pix_loss:
            mean, var = targets.mean(dim=-1, keepdim=True), targets.var(dim=-1, keepdim=True)
            targets = (targets - mean) / (var + 1e-6).sqrt()
        return x, targets

    def encode(self, tokens: Tensor, keep: Tensor | None, padding: Tensor | None) -> Tensor:
        """Visible patch tokens (b k d) at `keep` → their encoder outputs (b k d) (prefix tokens dropped)."""
        m = self.model
        positions = m.pos_embed[:, m.prefix_positions:].expand(tokens.shape[0], -1, -1)  # (b n d)
        x = tokens + (positions if keep is None else gather_tokens(positions, keep))
        return m.forward_tokens(x)[:, m.num_prefix_tokens:]
