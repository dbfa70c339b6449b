"""Image folders and VOC detection folders written as streams (polyformer.streaming) read back image for image."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from polyformer.domains.vision import ImageFolderDataModule
from polyformer.domains.vision.detection.data import VOCDetectionDataModule
from polyformer.streaming import StreamConfig, StreamError, split_uri, write_stream


def sibling(name: str):
    """A helper of a test module beside this one (tests are imported by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(data, folder: Path, splits=("train", "val", "test")) -> None:
    for split in splits:
        for name, source in data.stream_sources(split).items():
            write_stream(source, split_uri(str(folder), name), split=name)


def test_a_streamed_image_folder_gives_the_images_and_classes_of_the_folders(tmp_path):
    sibling("test_vision_data").write_tree(tmp_path / "tree")
    folders = ImageFolderDataModule(root=str(tmp_path / "tree"), img_size=32, batch_size=4, num_workers=0)
    folders.setup("fit")
    write(folders, tmp_path / "stream")
    streamed = ImageFolderDataModule(root="unused", img_size=32, batch_size=4, num_workers=0,
                                     stream=StreamConfig(str(tmp_path / "stream")))
    assert streamed.num_classes == 2 and streamed.classes == ["cat", "dog"]
    for i in range(len(folders.splits["val"])):  # evaluation transforms are deterministic: equal tensors
        image, label = streamed.splits["val"][i]
        expected, expected_label = folders.splits["val"][i]
        assert torch.equal(image, expected) and label == expected_label
    labels = sorted(label for _, batch in streamed.train_dataloader() for label in batch.tolist())
    assert labels == sorted(label for _, label in folders.splits["train"].samples)


def test_a_streamed_voc_folder_gives_the_boxes_of_the_folders(tmp_path):
    detection = sibling("test_detection_data")
    root = detection.voc_folder(tmp_path / "voc", detection.annotation_xml())
    settings = dict(classes=["cell"], val_split="train", test_split="train", image_size=96, max_size=200,
                    num_workers=0, batch_size=1)
    folders = VOCDetectionDataModule(root=str(root), **settings)
    folders.setup(None)
    write(folders, tmp_path / "stream")
    streamed = VOCDetectionDataModule(root="unused", **settings, stream=StreamConfig(str(tmp_path / "stream")))
    streamed.setup("validate")
    (image, target), (expected, expected_target) = streamed.datasets["val"][0], folders.datasets["val"][0]
    assert torch.equal(image, expected)
    for key in expected_target:
        assert torch.equal(target[key], expected_target[key]), key
    images, padding, targets = next(iter(streamed.val_dataloader()))
    assert images.shape[0] == 1 and targets[0]["labels"].tolist() == [0]
    with pytest.raises(ValueError, match=r"its val split has classes \['cell'\], this data module \['RBC'"):
        VOCDetectionDataModule(stream=StreamConfig(str(tmp_path / "stream"))).setup("validate")
    with pytest.raises(StreamError, match="written from data set 'vision.detection', but this data module reads "
                                          "'vision.image_folder'"):
        ImageFolderDataModule(root="unused", stream=StreamConfig(str(tmp_path / "stream"))).setup("fit")
