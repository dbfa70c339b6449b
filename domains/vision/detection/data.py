"""Object detection data in the Pascal VOC layout: any folder with `Annotations/<id>.xml`, `JPEGImages/<id>.jpg` and
split files `ImageSets/Main/<split>.txt` (one id per line) — BCCD, VOC2007/2012, or a folder of your own.

Every annotation is checked when a split is read: its `<size>` against the JPEG's own, every object's class against
`classes`, every box inside the image and of positive area; every JPEG is decoded once. A bad file raises a
ValueError naming it (and the object); with `skip_bad` a bad box is left out, or a bad image with all its boxes, and
each is logged and counted. Boxes keep VOC's pixel corners as written (x_min, y_min, x_max, y_max).

Batches hold images of different sizes, padded at the bottom and right to the largest in the batch (a multiple of
`size_divisor`) with `padding_mask` (b H W) True at padding; targets are per image: boxes as (cx, cy, w, h) in
[0, 1] of the image before padding (DETR's convention), class indices, and the original size for mapping
predictions back to pixels.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from polyformer.data import SplitDataModule, make_loader, shared_data_dir
from polyformer.streaming import StreamConfig, StreamSource, open_stream, stream_loader
from polyformer.domains.vision.data import load_rgb

log = logging.getLogger(__name__)

BCCD_CLASSES = ["RBC", "WBC", "Platelets"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Annotation:
    """One image's boxes: (n 4) float32 pixel corners and (n) int64 class indices."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


class BadAnnotation(ValueError):
    pass


def number(element: ET.Element, tag: str, where: str) -> float:
    child = element.find(tag)
    if child is None or child.text is None:
        raise BadAnnotation(f"{where}: no <{tag}>")
    try:
        return float(child.text)
    except ValueError:
        raise BadAnnotation(f"{where}: <{tag}> is {child.text!r}, not a number") from None


def read_annotation(xml_path: Path, image_dir: Path, classes: list[str], skip_bad: bool) -> tuple[Annotation, int]:
    """Parses and checks one VOC annotation; returns it and how many boxes were left out (skip_bad only)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as error:
        raise BadAnnotation(f"{xml_path}: not readable XML ({error})") from None
    size = root.find("size")
    if size is None:
        raise BadAnnotation(f"{xml_path}: no <size> (width and height of the image)")
    width, height = int(number(size, "width", str(xml_path))), int(number(size, "height", str(xml_path)))
    filename = root.findtext("filename") or f"{xml_path.stem}.jpg"
    image = image_dir / filename
    boxes, labels, skipped = [], [], 0
    for index, obj in enumerate(root.findall("object")):
        where = f"{xml_path}: object {index}"
        try:
            name = (obj.findtext("name") or "").strip()
            if name not in classes:
                raise BadAnnotation(f"{where}: class {name!r} is not one of the configured classes {classes}")
            box = obj.find("bndbox")
            if box is None:
                raise BadAnnotation(f"{where}: no <bndbox>")
            x0, y0, x1, y1 = (number(box, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise BadAnnotation(f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the "
                                    f"{width}×{height} image")
            if x1 <= x0 or y1 <= y0:
                raise BadAnnotation(f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has zero area")
        except BadAnnotation as error:
            if not skip_bad:
                raise
            log.warning("left out a box: %s", error)
            skipped += 1
            continue
        boxes.append((x0, y0, x1, y1))
        labels.append(classes.index(name))
    return Annotation(image, width, height, np.array(boxes, np.float32).reshape(-1, 4),
                      np.array(labels, np.int64)), skipped


def check_image(annotation: Annotation, xml_path: Path) -> None:
    """Decodes the JPEG once: it must exist, decode, and have the size its annotation states."""
    if not annotation.image.is_file():
        raise BadAnnotation(f"{xml_path}: its image {annotation.image} does not exist")
    try:
        with Image.open(annotation.image) as image:
            image.load()
            found = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise BadAnnotation(f"{annotation.image}: cannot decode the image ({error})") from None
    if found != (annotation.width, annotation.height):
        raise BadAnnotation(f"{xml_path}: <size> says {annotation.width}×{annotation.height}, the image "
                            f"{annotation.image} is {found[0]}×{found[1]}")


def read_voc_split(root: Path, split: str, classes: list[str], *, skip_bad: bool = False) -> list[Annotation]:
    """Every image of ImageSets/Main/<split>.txt, checked (see the module docstring)."""
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise FileNotFoundError(f"split {split!r}: expected the id list {ids_file} (Pascal VOC layout), found none")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split {split!r}: {ids_file} lists no image")
    annotations, bad_images, bad_boxes = [], 0, 0
    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        try:
            if not xml_path.is_file():
                raise BadAnnotation(f"{ids_file}: lists {image_id}, which has no annotation {xml_path}")
            annotation, skipped = read_annotation(xml_path, root / "JPEGImages", classes, skip_bad)
            check_image(annotation, xml_path)
        except BadAnnotation as error:
            if not skip_bad:
                raise
            log.warning("left out an image: %s", error)
            bad_images += 1
            continue
        bad_boxes += skipped
        annotations.append(annotation)
    if bad_images or bad_boxes:
        log.warning("split %r of %s: left out %d of %d images and %d boxes (skip_bad; each logged above)", split,
                    root, bad_images, len(ids), bad_boxes)
    if not annotations:
        raise ValueError(f"split {split!r}: no usable image in {ids_file}")
    return annotations


def read_coco_split(root: Path, split: str, classes: list[str] | None, *, skip_bad: bool = False
                    ) -> tuple[list[Annotation], list[str]]:
    """COCO's layout: root/annotations/instances_<split>.json and the images under root/<split>/; returns the images'
    annotations and the classes (without `classes`, the file's categories in id order). Crowd regions (iscrowd) are
    left out of the boxes (DETR's practice), counted; other checks as for VOC, images decoded lazily."""
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"split {split!r}: expected the COCO annotation file {path}, found none")
    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    classes = classes or [names[i] for i in sorted(names)]
    unknown = sorted(set(names.values()) - set(classes))
    if unknown:
        raise ValueError(f"{path}: categories {unknown[:5]} are not among the configured classes")
    boxes: dict[int, list] = {}
    crowd, bad = 0, 0
    for index, a in enumerate(data.get("annotations", [])):
        if a.get("iscrowd"):
            crowd += 1
            continue
        boxes.setdefault(a["image_id"], []).append((index, a))
    annotations = []
    for image in data.get("images", []):
        width, height, kept, labels = image["width"], image["height"], [], []
        for index, a in boxes.get(image["id"], []):
            x, y, w, h = a["bbox"]
            if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1:
                if not skip_bad:
                    raise BadAnnotation(f"{path}: annotation {index} (image {image['file_name']}): box {a['bbox']} "
                                        f"is empty or outside the {width}×{height} image")
                bad += 1
                continue
            kept.append((x, y, min(x + w, width), min(y + h, height)))
            labels.append(classes.index(names[a["category_id"]]))
        annotations.append(Annotation(root / split / image["file_name"], width, height,
                                      np.array(kept, np.float32).reshape(-1, 4), np.array(labels, np.int64)))
    log.info("split %r of %s: %d images, %d crowd regions left out, %d bad boxes left out", split, root,
             len(annotations), crowd, bad)
    if not annotations:
        raise ValueError(f"split {split!r}: {path} lists no image")
    return annotations, classes


def detection_transforms(train: bool, size: int, max_size: int, scale_range: tuple[float, float]) -> v2.Compose:
    """Train: flip, scale jitter of the shorter side in size·scale_range, a random crop of at least half of each side
    (boxes clipped, those left with no area dropped); eval: shorter side to `size`. Then ImageNet normalisation."""
    steps: list = []
    if train:
        sizes = sorted({int(round(size * s / 32)) * 32 for s in np.linspace(*scale_range, 5)})
        steps += [v2.RandomHorizontalFlip(), v2.RandomShortestSize(sizes, max_size=max_size),
                  v2.RandomApply([v2.RandomIoUCrop(min_scale=0.5, sampler_options=[0.0, 0.1, 0.3, 0.5])], p=0.5),
                  v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    else:
        steps += [v2.Resize(size, max_size=max_size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def detection_sample(image: Image.Image, boxes: np.ndarray, labels: np.ndarray, height: int, width: int,
                     index: int, transform: v2.Compose) -> tuple[Tensor, dict[str, Tensor]]:
    """(image (3 h w) normalised, target dict: boxes (n 4) normalised cxcywh, labels (n), orig_size (2) as
    (height, width), image_id) of an image and its xyxy pixel boxes, through `transform`."""
    pixels = tv_tensors.Image(v2.functional.pil_to_tensor(image))
    xyxy = tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width))
    pixels, target = transform(pixels, {"boxes": xyxy, "labels": torch.from_numpy(labels)})
    h, w = pixels.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return pixels.as_subclass(Tensor), {
        "boxes": box_convert(target["boxes"].as_subclass(Tensor), "xyxy", "cxcywh") / scale,
        "labels": target["labels"],
        "orig_size": torch.tensor([height, width]),
        "image_id": torch.tensor(index),
    }


class VOCDetectionDataset(Dataset):
    """Item: detection_sample() of each annotated image."""

    def __init__(self, annotations: list[Annotation], transform: v2.Compose):
        self.annotations, self.transform = annotations, transform

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        a = self.annotations[index]
        return detection_sample(load_rgb(str(a.image)), a.boxes, a.labels, a.height, a.width, index, self.transform)


DETECTION_STREAM = "vision.detection"


def encode_annotation(item: tuple[int, Annotation]) -> dict:
    """A stream's record of one annotated image: the image file's bytes as they are, its boxes and labels."""
    index, a = item
    return {"index": index, "name": str(a.image).encode(), "image": a.image.read_bytes(), "width": a.width,
            "height": a.height, "boxes": a.boxes.astype(np.float32), "labels": a.labels.astype(np.int64)}


@dataclass
class StreamedDetection:
    """A stream record → the item VOCDetectionDataset gives of the same image."""

    transform: v2.Compose

    def __call__(self, record: dict) -> tuple[Tensor, dict[str, Tensor]]:
        image = load_rgb(bytes(record["name"]).decode(), bytes(record["image"]))
        return detection_sample(image, record["boxes"].reshape(-1, 4), record["labels"], record["height"],
                                record["width"], record["index"], self.transform)


def pad_batch(items: list[tuple[Tensor, dict[str, Tensor]]], size_divisor: int = 32
              ) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Images (b 3 H W) zero-padded at the bottom and right, padding_mask (b H W) True at padding, the targets."""
    height = max(image.shape[1] for image, _ in items)
    width = max(image.shape[2] for image, _ in items)
    height, width = -(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor
    images = torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1]))
                          for image, _ in items])
    padding = torch.ones(len(items), height, width, dtype=torch.bool)
    for i, (image, _) in enumerate(items):
        padding[i, : image.shape[1], : image.shape[2]] = False
    return images, padding, [target for _, target in items]


class VOCDetectionDataModule(SplitDataModule):
    """Train / val / test splits of a Pascal VOC-layout folder (default: the shared BCCD blood-cell images), or of
    COCO's layout with `layout: coco`."""

    def __init__(
        self,
        root: str | None = None,  # the folder holding Annotations/, JPEGImages/, ImageSets/Main/ (or COCO's)
        layout: Literal["voc", "coco"] = "voc",
        classes: list[str] | None = None,  # default BCCD's: RBC, WBC, Platelets
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",  # BCCD's test images are not in the shared copy
        image_size: int = 384,  # shorter side at evaluation; training jitters around it
        max_size: int = 640,  # longer side cap
        scale_range: tuple[float, float] = (0.75, 1.25),
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        skip_bad: bool = False,  # leave out (and log, and count) bad boxes and images instead of raising
        stream: StreamConfig | None = None,  # read the splits `polyformer stream` wrote of this module instead
    ):
        super().__init__()
        if image_size < 32 or max_size < image_size:
            raise ValueError(f"expected 32 <= image_size <= max_size, found image_size={image_size}, "
                             f"max_size={max_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, found {scale_range}")
        if layout not in ("voc", "coco"):
            raise ValueError(f"layout must be 'voc' or 'coco', found {layout!r}")
        self.root = Path(root) if root is not None else shared_data_dir() / "vision" / "bccd"
        self.layout = layout
        # COCO without `classes`: the annotation file's categories in id order, read with the first split
        self.classes = list(classes or (BCCD_CLASSES if layout == "voc" else []))
        if len(set(self.classes)) != len(self.classes) or (layout == "voc" and not self.classes):
            raise ValueError(f"classes must be distinct names, found {self.classes}")
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.image_size, self.max_size, self.scale_range = image_size, max_size, tuple(scale_range)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.skip_bad, self.stream = num_workers, skip_bad, stream
        self.datasets: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for name in wanted.get(stage, ("train", "val", "test")):
            if name in self.datasets:
                continue
            transform = detection_transforms(name == "train", self.image_size, self.max_size, self.scale_range)
            if self.stream is not None:
                self.datasets[name] = open_stream(self.stream, name, DETECTION_STREAM, StreamedDetection(transform),
                                                  shuffle=name == "train")
                classes = self.datasets[name].manifest["meta"]["classes"]
                if self.layout == "coco" and not self.classes:  # COCO without `classes`: the stream's categories
                    self.classes = list(classes)
                if classes != self.classes:
                    raise ValueError(f"stream {self.stream.uri}: its {name} split has classes {classes}, this data "
                                     f"module {self.classes}")
                continue
            if self.layout == "voc":
                annotations = read_voc_split(self.root, self.splits[name], self.classes, skip_bad=self.skip_bad)
            else:
                annotations, self.classes = read_coco_split(self.root, self.splits[name], self.classes or None,
                                                            skip_bad=self.skip_bad)
            self.datasets[name] = VOCDetectionDataset(annotations, transform)

    def stream_sources(self, split: str) -> dict[str, StreamSource]:
        """The split's images (files as they are) with their boxes and labels, and the class names."""
        annotations = self.datasets[split].annotations
        return {split: StreamSource(DETECTION_STREAM, list(enumerate(annotations)), encode_annotation,
                                    {"classes": self.classes})}

    def split_loader(self, name: str, train: bool):
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.stream is not None:
            return stream_loader(self.datasets[name], batch_size=self.stream.batch_size or batch_size,
                                 collate_fn=pad_batch, num_workers=self.num_workers)
        return make_loader(self.datasets[name], batch_size=batch_size, shuffle=train, num_workers=self.num_workers,
                           drop_last=False, collate_fn=pad_batch)

    def predict_dataloader(self):
        if self.stream is not None:  # predictions name each image's file: they are written from the folders
            raise ValueError(f"predict writes each image's file name with its detections: run it on the folder "
                             f"layout (without stream), found stream {self.stream.uri}")
        return self.split_loader("test", False)
