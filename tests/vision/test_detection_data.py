"""Pascal VOC detection data: the shared BCCD images load with their two zero-area boxes logged, boxes follow the
image through augmentation, batches pad with a mask, and every bad annotation names its file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from polyformer.data import shared_data_dir
from polyformer.domains.vision.detection.data import VOCDetectionDataModule, read_coco_split, read_voc_split

BCCD = Path(os.environ.get("POLYFORMER_BCCD_PATH", shared_data_dir() / "vision" / "bccd"))
needs_bccd = pytest.mark.skipif(not (BCCD / "Annotations").is_dir(),
                                reason=f"BCCD not found at {BCCD} (set POLYFORMER_BCCD_PATH)")


def annotation_xml(name: str = "cell", box=(10, 20, 30, 44), size: tuple[int, int] | None = (64, 48)) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    x0, y0, x1, y1 = box
    return (f"<annotation><filename>img.jpg</filename>{size_xml}<object><name>{name}</name><bndbox>"
            f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>")


def voc_folder(root: Path, xml: str, image: bytes | None = None, image_size=(64, 48)) -> Path:
    """A one-image VOC folder: a black image with a white rectangle at (10, 20)-(30, 44)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "img.xml").write_text(xml)
    (root / "ImageSets" / "Main" / "train.txt").write_text("img\n")
    if image is None:
        pixels = np.zeros((image_size[1], image_size[0], 3), np.uint8)
        pixels[20:44, 10:30] = 255
        Image.fromarray(pixels).save(root / "JPEGImages" / "img.jpg", quality=95)
    elif image:
        (root / "JPEGImages" / "img.jpg").write_bytes(image)
    return root


@needs_bccd
def test_bccd_splits_load_with_bad_boxes_logged(caplog):
    with pytest.raises(ValueError, match=r"BloodImage_00343.xml: object 3: box \(181, 329, 181, 329\) has zero area"):
        read_voc_split(BCCD, "train", ["RBC", "WBC", "Platelets"])
    with caplog.at_level(logging.WARNING):
        data = VOCDetectionDataModule(root=str(BCCD), num_workers=0, skip_bad=True)
        data.setup("fit")
    assert (len(data.datasets["train"]), len(data.datasets["val"])) == (205, 87)
    assert "left out 0 of 205 images and 1 boxes" in caplog.text and "left out 0 of 87 images and 1 boxes" in caplog.text
    images, padding, targets = next(iter(data.val_dataloader()))
    assert images.shape == (8, 3, 384, 512) and padding.shape == (8, 384, 512) and not padding.any()
    assert all(t["orig_size"].tolist() == [480, 640] for t in targets)
    boxes = torch.cat([t["boxes"] for t in targets])
    assert boxes.min() >= 0 and boxes.max() <= 1


def test_boxes_follow_the_image_through_augmentation(tmp_path):
    root = voc_folder(tmp_path, annotation_xml())
    data = VOCDetectionDataModule(root=str(root), classes=["cell"], val_split="train", image_size=96, max_size=200,
                                  num_workers=0, batch_size=1)
    data.setup("fit")
    torch.manual_seed(0)
    for _ in range(20):  # flips, scales and crops: the white rectangle stays under its box
        image, target = data.datasets["train"][0]
        if len(target["labels"]) == 0:
            continue  # the crop left the box out (a dropped box is the crop's, not the data's)
        height, width = image.shape[1:]
        x0, y0, x1, y1 = (box_convert(target["boxes"], "cxcywh", "xyxy")[0]
                          * torch.tensor([width, height, width, height])).round().int().tolist()
        inside = image[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2].mean()
        assert inside > 1.5, (x0, y0, x1, y1)  # white after ImageNet normalisation is ~2.2; black ~ -1.8
    images, padding, targets = next(iter(data.val_dataloader()))
    assert images.shape[-2:] == (96, 128) and targets[0]["boxes"].shape == (1, 4)


@pytest.mark.parametrize("xml, image, message", [
    (annotation_xml(box=(10, 20, 70, 44)), None, r"img.xml: object 0: box \(10, 20, 70, 44\) lies outside the 64×48"),
    (annotation_xml(box=(10, 20, 10, 44)), None, r"img.xml: object 0: box \(10, 20, 10, 44\) has zero area"),
    (annotation_xml(name="dog"), None, r"img.xml: object 0: class 'dog' is not one of the configured classes"),
    (annotation_xml(size=None), None, r"img.xml: no <size>"),
    (annotation_xml(), b"", r"img.xml: its image .*img.jpg does not exist"),
    (annotation_xml(), b"\xff\xd8\xff\xe0 not a jpeg", r"img.jpg: cannot decode the image"),
    (annotation_xml(size=(80, 48)), None, r"img.xml: <size> says 80×48, the image .*img.jpg is 64×48"),
    ("<annotation><size>", None, r"img.xml: not readable XML"),
])
def test_bad_annotations_name_the_file(tmp_path, xml, image, message, caplog):
    root = voc_folder(tmp_path, xml, image)
    with pytest.raises(ValueError, match=message):
        read_voc_split(root, "train", ["cell"])
    with caplog.at_level(logging.WARNING):
        if "object 0" in message:  # a bad box is left out and counted; the image stays
            assert len(read_voc_split(root, "train", ["cell"], skip_bad=True)[0].labels) == 0
            assert "left out 0 of 1 images and 1 boxes" in caplog.text
        else:  # a bad image is left out: none is left, which is an error of its own
            with pytest.raises(ValueError, match="no usable image"):
                read_voc_split(root, "train", ["cell"], skip_bad=True)
            assert "left out 1 of 1 images" in caplog.text


def test_missing_split_and_bad_settings(tmp_path):
    root = voc_folder(tmp_path, annotation_xml())
    with pytest.raises(FileNotFoundError, match=r"split 'test': expected the id list .*test.txt"):
        read_voc_split(root, "test", ["cell"])
    with pytest.raises(ValueError, match="classes must be distinct"):
        VOCDetectionDataModule(root=str(root), classes=["a", "a"])
    with pytest.raises(ValueError, match="expected 32 <= image_size <= max_size"):
        VOCDetectionDataModule(root=str(root), image_size=800, max_size=640)


def test_coco_layout_reads_boxes_and_leaves_crowds_out(tmp_path):
    import json as json_module

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    pixels = np.zeros((48, 64, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "val2017" / "a.jpg")
    coco = {"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48}],
            "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}],
            "annotations": [{"image_id": 7, "bbox": [10, 20, 20, 24], "category_id": 3, "iscrowd": 0},
                            {"image_id": 7, "bbox": [0, 0, 64, 48], "category_id": 1, "iscrowd": 1}]}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json_module.dumps(coco))
    data = VOCDetectionDataModule(root=str(tmp_path), layout="coco", val_split="val2017", test_split="val2017",
                                  image_size=48, max_size=64, num_workers=0)
    data.setup("test")
    assert data.classes == ["cat", "dog"]  # category id order
    (annotation,) = data.datasets["test"].annotations
    assert annotation.boxes.tolist() == [[10, 20, 30, 44]] and annotation.labels.tolist() == [1]
    coco["annotations"][0]["bbox"] = [60, 20, 20, 24]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json_module.dumps(coco))
    with pytest.raises(ValueError, match=r"annotation 0 \(image a.jpg\): box \[60, 20, 20, 24\] is empty or outside"):
        read_coco_split(tmp_path, "val2017", ["cat", "dog"])
