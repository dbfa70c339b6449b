"""Image classification with a ViT or a Swin: cross-entropy with label smoothing or soft (Mixup/CutMix) targets,
top-1/top-5 accuracy, optional initial weights (`init_from`), and distillation from a frozen teacher in either of two
ways: DeiT's hard labels through a distillation token (`distillation`), or the core's soft targets on the class logits
(`distill`, Hinton et al. 2015; see polyformer/distillation.py). `SwinClassificationTask` trains swin.py's Swin the
same way (no distillation token: the soft targets only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from polyformer.domains.vision.model import ViTConfig, VisionTransformer, pair
from polyformer.domains.vision.swin import SwinBlock, SwinConfig, SwinTransformer
from polyformer.domains.vision.timm_compat import timm_weights
from polyformer.deploy import Exportable
from polyformer.distillation import DistillConfig, TeacherHolder, soft_target_loss
from polyformer.checkpoint import read_pretrained
from polyformer.finetune import FinetuneConfig
from polyformer.training import OptimizerConfig, PolyformerTask


@dataclass
class DistillationConfig:
    """DeiT hard-label distillation (Touvron et al. 2021, §5.2): the class head learns the labels, the distillation
    head the teacher's argmax: loss = (1 − alpha)·CE(class head, labels) + alpha·CE(dist head, teacher argmax)."""

    teacher: str  # "timm:<model name>" (timm's pretrained weights: needs network) or a checkpoint of this task
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distillation.alpha must be in [0, 1], found {self.alpha}")


def build_teacher(source: str, num_classes: int) -> nn.Module:
    """A frozen classifier in eval mode from `timm:<name>` or from a checkpoint of ImageClassificationTask."""
    if source.startswith("timm:"):
        import timm

        teacher = timm.create_model(source.removeprefix("timm:"), pretrained=True, num_classes=num_classes)
    else:
        teacher = ImageClassificationTask.load_from_checkpoint(source).model
    return teacher.eval().requires_grad_(False)


class ImageClassificationTask(PolyformerTask):
    """A VisionTransformer classifier; `model` is its architecture (timm's argument names)."""

    architecture_fields = ("model.dim", "model.depth", "model.heads", "model.patch_size", "model.in_chans",
                           "model.mlp_ratio")
    renamed_hparams = {"vit": "model"}

    def __init__(self, model: ViTConfig | None = None, label_smoothing: float = 0.0, init_from: str | None = None,
                 distillation: DistillationConfig | None = None, optimizer: OptimizerConfig | None = None,
                 finetune: FinetuneConfig | None = None, distill: DistillConfig | None = None,
                 vit: ViTConfig | None = None):
        """vit: the old name of `model` (releases up to 0.1.0), read with a deprecation message."""
        super().__init__(optimizer, init_from=init_from, finetune=finetune)
        self.model_config = self.model_argument(model, ViTConfig, vit=vit)
        if distillation is not None and not self.model_config.distilled:
            raise ValueError("distillation needs a distillation token: set model.distilled=true (found "
                             "distilled=False)")
        if distillation is not None and distill is not None:
            raise ValueError("set one of distillation (DeiT's hard labels through a distillation token) and distill "
                             "(soft targets on the class logits), found both")
        self.label_smoothing, self.distillation, self.distill = label_smoothing, distillation, distill
        self.teacher = TeacherHolder(distill) if distill is not None else None
        self.model = self.build_model(self.model_config)
        k = self.model_config.num_classes
        self.metrics = nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(k, top_k=top_k, average="micro")
            for stage in ("train", "val", "test") for name, top_k in (("acc1", 1), ("acc5", 5)) if top_k <= k
        })
        self._teacher: list[nn.Module] = []  # a list keeps the teacher out of state_dict, checkpoints and optimizer

    def build_model(self, config: ViTConfig) -> nn.Module:
        return VisionTransformer(config)

    def setup(self, stage: str) -> None:
        datamodule = self.datamodule
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.model_config.num_classes:
            raise ValueError(f"the data has {data_classes} classes, the model model.num_classes="
                             f"{self.model_config.num_classes}")
        data_chans = getattr(datamodule, "in_chans", None)
        if data_chans is not None and data_chans != self.model_config.in_chans:
            raise ValueError(f"the data has {data_chans} channels, the model model.in_chans="
                             f"{self.model_config.in_chans}")
        super().setup(stage)  # init_from
        if stage == "fit" and self.distillation is not None and not self._teacher:
            self._teacher.append(build_teacher(self.distillation.teacher, self.model_config.num_classes))

    def pretrained(self, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """`timm:<name>` (timm's pretrained weights: needs network) or any file the core reads (a checkpoint of this
        or the MAE task, a timm state dict, .safetensors); the ViT's tensors adapted to this one (positions
        resampled, a head of another class count left out)."""
        state, hyper_parameters = (timm_weights(source), {}) if source.startswith("timm:") else read_pretrained(source)
        bare = not any(name.startswith("model.") for name in state)  # a model's state dict (timm's names)
        vit = {name.removeprefix("model."): value for name, value in state.items()
               if bare or name.startswith("model.")}
        others = {name: value for name, value in state.items() if not bare and not name.startswith("model.")}
        vit = self.model.adapt_pretrained(vit)
        return {**{f"model.{name}": value for name, value in vit.items()}, **others}, hyper_parameters

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def exportable(self) -> Exportable:
        c = self.model_config
        height, width = pair(c.img_size)
        return Exportable(self.model, ["images"], ["logits"],
                          lambda batch, _: (torch.randn(batch, c.in_chans, height, width),), lengths=(0, 0, 0),
                          description=f"images (batch, {c.in_chans}, {height}, {width}) → logits (batch, "
                                      f"{c.num_classes})")

    def classification_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Hard labels (b,) with label smoothing, or soft targets (b k) as Mixup/CutMix produce them."""
        soft = targets.is_floating_point()
        return F.cross_entropy(logits, targets, label_smoothing=0.0 if soft else self.label_smoothing)

    def step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, targets = batch  # (b c H W), (b,) labels or (b k) soft targets
        if stage == "train" and self.distillation is not None:
            cls_logits, dist_logits = self.model.forward_heads(
                self.model.forward_features(images, query_index=self.model.readout_tokens))
            teacher = self._teacher[0].to(images.device)
            with torch.no_grad():
                teacher_labels = teacher(images).argmax(dim=-1)
            alpha = self.distillation.alpha
            loss = (1 - alpha) * self.classification_loss(cls_logits, targets) \
                + alpha * F.cross_entropy(dist_logits, teacher_labels)
            logits = (cls_logits + dist_logits) / 2
        else:
            logits = self.model(images)
            loss = self.classification_loss(logits, targets)
            if stage == "train" and self.teacher is not None:
                teacher_logits = self.teacher(self, images)
                self.teacher.check(teacher_logits, logits, "(batch, classes)")
                loss = self.distill.mix(loss, soft_target_loss(logits, teacher_logits, self.distill.temperature))
        if not targets.is_floating_point():  # accuracy against soft (mixed) targets means little: skipped
            on_epoch = stage != "train"
            for name in ("acc1", "acc5"):
                if f"{stage}_{name}" in self.metrics:
                    metric = self.metrics[f"{stage}_{name}"]
                    metric(logits, targets)
                    self.log(f"{stage}/{name}", metric, prog_bar=name == "acc1", on_step=not on_epoch,
                             on_epoch=on_epoch, batch_size=images.shape[0])
        return loss

    def batch_size(self, batch: Any) -> int:
        return batch[0].shape[0]


class SwinClassificationTask(ImageClassificationTask):
    """A Swin classifier (Liu et al. 2021; `model` is swin.py's SwinConfig, timm's argument names) trained as the ViT
    is: the same loss, label smoothing, Mixup targets, metrics, soft-target distillation (`distill`) and export.
    `init_from` reads the files the core reads (a checkpoint of this task, a state dict under this model's names)."""

    architecture_fields = ("model.dim", "model.depths", "model.heads", "model.patch_size", "model.window",
                           "model.in_chans", "model.mlp_ratio")
    renamed_hparams: dict[str, str] = {}
    block_types = (SwinBlock,)  # FSDP units and activation checkpointing (polyformer.distributed)

    def __init__(self, model: SwinConfig | None = None, label_smoothing: float = 0.0, init_from: str | None = None,
                 optimizer: OptimizerConfig | None = None, finetune: FinetuneConfig | None = None,
                 distill: DistillConfig | None = None):
        super().__init__(model if model is not None else SwinConfig(), label_smoothing, init_from,
                         optimizer=optimizer, finetune=finetune, distill=distill)

    def build_model(self, config: SwinConfig) -> nn.Module:
        if config.num_classes < 1:
            raise ValueError(f"a classifier needs model.num_classes >= 1, found {config.num_classes}")
        return SwinTransformer(config)

    def pretrained(self, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return PolyformerTask.pretrained(self, source)
