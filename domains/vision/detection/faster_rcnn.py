"""The detection benchmark's peer: torchvision's Faster R-CNN (Ren et al. 2015) with a feature pyramid (Lin et al.
2017) over the same multi-scale backbone as our detector (backbones.py), so that both sides start from the same
ImageNet weights and see the same strides.

torchvision builds everything but the backbone: its `FeaturePyramidNetwork` (width 256, a max-pooled extra level,
as in its own detectors) over the backbone's maps at strides 8, 16, 32, the RPN with one anchor size per pyramid
level (32, 64, 128, 256 px; aspect ratios 0.5, 1, 2), RoI-align over the three finest levels and its two-layer box
head. Images go in as a list of (3 h w) tensors in [0, 1]: torchvision normalises (ImageNet mean and std) and
resizes them itself.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from polyformer.domains.vision.detection.backbones import BackboneConfig, MultiScaleBackbone
from polyformer.domains.vision.detection.data import IMAGENET_MEAN, IMAGENET_STD


class FeaturePyramid(nn.Module):
    """A MultiScaleBackbone's maps through torchvision's FPN: (b 3 H W) → {"0": stride 8, …, "pool": stride 64}."""

    def __init__(self, backbone: MultiScaleBackbone, width: int):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.channels, width, extra_blocks=LastLevelMaxPool())
        self.out_channels = width  # what torchvision's detectors read

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(self.body(images))))


def faster_rcnn(backbone: BackboneConfig, num_classes: int, *, min_size: int, max_size: int, width: int = 256
                ) -> FasterRCNN:
    """Faster R-CNN for `num_classes` object classes (torchvision adds its background class 0) on `backbone`."""
    if tuple(backbone.strides) != (8, 16, 32):
        raise ValueError(f"the peer's pyramid reads the backbone at strides (8, 16, 32), found {backbone.strides}")
    anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    pooling = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    return FasterRCNN(FeaturePyramid(MultiScaleBackbone(backbone), width), num_classes=num_classes + 1,
                      rpn_anchor_generator=anchors, box_roi_pool=pooling, min_size=min_size, max_size=max_size,
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
