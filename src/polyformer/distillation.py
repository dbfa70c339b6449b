"""Knowledge distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531): a frozen teacher's outputs are soft
targets, mixed with the task's own loss.

    loss = (1 − weight) · task loss + weight · distillation loss

The distillation loss is, for class scores (image logits, frame-level CTC posteriors), T² · KL(softmax(teacher/T) ‖
softmax(student/T)) averaged over the positions that count (T² keeps its gradients on the task loss's scale, as in
the paper); for real-valued outputs (forecasts), the mean squared error between the student's and the teacher's
outputs. A task with `distill` set calls `self.teacher_outputs(...)` in its training step and mixes with `distill.mix`.

The teacher is any checkpoint of a task (Lightning or weights-only): its class is the one LightningCLI recorded in
the checkpoint (`_class_path`), else the student's own; it stays out of the student's state dict, optimizer and
checkpoints, and its outputs must have the student's shape (same classes, vocabulary or horizon): the first batch
checks that and names both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyformer.training import PolyformerTask, load_task


@dataclass
class TeacherConfig:
    """A teacher checkpoint and the weight of the loss against it; what every kind of distillation shares."""

    teacher: str  # checkpoint of a trained task (its model's outputs have the student's shape)
    weight: float = 0.5  # loss = (1 − weight) · task loss + weight · distillation loss

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distill.weight must be in [0, 1], found {self.weight}")

    def mix(self, task_loss: Tensor, distill_loss: Tensor) -> Tensor:
        return (1 - self.weight) * task_loss + self.weight * distill_loss


@dataclass
class DistillConfig(TeacherConfig):
    """Soft targets: the teacher's outputs at softmax temperature `temperature` (Hinton et al. 2015)."""

    temperature: float = 2.0  # T of softmax(logits / T); unused for real-valued outputs

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be positive, found {self.temperature}")


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                     keep: Tensor | None = None) -> Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) over the last axis, averaged over the positions where `keep`
    (shape of the logits without their last axis) is True, or over all."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)  # (...)
    if keep is not None:
        kl = kl[keep]
    return kl.mean() * temperature**2


def load_teacher(source: str, student: PolyformerTask) -> nn.Module:
    """The model of the task stored at `source`, frozen and in eval mode."""
    teacher = load_task(source, default=type(student))
    return teacher.model.eval().requires_grad_(False)


def check_teacher_output(teacher: Tensor, student: Tensor, source: str, layout: str) -> None:
    """The teacher's output must have the student's shape; the error names both, read through `layout`, e.g.
    "(batch, classes)"."""
    if teacher.shape != student.shape:
        raise ValueError(f"distill.teacher {source}: the teacher's outputs {layout} are {tuple(teacher.shape)}, the "
                         f"student's {tuple(student.shape)}: a teacher must predict what the student predicts")


class TeacherHolder:
    """Loads the teacher on first use and runs it without gradients; kept in a plain attribute of the task (not a
    submodule), so that it never enters the student's state dict, optimizer or checkpoints."""

    def __init__(self, config: DistillConfig):
        self.config = config
        self.model: nn.Module | None = None
        self.checked = False

    @torch.no_grad()
    def __call__(self, student: PolyformerTask, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.model is None:
            self.model = load_teacher(self.config.teacher, student)
        self.model.to(inputs[0].device).eval()
        return self.model(*inputs)

    def check(self, teacher: Tensor, student: Tensor, layout: str) -> None:
        if not self.checked:
            check_teacher_output(teacher, student, self.config.teacher, layout)
            self.checked = True
