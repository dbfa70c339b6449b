"""Vision: ViT, DeiT and Swin on the Polyformer core, timm-compatible (weights move both ways by state dict)."""

from polyformer.domains.vision.data import (
    AugmentConfig,
    CIFARDataModule,
    DigitsDataModule,
    ImageClassificationDataModule,
    ImageFolderDataModule,
    MixupConfig,
)
from polyformer.domains.vision.model import PatchEmbed, ViTConfig, VisionTransformer
from polyformer.domains.vision.pretrain import MAEPretrainTask
from polyformer.domains.vision.swin import SwinConfig, SwinTransformer
from polyformer.domains.vision.task import DistillationConfig, ImageClassificationTask, SwinClassificationTask
