"""Deformable DETR with DINO's training: contrastive denoising queries, the query groups' attention bias, focal
matching and losses, a seeded overfit of one image, inputs that are small, empty or on the border, ONNX export, and
the CLI's fit / test / predict on a small VOC folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from polyformer.cli import PolyformerCLI
from polyformer.domains.vision.detection.backbones import BackboneConfig
from polyformer.domains.vision.detection.deformable_detr import (DeformableDETR, DeformableDETRConfig, SetLossConfig,
                                                       detection_loss, focal_match, make_denoising, query_bias,
                                                       set_loss, top_detections)
from polyformer.domains.vision.detection.task import DeformableDetectionTask
from tests.vision.test_detr import detection_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vision"


def tiny(**overrides) -> DeformableDETRConfig:
    settings = dict(num_classes=2, backbone=BackboneConfig(pretrained=False), dim=64, heads=4, levels=4, points=2,
                    encoder_depth=1, decoder_depth=2, mlp_ratio=2.0, num_queries=6, denoising_queries=6,
                    one_to_many_queries=8, one_to_many_k=2)
    return DeformableDETRConfig(**{**settings, **overrides})


def targets_of(*boxes_and_labels) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}
            for boxes, labels in boxes_and_labels]


def test_contrastive_denoising_noises_negatives_more_than_positives():
    torch.manual_seed(0)
    config = tiny(denoising_queries=200)
    embed = torch.nn.Embedding(2, 64)
    targets = targets_of(([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]], [0, 1]), ([[0.5, 0.5, 0.4, 0.4]], [1]))
    dn = make_denoising(targets, config, embed)  # 200 queries: 50 groups of 2 boxes, positive and negative
    assert dn.groups == 50 and dn.boxes.shape == (2, 200, 4) and dn.content.shape == (2, 200, 64)
    assert dn.positive.sum() == 150 and dn.negative.sum() == 150  # 3 real boxes × 50 groups each
    assert not dn.positive[1, 1::2].any()  # the second image's padding slot is neither
    iou = box_iou(box_convert(dn.boxes[0], "cxcywh", "xyxy"), box_convert(dn.target_boxes[0], "cxcywh", "xyxy"))
    iou = iou.diagonal()
    assert iou[dn.positive[0]].mean() > 0.5 > iou[dn.negative[0]].mean()
    assert ((dn.boxes >= 0) & (dn.boxes <= 1)).all()
    assert dn.labels[0, :4].tolist() == [0, 1, 0, 1]  # the true labels, whatever noise the content's had
    empty = targets_of(([], []))
    assert make_denoising(empty, config, embed) is None


def test_query_bias_hides_the_branches_from_each_other():
    bias = query_bias(2, 3, [1, 2], torch.device("cpu"))  # [one-to-one 2 | one-to-many 3 | denoising 1, 2]
    seen = bias == 0
    assert seen.shape == (8, 8)
    assert seen[:2, :2].all() and not seen[:2, 2:].any()  # one-to-one: itself only
    assert seen[2:5, 2:5].all() and not seen[2:5, :2].any() and not seen[2:5, 5:].any()  # one-to-many: itself
    assert seen[5, :2].all() and seen[5, 5] and not seen[5, 2:5].any() and not seen[5, 6:].any()  # a group
    assert seen[6:, 6:].all() and seen[6:, :2].all() and not seen[6:, 2:6].any()


def test_look_forward_twice_reaches_one_layer_back():
    torch.manual_seed(0)
    model = DeformableDETR(tiny(decoder_depth=3, denoising_queries=0, one_to_many_queries=0))
    for layer in model.box_head.layers:  # non-zero offsets, so that the boxes depend on every layer's output
        torch.nn.init.normal_(layer.weight, std=0.1)
    images, padding = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    memory, mask, shapes, ratios = model.encode(images, padding)
    content, anchors, _ = model.queries(memory, mask, shapes, ratios, 6)
    outputs = []
    original = model.decoder_norm.forward
    model.decoder_norm.forward = lambda x: outputs.append(original(x)) or outputs[-1]
    _, boxes = model.decode(content, anchors, memory, mask, shapes, ratios, None)
    last = torch.autograd.grad(boxes[-1].sum(), outputs, allow_unused=True, retain_graph=True)
    assert last[0] is None or last[0].abs().max() == 0  # two layers back: no gradient
    assert last[1].abs().max() > 0 and last[2].abs().max() > 0  # the previous layer and its own


def test_focal_matching_pairs_boxes_and_exact_predictions_cost_nothing():
    truth = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.2, 0.3]])
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.7, 0.6, 0.2, 0.3], [0.9, 0.9, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]])
    queries, indices = focal_match(torch.zeros(4, 2), boxes, torch.tensor([0, 1]), truth, SetLossConfig())
    assert dict(zip(indices.tolist(), queries.tolist())) == {0: 3, 1: 1}
    logits = torch.full((1, 1, 4, 2), -9.0)
    logits[0, 0, 3, 0] = logits[0, 0, 1, 1] = 9.0
    terms = set_loss(logits, boxes[None, None], targets_of((truth.tolist(), [0, 1])), SetLossConfig())
    assert terms["l1"].item() == pytest.approx(0, abs=1e-6) and terms["giou"].item() == pytest.approx(0, abs=1e-6)
    assert terms["class"].item() < 1e-3
    repeated = set_loss(logits, boxes[None, None], targets_of((truth.tolist(), [0, 1])), SetLossConfig(), repeat=2)
    assert repeated["l1"].item() > 0  # four targets for four queries: two matched to other boxes
    found = top_detections(logits[0], boxes[None], torch.tensor([[100, 200]]), keep=2)[0]
    assert found["labels"].tolist() in ([0, 1], [1, 0]) and found["scores"].min() > 0.99
    assert found["boxes"].shape == (2, 4)


def test_training_adds_the_branches_that_are_on_and_inference_drops_them():
    torch.manual_seed(0)
    model = DeformableDETR(tiny())
    images, padding = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, :, 96:] = True
    targets = targets_of(([[0.3, 0.3, 0.2, 0.2]], [0]), ([[0.5, 0.5, 0.4, 0.4], [0.2, 0.7, 0.1, 0.1]], [1, 0]))
    out = model(images, padding, targets)
    assert out.logits.shape == (2, 2, 6, 2) and out.boxes.shape == (2, 2, 6, 4)
    assert out.encoder[0].shape == (2, 6, 2) and out.one_to_many[0].shape == (2, 2, 8, 2)
    assert out.denoising[0].shape[2] == out.denoising[2].boxes.shape[1]
    terms = detection_loss(out, targets, model.config)
    assert {"class", "l1", "giou", "encoder", "one_to_many", "denoising", "total"} <= set(terms)
    terms["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        plain = model(images, padding)
        again = model(images, padding)
    assert plain.one_to_many is None and plain.denoising is None
    # the one-to-many and denoising queries never reach the one-to-one queries
    with torch.no_grad():
        trained = model(images, padding, targets)
    assert torch.allclose(trained.boxes, plain.boxes, atol=1e-5) and torch.allclose(plain.logits, again.logits)


@pytest.mark.parametrize("pieces", [{}, {"two_stage": False, "mixed_query": False},
                                    {"box_refine": False, "look_forward_twice": False},
                                    {"mixed_query": False}])
def test_every_ablation_overfits_one_image(pieces):
    torch.manual_seed(0)
    model = DeformableDETR(tiny(num_classes=1, **pieces))
    images = torch.randn(1, 3, 64, 64) * 0.3
    images[:, :, 16:40, 8:32] += 2.0  # a bright square, where the box is
    padding = torch.zeros(1, 64, 64, dtype=torch.bool)
    truth = torch.tensor([[20 / 64, 28 / 64, 24 / 64, 24 / 64]])
    targets = [{"labels": torch.tensor([0]), "boxes": truth}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(120):
        terms = detection_loss(model(images, padding, targets), targets, model.config)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(images, padding)
    found = top_detections(out.logits[-1], out.boxes[-1], torch.tensor([[64, 64]]), keep=1)[0]
    iou = box_iou(found["boxes"], box_convert(truth * 64, "cxcywh", "xyxy"))
    assert iou.item() > 0.7 and found["scores"].item() > 0.5


def test_small_images_empty_images_and_border_boxes():
    torch.manual_seed(0)
    model = DeformableDETR(tiny(num_queries=30))
    # 20×24 pixels: one cell at stride 32 and 64, fewer cells in all (3·3 + 2·2 + 1 + 1) than the 38 queries
    images, padding = torch.randn(2, 3, 20, 24), torch.zeros(2, 20, 24, dtype=torch.bool)
    padding[0, 12:, :] = True
    targets = targets_of(([], []), ([[0.02, 0.5, 0.04, 1.0], [0.99, 0.99, 0.02, 0.02]], [0, 1]))
    out = model(images, padding, targets)
    terms = detection_loss(out, targets, model.config)
    assert all(torch.isfinite(value) for value in terms.values())
    terms["total"].backward()
    model.eval()
    with torch.no_grad():
        out = model(images, padding)
    found = top_detections(out.logits[-1], out.boxes[-1], torch.tensor([[12, 24], [20, 24]]))
    assert all(torch.isfinite(f["boxes"]).all() for f in found)
    # no image of the batch has a box: every query learns "no object", nothing else
    empty = targets_of(([], []), ([], []))
    terms = detection_loss(DeformableDETR(tiny())(images, padding, empty), empty, model.config)
    assert torch.isfinite(terms["total"]) and "denoising" not in terms


def test_config_rejects_impossible_combinations():
    with pytest.raises(ValueError, match="mixed_query .* needs two_stage=True"):
        tiny(two_stage=False)
    with pytest.raises(ValueError, match="look_forward_twice .* needs box_refine=True"):
        tiny(box_refine=False)
    with pytest.raises(ValueError, match="levels \\(2\\) must be at least the backbone's 3 maps"):
        tiny(levels=2)
    with pytest.raises(ValueError, match="dim must be a multiple of 32"):
        tiny(dim=32)


def test_export_to_onnx_matches_eager(tmp_path):
    torch.manual_seed(0)
    task = DeformableDetectionTask(tiny(), export_size=(64, 96)).eval()
    exportable = task.exportable()
    onnx = exportable.export(tmp_path / "detector.onnx", "onnx")
    for inputs in exportable.check_inputs():  # batches 1, 3 and 8 against the graph exported at batch 2
        with torch.no_grad():
            eager = exportable.module(*inputs)
        exported = onnx(*inputs)
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(eager, exported))


def test_deformable_detection_cli_fits_tests_and_predicts(tmp_path):
    detector = vars(tiny(num_classes=1)) | {"backbone": vars(BackboneConfig(pretrained=False)),
                                            "loss": vars(SetLossConfig())}
    common = detection_cli(tmp_path, "DeformableDetectionTask", {"model": detector, "score_threshold": 0.0},
                           "deformable")
    PolyformerCLI(args=["fit", *common, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"])
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    metrics = PolyformerCLI(args=["test", *common, f"--ckpt_path={checkpoint}"]).trainer.callback_metrics
    assert {"test/map", "test/map50", "test/encoder", "test/class"} <= set(metrics)
    assert "test/denoising" not in metrics  # a training-only branch
    PolyformerCLI(args=["predict", *common, f"--ckpt_path={checkpoint}"])
    out = next((tmp_path / "runs").rglob("predictions"))
    record = json.loads((out / "img.json").read_text())
    assert len(record["detections"]) == 6 and (out / "img.png").stat().st_size > 0  # 6 queries × 1 class


def test_bccd_config_instantiates_within_the_weights_budget(tmp_path):
    cli = PolyformerCLI(args=["-c", str(CONFIGS / "deformable_detr_bccd.yaml"), "--trainer.accelerator=cpu",
                              f"--run.root={tmp_path}"], run=False)
    assert isinstance(cli.model, DeformableDetectionTask)
    parameters = sum(p.numel() for p in cli.model.parameters()) + sum(b.numel() for b in cli.model.buffers())
    assert 4e6 < parameters < 25 * 2**20 / 4  # under 25 MB of fp32 weights


def test_distillation_from_a_deformable_teacher_trains_on_its_sigmoid_detections(tmp_path):
    """distill on Deformable DETR: the teacher's queries scoring at least the threshold (sigmoid) are the second
    target set (an untrained head scores about 0.01: focal loss's prior); the distillation term back-propagates into the student only."""
    from polyformer.checkpoint import to_plain
    from polyformer.domains.vision.detection.task import DetectionDistillConfig

    torch.manual_seed(0)
    teacher = DeformableDetectionTask(tiny()).eval()
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": to_plain(dict(teacher.hparams))}, path)
    student = DeformableDetectionTask(tiny(), distill=DetectionDistillConfig(teacher=str(path), score_threshold=0.005))
    images, padding = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    targets = [{**t, "orig_size": torch.tensor([96, 128])} for t in targets_of(([[0.3, 0.3, 0.2, 0.2]], [0]),
                                                                               ([[0.5, 0.5, 0.4, 0.4]], [1]))]
    terms, _ = student.losses(images, padding, targets, train=True)
    with torch.no_grad():
        confident = (teacher.model(images, padding).logits[-1].sigmoid().max(-1).values >= 0.005).sum(1)
    assert terms["teacher_boxes"] == confident.float().mean() and terms["teacher_boxes"] > 0
    assert torch.isfinite(terms["distill"]) and terms["distill"] > 0
    terms["total"].backward()
    assert all(p.grad is None for p in student.teacher.model.parameters())
