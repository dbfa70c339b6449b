"""Lightning tasks for detection on VOC-layout data (data.py): DETR (detr.py) with its set loss, and
Deformable DETR trained the DINO way (deformable_detr.py) — both on a shared `DetectorTask`: COCO mAP@[.5:.95] and
mAP@.5 through torchmetrics' MeanAveragePrecision on validation and test, the backbone at a reduced learning rate,
and `polyformer predict` writing, in the run's folder under predictions/, each image's detections (JSON: box, class
and score, best first) and a picture with the true boxes (green) and the predicted ones scoring at least
`score_threshold` (red, with scores). With `distill`, a frozen teacher detector's confident detections are a second
target set for the student's set loss (pseudo-label distillation: a set predictor's queries have no fixed order to
match logits by, so its soft targets are boxes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.io import write_png
from torchvision.ops import box_convert
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes

from polyformer.domains.vision.data import load_rgb
from polyformer.domains.vision.swin import SwinBlock
from polyformer.domains.vision.detection.data import VOCDetectionDataModule
from polyformer.domains.vision.detection.deformable_detr import (DecoderLayer, DeformableDETR,
                                                                 DeformableDETRConfig, EncoderLayer, detection_loss,
                                                                 set_loss, top_detections)
from polyformer.domains.vision.detection.detr import DETR, DETRConfig, denoising_loss, detections, detr_loss
from polyformer.deploy import Exportable
from polyformer.distillation import TeacherConfig, TeacherHolder
from polyformer.finetune import FinetuneConfig
from polyformer.training import OptimizerConfig, PolyformerTask

Batch = tuple[Tensor, Tensor, list[dict[str, Tensor]]]


@dataclass
class DetectionDistillConfig(TeacherConfig):
    """A teacher detector of the same classes (DETR or Deformable DETR, the student's kind); its last layer's
    detections scoring at least `score_threshold` are the targets of a second set loss, mixed in with `weight`."""

    score_threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError(f"distill.score_threshold must be in (0, 1), found {self.score_threshold}")


def pixel_boxes(target: dict[str, Tensor]) -> Tensor:
    """A target's normalised (cx, cy, w, h) boxes as (x0, y0, x1, y1) pixels of its original image."""
    height, width = target["orig_size"].tolist()
    return box_convert(target["boxes"], "cxcywh", "xyxy") * target["boxes"].new_tensor([width, height, width, height])


class DetectorTask(PolyformerTask):
    """What every detector's task shares: the class count checked against the data, mAP on val/test, the
    backbone's learning rate, predictions as JSON and pictures. A subclass builds `self.model` (with a `backbone`)
    and implements `losses`."""

    inference_fields = ("score_threshold",)
    # Deformable DETR's layers and a Swin backbone's blocks; DETR's encoder and decoder are the core's TransformerBlock
    block_types = (EncoderLayer, DecoderLayer, SwinBlock)
    num_classes: int

    scores: str  # how the exported logits become class scores, for the export's description

    def __init__(self, optimizer: OptimizerConfig | None = None, *, backbone_lr_scale: float, score_threshold: float,
                 export_size: tuple[int, int] = (384, 512), init_from: str | None = None,
                 finetune: FinetuneConfig | None = None, distill: DetectionDistillConfig | None = None):
        super().__init__(optimizer, init_from=init_from, finetune=finetune)
        self.distill = distill
        self.teacher = TeacherHolder(distill) if distill is not None else None
        if not 0.0 < backbone_lr_scale <= 1.0:
            raise ValueError(f"backbone_lr_scale must be in (0, 1], found {backbone_lr_scale}")
        self.backbone_lr_scale, self.score_threshold = backbone_lr_scale, score_threshold
        self.export_size = tuple(export_size)
        self.map = torch.nn.ModuleDict({stage: MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
                                        for stage in ("val", "test")})

    def losses(self, images: Tensor, padding: Tensor, targets: list[dict[str, Tensor]], train: bool
               ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """(loss terms with "total", the detections of every image in pixels: boxes, scores, labels)."""
        raise NotImplementedError(f"{type(self).__name__} must implement losses()")

    def detect(self, images: Tensor, padding: Tensor, sizes: Tensor) -> list[dict[str, Tensor]]:
        """Every image's detections in pixels of its original size (sizes (b 2) as height, width)."""
        raise NotImplementedError(f"{type(self).__name__} must implement detect()")

    def class_scores(self, logits: Tensor) -> Tensor:
        """(... k) class probabilities of a query from its logits."""
        raise NotImplementedError(f"{type(self).__name__} must implement class_scores()")

    def set_loss(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """The one-to-one set loss of every layer's (logits (L b q ·), boxes (L b q 4)) against `targets`."""
        raise NotImplementedError(f"{type(self).__name__} must implement set_loss()")

    def distilled(self, terms: dict[str, Tensor], images: Tensor, padding: Tensor, logits: Tensor,
                  boxes: Tensor) -> dict[str, Tensor]:
        """With a teacher: terms with "distill", the set loss of the student's (logits, boxes) against the teacher's
        detections scoring at least distill.score_threshold, mixed into "total"."""
        teacher_logits, teacher_boxes = last_layer(self.teacher(self, images, padding))  # (b q' ·), (b q' 4)
        self.teacher.check(teacher_logits[0, 0], logits[-1, 0, 0], "(classes,) per query")
        scores, labels = self.class_scores(teacher_logits.float()).max(dim=-1)  # (b q')
        confident = scores >= self.distill.score_threshold
        pseudo = [{"boxes": teacher_boxes[i][keep].float(), "labels": labels[i][keep]}
                  for i, keep in enumerate(confident)]
        terms["distill"] = self.set_loss(logits, boxes, pseudo)
        terms["teacher_boxes"] = confident.sum(dim=1).float().mean().detach()
        terms["total"] = self.distill.mix(terms["total"], terms["distill"])
        return terms

    def setup(self, stage: str) -> None:
        datamodule = self.datamodule
        if isinstance(datamodule, VOCDetectionDataModule) and datamodule.num_classes != self.num_classes:
            raise ValueError(f"the data has {datamodule.num_classes} classes {datamodule.classes}, the model "
                             f"num_classes={self.num_classes}")
        super().setup(stage)

    def batch_size(self, batch: Batch) -> int:
        return batch[0].shape[0]

    def step(self, batch: Batch, stage: str) -> Tensor:
        images, padding, targets = batch
        terms, found = self.losses(images, padding, targets, stage == "train")
        on_epoch = stage != "train"
        for name, value in terms.items():
            if name != "total":
                self.log(f"{stage}/{name}", value, on_step=not on_epoch, on_epoch=on_epoch, batch_size=len(targets),
                         sync_dist=on_epoch)
        if stage in self.map:
            self.map[stage].update(found, [{"boxes": pixel_boxes(t), "labels": t["labels"]} for t in targets])
        return terms["total"]

    def log_map(self, stage: str) -> None:
        results = self.map[stage].compute()
        self.log(f"{stage}/map", results["map"], sync_dist=True)
        self.log(f"{stage}/map50", results["map_50"], sync_dist=True)
        self.map[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self.log_map("val")

    def on_test_epoch_end(self) -> None:
        self.log_map("test")

    def slow_parameters(self) -> set[int]:
        """The ids of the parameters trained at backbone_lr_scale of the rate: the backbone's."""
        return {id(p) for p in self.model.backbone.parameters()}

    def parameter_groups(self) -> list[dict]:
        """The base's AdamW groups, the slow parameters' (the backbone's) at backbone_lr_scale of the rate."""
        groups = []
        slow = self.slow_parameters()
        for group in super().parameter_groups():
            for is_slow in (False, True):
                params = [p for p in group["params"] if (id(p) in slow) == is_slow]
                if params:
                    scale = self.backbone_lr_scale if is_slow else 1.0
                    groups.append({**group, "params": params, "lr": group["lr"] * scale})
        return groups

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        images, padding, targets = batch
        found = self.detect(images, padding, torch.stack([t["orig_size"] for t in targets]))
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


    def exportable(self) -> Exportable:
        """(images, padding_mask) at export_size → the last decoder layer's (logits, boxes)."""
        height, width = self.export_size
        return Exportable(
            LastLayerOutputs(self.model), ["images", "padding_mask"], ["logits", "boxes"],
            lambda batch, _: (torch.randn(batch, 3, height, width), torch.zeros(batch, height, width, dtype=torch.bool)),
            lengths=(0, 0, 0),
            description=f"images (batch, 3, {height}, {width}) ImageNet-normalised and padding_mask (batch, {height}, "
                        f"{width}) True at padding → logits (batch, queries, {self.scores}) and boxes (batch, queries, "
                        f"4) as (cx, cy, w, h) in [0, 1] of the unpadded image")


class LastLayerOutputs(torch.nn.Module):
    """A detector as export sees it: (images, padding_mask) → the last decoder layer's (logits, boxes)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        return last_layer(self.model(images, padding_mask))


def last_layer(out) -> tuple[Tensor, Tensor]:
    """The last decoder layer's (logits (b q ·), boxes (b q 4)) of a detector's output: Deformable DETR's Outputs
    or DETR's (logits, boxes) of every layer."""
    logits, boxes = (out.logits, out.boxes) if hasattr(out, "logits") else out
    return logits[-1], boxes[-1]


class DetectionTask(DetectorTask):
    """DETR (detr.py) trained with its set loss, DN-DETR's reconstruction loss added when configured."""

    renamed_hparams = {"detr": "model"}

    def __init__(self, model: DETRConfig | None = None, optimizer: OptimizerConfig | None = None,
                 backbone_lr_scale: float = 0.1,  # DETR trains its backbone at a tenth of the rate
                 score_threshold: float = 0.5,  # predict: the detections drawn in the pictures
                 export_size: tuple[int, int] = (384, 512),  # export: the (height, width) of the exported graph
                 init_from: str | None = None, finetune: FinetuneConfig | None = None,
                 distill: DetectionDistillConfig | None = None, detr: DETRConfig | None = None):
        """detr: the old name of `model` (releases up to 0.1.0), read with a deprecation message."""
        super().__init__(optimizer, backbone_lr_scale=backbone_lr_scale, score_threshold=score_threshold,
                         export_size=export_size, init_from=init_from, finetune=finetune, distill=distill)
        self.model_config = self.model_argument(model, DETRConfig, detr=detr)
        self.num_classes = self.model_config.num_classes
        self.scores = f"{self.num_classes} + 1 (softmax: class scores and no-object)"
        self.model = DETR(self.model_config)

    def losses(self, images: Tensor, padding: Tensor, targets: list[dict[str, Tensor]], train: bool
               ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        denoised = None
        if train and self.model_config.denoising_groups:
            logits, boxes, denoised = self.model.forward_denoising(images, padding, targets)
        else:
            logits, boxes = self.model(images, padding)
        terms = detr_loss(logits, boxes, targets, self.model_config.loss)
        if denoised is not None:
            terms["denoising"] = denoising_loss(*denoised, self.model_config.loss)["total"]
            terms["total"] = terms["total"] + terms["denoising"]
        if train and self.teacher is not None:
            terms = self.distilled(terms, images, padding, logits, boxes)
        sizes = torch.stack([t["orig_size"] for t in targets])
        return terms, detections(logits[-1], boxes[-1], sizes)

    def detect(self, images: Tensor, padding: Tensor, sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, boxes = self.model(images, padding)
        return detections(logits[-1], boxes[-1], sizes)

    def class_scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(dim=-1)[..., :-1]  # the last class is "no object"

    def set_loss(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        return detr_loss(logits, boxes, targets, self.model_config.loss)["total"]


class DeformableDetectionTask(DetectorTask):
    """Deformable DETR with DINO's training (deformable_detr.py) on a multi-scale, ImageNet-pre-trained backbone."""

    renamed_hparams = {"detector": "model"}

    def __init__(self, model: DeformableDETRConfig | None = None, optimizer: OptimizerConfig | None = None,
                 # Deformable DETR and DINO train the backbone and the sampling offsets at a tenth of the rate
                 backbone_lr_scale: float = 0.1,
                 score_threshold: float = 0.3,  # predict: the detections drawn in the pictures
                 export_size: tuple[int, int] = (384, 512),  # export: the (height, width) of the exported graph
                 init_from: str | None = None, finetune: FinetuneConfig | None = None,
                 distill: DetectionDistillConfig | None = None, detector: DeformableDETRConfig | None = None):
        """detector: the old name of `model` (releases up to 0.1.0), read with a deprecation message."""
        super().__init__(optimizer, backbone_lr_scale=backbone_lr_scale, score_threshold=score_threshold,
                         export_size=export_size, init_from=init_from, finetune=finetune, distill=distill)
        self.model_config = self.model_argument(model, DeformableDETRConfig, detector=detector)
        self.num_classes = self.model_config.num_classes
        self.scores = f"{self.num_classes} (sigmoid: class scores)"
        self.model = DeformableDETR(self.model_config)

    def slow_parameters(self) -> set[int]:
        """The backbone's and the deformable attentions' sampling offsets (Deformable DETR's and DINO's
        lr_linear_proj_mult: 0.1, as the backbone's)."""
        offsets = {id(p) for name, p in self.model.named_parameters() if ".sampling_offsets." in name}
        return super().slow_parameters() | offsets

    def losses(self, images: Tensor, padding: Tensor, targets: list[dict[str, Tensor]], train: bool
               ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        out = self.model(images, padding, targets if train else None)
        terms = detection_loss(out, targets, self.model_config)
        if train and self.teacher is not None:
            terms = self.distilled(terms, images, padding, out.logits, out.boxes)
        sizes = torch.stack([t["orig_size"] for t in targets])
        return terms, top_detections(out.logits[-1], out.boxes[-1], sizes)

    def detect(self, images: Tensor, padding: Tensor, sizes: Tensor) -> list[dict[str, Tensor]]:
        out = self.model(images, padding)
        return top_detections(out.logits[-1], out.boxes[-1], sizes)

    def class_scores(self, logits: Tensor) -> Tensor:
        return logits.sigmoid()

    def set_loss(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        return set_loss(logits, boxes, targets, self.model_config.loss)["total"]

