"""Knowledge distillation in the core (polyformer.distillation), used by the vision and time-series tasks."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from polyformer.distillation import DistillConfig, soft_target_loss
from polyformer.domains.timeseries import PatchTSTConfig, PatchTSTTask
from polyformer.domains.vision import DigitsDataModule, ImageClassificationTask, ViTConfig
from polyformer.checkpoint import to_plain
from polyformer.transformer import TransformerConfig

TINY_VIT = ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, depth=1, heads=2, mlp_ratio=2.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, accelerator="cpu")


def test_soft_target_loss_is_t_squared_kl_and_zero_only_for_equal_logits():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, 10), torch.randn(6, 5, 10)
    expected = F.kl_div(F.log_softmax(student / 3, -1), F.log_softmax(teacher / 3, -1), log_target=True,
                        reduction="none").sum(-1).mean() * 9
    torch.testing.assert_close(soft_target_loss(student, teacher, 3.0), expected)
    assert soft_target_loss(teacher, teacher, 3.0).abs() < 1e-6 < soft_target_loss(student, teacher, 3.0)
    keep = torch.zeros(6, 5, dtype=torch.bool)
    keep[:, :2] = True  # only the first two positions count (frames of an utterance, say)
    torch.testing.assert_close(soft_target_loss(student, teacher, 1.0, keep),
                               soft_target_loss(student[:, :2], teacher[:, :2], 1.0))


@pytest.mark.parametrize("field, value", [("temperature", 0.0), ("weight", 1.5), ("weight", -0.1)])
def test_distill_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=f"distill.{field}"):
        DistillConfig(teacher="t.ckpt", **{field: value})


def saved_vit(path, num_classes: int = 10):
    """A ViT task saved as a weights-only checkpoint (hyper-parameters and state dict)."""
    task = ImageClassificationTask(model=ViTConfig(**{**TINY_VIT.__dict__, "num_classes": num_classes}))
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": to_plain(dict(task.hparams))}, path)
    return task


def test_a_student_equal_to_its_teacher_has_zero_distillation_loss(tmp_path):
    saved_vit(tmp_path / "teacher.ckpt")
    # the student starts from the teacher's own weights, and learns from the teacher alone (weight 1)
    student = ImageClassificationTask(model=TINY_VIT, init_from=str(tmp_path / "teacher.ckpt"),
                                      distill=DistillConfig(teacher=str(tmp_path / "teacher.ckpt"), weight=1.0))
    data = DigitsDataModule(batch_size=16)
    fit = trainer(1)  # setup loads init_from, then one step
    losses = []
    student.on_train_batch_end = lambda outputs, batch, batch_idx: losses.append(float(outputs["loss"]))
    fit.fit(student, datamodule=data)
    assert len(losses) == 1 and abs(losses[0]) < 1e-6
    assert not any(name.startswith("teacher") for name in student.state_dict())  # not in checkpoints


def test_a_student_with_weight_half_mixes_the_two_losses(tmp_path):
    teacher = saved_vit(tmp_path / "teacher.ckpt")
    student = ImageClassificationTask(model=TINY_VIT, distill=DistillConfig(teacher=str(tmp_path / "teacher.ckpt"),
                                                                          temperature=2.0, weight=0.5))
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    student.eval()  # no dropout; the task's step is called directly
    with torch.no_grad():
        loss = student.step((images, labels), "train")
        logits = student.model(images)
        expected = 0.5 * F.cross_entropy(logits, labels) + 0.5 * soft_target_loss(logits, teacher.eval().model(images), 2.0)
    torch.testing.assert_close(loss, expected)


def test_a_teacher_predicting_other_classes_is_an_error_naming_both(tmp_path):
    saved_vit(tmp_path / "teacher12.ckpt", num_classes=12)
    student = ImageClassificationTask(model=TINY_VIT, distill=DistillConfig(teacher=str(tmp_path / "teacher12.ckpt")))
    with pytest.raises(ValueError, match=r"teacher12.ckpt.*\(batch, classes\) are \(4, 12\).*student's \(4, 10\)"):
        student.step((torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))), "train")


def test_a_forecasting_teacher_of_another_horizon_is_an_error_naming_both(tmp_path):
    def patchtst(horizon: int, distill: DistillConfig | None = None) -> PatchTSTTask:
        return PatchTSTTask(model=PatchTSTConfig(lookback=32, horizon=horizon, patch_len=8, stride=8,
                                                 encoder=TransformerConfig(dim=8, depth=1, heads=2)), distill=distill)

    teacher = patchtst(16)
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": to_plain(dict(teacher.hparams))},
               tmp_path / "t.ckpt")
    student = patchtst(8, DistillConfig(teacher=str(tmp_path / "t.ckpt")))
    with pytest.raises(ValueError, match=r"\(batch, horizon, channels\) are \(2, 16, 3\).*student's \(2, 8, 3\)"):
        student.step((torch.randn(2, 32, 3), torch.randn(2, 8, 3)), "train")


def test_speech_frame_level_distillation_from_an_identical_teacher_is_zero(tmp_path):
    from polyformer.domains.speech import SpeechRecognitionTask
    from polyformer.domains.speech.conformer import ConformerConfig
    from polyformer.domains.speech.model import SpeechModelConfig

    config = SpeechModelConfig(subsampling_channels=8, specaugment=None,
                               conformer=ConformerConfig(dim=32, depth=1, heads=2, kernel_size=5, dropout=0.0,
                                                         attn_dropout=0.0))
    teacher = SpeechRecognitionTask(model=config)
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": to_plain(dict(teacher.hparams))},
               tmp_path / "teacher.ckpt")
    student = SpeechRecognitionTask(model=config, distill=DistillConfig(teacher=str(tmp_path / "teacher.ckpt"),
                                                                        weight=1.0))
    student.load_state_dict(teacher.state_dict())
    student.eval()
    batch = {"waveforms": torch.randn(2, 16000) * 0.1, "lengths": torch.tensor([16000, 9000]),
             "transcripts": ["A CAT", "DOG"]}
    with torch.no_grad():
        assert student.step(batch, "train").abs() < 1e-5  # all of the loss is the (zero) distillation term
        student.model.head.weight.add_(0.5 * torch.randn_like(student.model.head.weight))
        assert student.step(batch, "train") > 1e-3  # a student that differs is pulled towards the teacher
