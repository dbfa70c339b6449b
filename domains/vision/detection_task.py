"""Lightning task for DETR (detr.py) on VOC-layout data (detection_data.py): DETR's set loss, COCO mAP@[.5:.95] and
mAP@.5 through torchmetrics' MeanAveragePrecision on validation and test, and `polyformer predict` writing, in the
run's folder under predictions/, each image's detections (JSON: every query's box, class and score, best first) and
a picture with the true boxes (green) and the predicted ones scoring at least `score_threshold` (red, with scores)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.io import write_png
from torchvision.ops import box_convert
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes

from polyformer.domains.vision.data import load_rgb
from polyformer.domains.vision.detection_data import VOCDetectionDataModule
from polyformer.domains.vision.detr import DETR, DETRConfig, denoising_loss, detections, detr_loss
from polyformer.finetune import FinetuneConfig
from polyformer.training import OptimizerConfig, PolyformerTask

Batch = tuple[Tensor, Tensor, list[dict[str, Tensor]]]


def pixel_boxes(target: dict[str, Tensor]) -> Tensor:
    """A target's normalised (cx, cy, w, h) boxes as (x0, y0, x1, y1) pixels of its original image."""
    height, width = target["orig_size"].tolist()
    return box_convert(target["boxes"], "cxcywh", "xyxy") * target["boxes"].new_tensor([width, height, width, height])


class DetectionTask(PolyformerTask):
    """DETR trained with its set loss; mAP on val/test; predictions as JSON and pictures."""

    inference_fields = ("score_threshold",)

    def __init__(self, detr: DETRConfig | None = None, optimizer: OptimizerConfig | None = None,
                 backbone_lr_scale: float = 0.1,  # DETR trains its backbone at a tenth of the rate
                 score_threshold: float = 0.5,  # predict: the detections drawn in the pictures
                 init_from: str | None = None, finetune: FinetuneConfig | None = None):
        super().__init__(optimizer, init_from=init_from, finetune=finetune)
        self.detr_config = detr or DETRConfig()
        if not 0.0 < backbone_lr_scale <= 1.0:
            raise ValueError(f"backbone_lr_scale must be in (0, 1], found {backbone_lr_scale}")
        self.backbone_lr_scale, self.score_threshold = backbone_lr_scale, score_threshold
        self.model = DETR(self.detr_config)
        self.map = torch.nn.ModuleDict({stage: MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
                                        for stage in ("val", "test")})

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(datamodule, VOCDetectionDataModule) and datamodule.num_classes != self.detr_config.num_classes:
            raise ValueError(f"the data has {datamodule.num_classes} classes {datamodule.classes}, the model "
                             f"detr.num_classes={self.detr_config.num_classes}")
        super().setup(stage)

    def batch_size(self, batch: Batch) -> int:
        return batch[0].shape[0]

    def step(self, batch: Batch, stage: str) -> Tensor:
        images, padding, targets = batch
        denoised = None
        if stage == "train" and self.detr_config.denoising_groups:
            logits, boxes, denoised = self.model.forward_denoising(images, padding, targets)
        else:
            logits, boxes = self.model(images, padding)
        losses = detr_loss(logits, boxes, targets, self.detr_config.loss)
        on_epoch = stage != "train"
        for name in ("class", "l1", "giou"):
            self.log(f"{stage}/{name}", losses[name], on_step=not on_epoch, on_epoch=on_epoch,
                     batch_size=len(targets), sync_dist=on_epoch)
        if denoised is not None:
            reconstruction = denoising_loss(*denoised, self.detr_config.loss)
            self.log("train/denoising", reconstruction["total"], batch_size=len(targets))
            losses["total"] = losses["total"] + reconstruction["total"]
        if stage in self.map:
            predicted = detections(logits[-1], boxes[-1], torch.stack([t["orig_size"] for t in targets]))
            self.map[stage].update(predicted, [{"boxes": pixel_boxes(t), "labels": t["labels"]} for t in targets])
        return losses["total"]

    def log_map(self, stage: str) -> None:
        results = self.map[stage].compute()
        self.log(f"{stage}/map", results["map"], sync_dist=True)
        self.log(f"{stage}/map50", results["map_50"], sync_dist=True)
        self.map[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self.log_map("val")

    def on_test_epoch_end(self) -> None:
        self.log_map("test")

    def parameter_groups(self) -> list[dict]:
        """The base's AdamW groups, the backbone's at backbone_lr_scale of the rate."""
        groups = []
        backbone = {id(p) for p in self.model.backbone.parameters()}
        for group in super().parameter_groups():
            for in_backbone in (False, True):
                params = [p for p in group["params"] if (id(p) in backbone) == in_backbone]
                if params:
                    scale = self.backbone_lr_scale if in_backbone else 1.0
                    groups.append({**group, "params": params, "lr": group["lr"] * scale})
        return groups

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        images, padding, targets = batch
        logits, boxes = self.model(images, padding)
        found = detections(logits[-1], boxes[-1], torch.stack([t["orig_size"] for t in targets]))
        dataset = self.trainer.datamodule.datasets["test"]
        classes = self.trainer.datamodule.classes
        folder = Path(self.trainer.log_dir or ".") / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for target, found_boxes in zip(targets, found):
            annotation = dataset.annotations[int(target["image_id"])]
            order = found_boxes["scores"].argsort(descending=True)
            boxes, scores, labels = (found_boxes[key][order] for key in ("boxes", "scores", "labels"))
            record = {"image": str(annotation.image), "detections": [
                {"label": classes[int(label)], "score": round(float(score), 4), "box": [round(v, 1) for v in box.tolist()]}
                for box, score, label in zip(boxes, scores, labels)]}
            shown = scores >= self.score_threshold
            picture = pil_to_tensor(load_rgb(str(annotation.image)))
            picture = draw_bounding_boxes(picture, pixel_boxes(target), colors="lime", width=2)
            picture = draw_bounding_boxes(picture, boxes[shown], width=2, colors="red", labels=[
                f"{classes[int(label)]} {float(score):.2f}" for label, score in zip(labels[shown], scores[shown])])
            write_png(picture, str(folder / f"{annotation.image.stem}.png"))
            with open(folder / f"{annotation.image.stem}.json", "w") as f:
                json.dump(record, f, indent=1)
            records.append(record)
        return records
