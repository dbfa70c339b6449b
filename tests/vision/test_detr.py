"""DETR on the core: matching, the set loss, 2-D positions, a seeded overfit of one image, and the CLI's fit / test /
predict on a small VOC folder (mAP logged, JSON and pictures written)."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops import box_iou, box_convert

from polyformer.cli import PolyformerCLI
from polyformer.domains.vision.detection.detr import (DETR, DETRConfig, DETRLossConfig, denoising_bias, denoising_loss,
                                            detections, detr_loss, hungarian_match, make_denoising, sine_positions_2d)
from tests.vision.test_detection_data import annotation_xml, voc_folder


def tiny_detr(**overrides) -> DETRConfig:
    settings = dict(num_classes=1, backbone="resnet18", backbone_stride=16, dim=32, heads=4, encoder_depth=1,
                    decoder_depth=2, mlp_ratio=2.0, dropout=0.0, num_queries=5)
    return DETRConfig(**{**settings, **overrides})


def test_hungarian_match_pairs_each_box_with_its_prediction():
    targets = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.2, 0.3]])
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.7, 0.6, 0.2, 0.3], [0.9, 0.9, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]])
    logits = torch.zeros(4, 3)
    queries, indices = hungarian_match(logits, boxes, torch.tensor([0, 1]), targets, DETRLossConfig())
    assert dict(zip(indices.tolist(), queries.tolist())) == {0: 3, 1: 1}
    assert hungarian_match(logits, boxes, torch.zeros(0, dtype=torch.long), targets[:0], DETRLossConfig())[0].numel() == 0


def test_set_loss_is_zero_on_the_boxes_when_predictions_are_exact():
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.2]])}]
    boxes = torch.tensor([[0.4, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]])[None, None]  # (L b q 4)
    logits = torch.tensor([[9.0, -9.0], [-9.0, 9.0]])[None, None]  # query 0: class 0, query 1: no object
    losses = detr_loss(logits, boxes, targets, DETRLossConfig())
    assert losses["l1"].item() == pytest.approx(0, abs=1e-6) and losses["giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["class"].item() < 1e-3
    found = detections(logits[-1], boxes[-1], torch.tensor([[100, 200]]))[0]
    assert found["boxes"][0].tolist() == pytest.approx([60, 40, 100, 60])  # (x0, y0, x1, y1) of a 200×100 image


def test_sine_positions_ignore_padding():
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 3:] = True  # the second image is 4×3, padded to 4×6
    pos = sine_positions_2d(mask, 16)
    assert pos.shape == (2, 4, 6, 16)
    alone = sine_positions_2d(torch.zeros(1, 4, 3, dtype=torch.bool), 16)
    assert torch.allclose(pos[1, :, :3], alone[0])  # the real cells' positions do not see the padding


@pytest.mark.parametrize("queries", ["learned", "anchor"])
def test_detr_overfits_one_image(one_torch_thread, queries):
    torch.manual_seed(0)
    model = DETR(tiny_detr(queries=queries))
    images = torch.randn(1, 3, 64, 64)
    images[:, :, 16:40, 8:32] += 3.0  # a bright square, where the box is
    padding = torch.zeros(1, 64, 64, dtype=torch.bool)
    truth = torch.tensor([[20 / 64, 28 / 64, 24 / 64, 24 / 64]])
    targets = [{"labels": torch.tensor([0]), "boxes": truth}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        losses = detr_loss(*model(images, padding), targets, DETRLossConfig())
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        first = first if first is not None else losses["total"].item()
    assert losses["total"].item() < 0.2 * first
    model.eval()
    with torch.no_grad():
        found = detections(*(t[-1] for t in model(images, padding)), torch.tensor([[64, 64]]))[0]
    best = found["scores"].argmax()
    iou = box_iou(found["boxes"][best][None], box_convert(truth * 64, "cxcywh", "xyxy"))
    assert iou.item() > 0.7 and found["scores"][best] > 0.5


def test_denoising_queries_leave_the_matching_queries_untouched_and_learn(one_torch_thread):
    torch.manual_seed(0)
    model = DETR(tiny_detr(queries="anchor", denoising_groups=3, num_classes=2)).eval()
    images, padding = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    with torch.no_grad():
        logits, boxes = model(images, padding)
        dn_logits, dn_boxes, (extra_logits, extra_boxes, dn) = model.forward_denoising(images, padding, targets)
    assert torch.allclose(logits, dn_logits, atol=1e-5) and torch.allclose(boxes, dn_boxes, atol=1e-5)
    assert extra_boxes.shape == (2, 2, 6, 4) and dn.valid.tolist() == [[True] * 6, [True, False] * 3]
    bias = denoising_bias(5, dn)
    assert torch.isinf(bias[:5, 5:]).all() and (bias[:5, :5] == 0).all()  # matching never sees denoising
    assert (bias[5:7, 5:7] == 0).all() and torch.isinf(bias[5:7, 7:]).all() and (bias[7:, :5] == 0).all()
    assert make_denoising([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
                          model.config, model.label_embed) is None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(60):
        logits, boxes, denoised = model.forward_denoising(images, padding, targets)
        loss = denoising_loss(*denoised, DETRLossConfig())["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.6 * first  # the noised queries (fresh noise every step) learn to give back their boxes and labels
    with pytest.raises(ValueError, match="denoising_groups must be >= 0 and needs queries='anchor'"):
        DETRConfig(denoising_groups=2)


def detection_cli(tmp_path, task: str, init_args: dict, name: str) -> list[str]:
    """A one-image VOC folder (its only image in train and val) and the CLI arguments of `task` (a class of
    detection_task.py) with `init_args` on it."""
    root = voc_folder(tmp_path / "voc", annotation_xml(box=(8, 8, 40, 40)), image_size=(64, 48))
    (root / "ImageSets" / "Main" / "val.txt").write_text("img\n")
    model = json.dumps({"class_path": f"polyformer.domains.vision.detection.task.{task}", "init_args": init_args})
    data = json.dumps({"class_path": "polyformer.domains.vision.detection.data.VOCDetectionDataModule",
                       "init_args": {"root": str(root), "classes": ["cell"], "image_size": 64, "max_size": 96,
                                     "batch_size": 1, "num_workers": 0}})
    return [f"--model={model}", f"--data={data}", f"--run.root={tmp_path / 'runs'}", "--run.domain=vision",
            f"--run.name={name}", "--trainer.enable_progress_bar=false"]


def test_detection_cli_fits_tests_and_predicts(tmp_path, one_torch_thread):
    detr = vars(tiny_detr()) | {"loss": vars(DETRLossConfig())}
    common = detection_cli(tmp_path, "DetectionTask", {"model": detr, "score_threshold": 0.0}, "detr")
    PolyformerCLI(args=["fit", *common, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"])
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    cli = PolyformerCLI(args=["test", *common, f"--ckpt_path={checkpoint}"])
    metrics = cli.trainer.callback_metrics
    assert {"test/map", "test/map50"} <= set(metrics) and 0 <= metrics["test/map50"] <= 1
    cli = PolyformerCLI(args=["predict", *common, f"--ckpt_path={checkpoint}", "--model.init_args.score_threshold=0.3"])
    assert cli.model.score_threshold == 0.3  # the command line's, over the checkpoint's 0.0 (an inference field)
    out = next((tmp_path / "runs").rglob("predictions"))
    record = json.loads((out / "img.json").read_text())
    assert record["image"].endswith("img.jpg") and len(record["detections"]) == 5  # every query, best first
    scores = [d["score"] for d in record["detections"]]
    assert scores == sorted(scores, reverse=True) and (out / "img.png").stat().st_size > 0


def test_detr_config_and_data_mismatch():
    with pytest.raises(ValueError, match="backbone must be"):
        DETRConfig(backbone="vgg")
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_positions_2d(torch.zeros(1, 2, 2, dtype=torch.bool), 6)


@pytest.mark.parametrize("name", ["detr_bccd", "detr_r50_coco"])
def test_detection_configs_instantiate(name, tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "vision" / f"{name}.yaml"
    cli = PolyformerCLI(args=["-c", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1",
                              "--trainer.strategy=auto", "--trainer.precision=32-true",
                              "--model.init_args.model.pretrained_backbone=false", f"--run.root={tmp_path}"], run=False)
    parameters = sum(p.numel() for p in cli.model.parameters())
    low, high = {"detr_bccd": (3e6, 6.25e6), "detr_r50_coco": (3.5e7, 4.5e7)}[name]  # the paper's DETR-R50: 41 M
    assert low < parameters < high  # BCCD: at most 25 MB of fp32 weights


def test_committed_detr_weights_still_load_into_detection_task():
    from pathlib import Path

    from polyformer.domains.vision.detection.task import DetectionTask

    path = Path(__file__).resolve().parents[2] / "weights" / "vision" / "detr_bccd.ckpt"
    task = DetectionTask.load_from_checkpoint(path)
    assert task.model_config.queries == "anchor" and task.model_config.denoising_groups == 5
    images, padding = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        found = task.eval().detect(images, padding, torch.tensor([[64, 96]]))[0]
    assert found["boxes"].shape == (50, 4) and torch.isfinite(found["scores"]).all()


def test_detr_exports_to_onnx_and_matches_eager(tmp_path):
    from polyformer.domains.vision.detection.task import DetectionTask

    torch.manual_seed(0)
    task = DetectionTask(tiny_detr(), export_size=(64, 96)).eval()
    exportable = task.exportable()
    assert "softmax" in exportable.description
    onnx = exportable.export(tmp_path / "detr.onnx", "onnx")
    for inputs in exportable.check_inputs():  # batches 1, 3 and 8 against the graph exported at batch 2
        with torch.no_grad():
            eager = exportable.module(*inputs)
        assert eager[0].shape == (len(inputs[0]), 5, 2) and eager[1].shape == (len(inputs[0]), 5, 4)
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(eager, onnx(*inputs)))


def test_positioned_blocks_are_the_core_blocks_with_positions_on_queries_and_keys():
    """DETR's stacks hold the core's parameters; with zero positions they compute what the core's stacks compute,
    and the decoder gives every layer's output (through the final norm), the last the core decoder's output."""
    from polyformer.domains.vision.detection.detr import PositionedDecoder, PositionedEncoder
    from polyformer.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder

    torch.manual_seed(0)
    config = TransformerConfig(dim=16, depth=3, heads=4)
    x, memory, mask = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    ours, core = PositionedEncoder(config).eval(), TransformerEncoder(config).eval()
    core.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(memory, torch.zeros_like(memory), key_padding_mask=mask),
                               core(memory, key_padding_mask=mask))
    ours, core = PositionedDecoder(config).eval(), TransformerDecoder(config).eval()
    core.load_state_dict(ours.state_dict())
    layers = ours(x, memory, torch.zeros_like(x), torch.zeros_like(memory), memory_padding_mask=mask)
    assert layers.shape == (3, 2, 5, 16)
    torch.testing.assert_close(layers[-1], core(x, memory, memory_padding_mask=mask))
    pos = torch.randn(2, 5, 16)
    assert not torch.allclose(ours(x, memory, pos, torch.zeros_like(memory))[-1], layers[-1])



def test_distillation_adds_the_set_loss_on_the_teachers_confident_detections(tmp_path):
    """distill: the student's set loss against the teacher's last-layer detections scoring at least the threshold,
    mixed into the total; the teacher stays out of the student's state dict; a teacher of other classes is refused."""
    from polyformer.checkpoint import to_plain
    from polyformer.domains.vision.detection.task import DetectionDistillConfig, DetectionTask, last_layer

    torch.manual_seed(0)
    teacher = DetectionTask(tiny_detr()).eval()
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": to_plain(dict(teacher.hparams))}, path)
    distill = DetectionDistillConfig(teacher=str(path), score_threshold=0.3, weight=0.25)
    student = DetectionTask(tiny_detr(), distill=distill)
    images, padding = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
                "orig_size": torch.tensor([64, 64])} for _ in range(2)]
    torch.manual_seed(1)
    terms, _ = student.losses(images, padding, targets, train=True)
    with torch.no_grad():
        logits, boxes = last_layer(teacher.model(images, padding))
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    pseudo = [{"boxes": boxes[i][s >= 0.3], "labels": labels[i][s >= 0.3]} for i, s in enumerate(scores)]
    assert terms["teacher_boxes"] == sum(len(p["labels"]) for p in pseudo) / 2
    torch.manual_seed(1)
    student_logits, student_boxes = student.model(images, padding)
    expected = student.set_loss(student_logits, student_boxes, pseudo)
    task_only = detr_loss(student_logits, student_boxes, targets, student.model_config.loss)["total"]
    torch.testing.assert_close(terms["distill"], expected)
    torch.testing.assert_close(terms["total"], 0.75 * task_only + 0.25 * expected)
    assert not any(key.startswith("teacher") for key in student.state_dict())
    other = DetectionTask(tiny_detr(num_classes=3), distill=distill)
    with pytest.raises(ValueError, match=r"the teacher's outputs \(classes,\) per query are \(2,\), the student's "
                                         r"\(4,\)"):
        other.losses(images, padding, targets, train=True)
