"""Detection benchmark: Deformable DETR with DINO's training on an ImageNet EfficientNet-Lite0 against torchvision's
Faster R-CNN on the same backbone, on the BCCD blood-cell images; both again from random weights; an ablation of
the detector's pieces; seeds; latency; the deformable attention's and Swin's parity with their references.

    python scripts/bench_detection.py [--quick] [--json PATH] [--out DIR] [--minutes 60] [--ablation-minutes 20]
                                      [--parts pair scratch ablation seeds latency] [--seeds 1 2] [--jobs 2]
                                      [--rows all no_one_to_many ...] [--reuse]

Parts (each run recorded in DIR; --reuse reads a finished one instead of rerunning it):
- pair: `polyformer fit -c configs/vision/deformable_detr_bccd.yaml` (max_time --minutes), then `polyformer test` of
  its best-validation checkpoint on val (BCCD's test images are not in the shared copy), beside the peer —
  domains/vision/faster_rcnn.py's Faster R-CNN on the same pre-trained backbone config (frozen BatchNorm, strides
  8/16/32) — trained at the same time for the same wall time on the same data module (images, augmentation,
  resolution, batch), each with one torch thread; the peer evaluated on val as often as ours is (the config's
  check_val_every_n_epoch), best and last reported; ours' best checkpoint is written weights-only to DIR/weights/.
- scratch: the same pair from random weights (backbone.pretrained false, BatchNorm trained, backbone at the full
  learning rate on both sides).
- ablation: the detector with one piece turned off at a time (and with all on), --ablation-minutes each (the
  config's epochs scaled by --ablation-minutes / --minutes, validated every epoch), --jobs at a time; val mAP@.5 of
  each best checkpoint.
- seeds: the pair's recipe on ours again at --seeds (the pair's run is seed 0): mean ± std of val mAP@.5.
- latency: batch 1 on one thread, a val image at 384×512: ours eager, ours through ONNX (polyformer's export,
  onnxruntime) and the peer eager, alternating, medians of 20; ONNX's largest |Δ| to eager on that image.
Every part also reports the deformable attention against Hugging Face's DeformableDetrMultiscaleDeformableAttention
and Swin against timm (copied weights, largest |Δ|). --quick: a few batches of everything, the first ablation row and
seed only (checks the script, not a result).

--json keys: val_map50, val_map, val_map50_last, val_map_last, train_minutes, checkpoint, config (ours, pre-trained);
peer_val_map50, peer_val_map, peer_val_map50_last, peer_val_map_last, peer_minutes (and peer_epochs, peer_steps,
peer_history); scratch_val_map50, scratch_val_map, scratch_peer_val_map50, scratch_peer_val_map; ablation (piece →
val mAP@.5); seeds ({runs: seed → val mAP@.5, mean, std}); latency_ms (ours_eager, ours_onnx, peer_eager);
onnx_max_abs_diff; params (ours, peer); deform_attn_max_abs_diff; swin_timm_max_abs_diff.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import timm
import torch
import yaml
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert
from transformers import DeformableDetrConfig
from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrMultiscaleDeformableAttention

from polyformer.cli import datamodule_from
from polyformer.deformable import MultiScaleDeformableAttention
from polyformer.domains.vision.detection.backbones import BackboneConfig
from polyformer.domains.vision.detection.data import IMAGENET_MEAN, IMAGENET_STD, VOCDetectionDataModule
from polyformer.domains.vision.detection.task import DeformableDetectionTask, pixel_boxes
from polyformer.domains.vision.detection.faster_rcnn import faster_rcnn
from polyformer.domains.vision.swin import SwinTransformer
from polyformer.bench import QUICK, bench_parser, evaluate, finished, fit, last_value, recorded, run_dir, write_json
from polyformer.checkpoint import save_weights
from polyformer.data import PROJECT_ROOT as ROOT

CONFIG = ROOT / "configs" / "vision" / "deformable_detr_bccd.yaml"
CONFIG_YAML = yaml.safe_load(CONFIG.read_text())
DETECTOR = "--model.init_args.model."
SCRATCH = [f"{DETECTOR}backbone.pretrained=false", f"{DETECTOR}backbone.frozen_bn=false",
           "--model.init_args.backbone_lr_scale=1.0"]
# each piece turned off (with what depends on it): the ablation's rows, beside "all" (the config as it is)
ABLATION = {
    "all": [],
    "no_one_to_many": [f"{DETECTOR}one_to_many_queries=0"],
    "no_denoising": [f"{DETECTOR}denoising_queries=0"],
    "no_mixed_query": [f"{DETECTOR}mixed_query=false"],  # two-stage content from the encoder too (pure selection)
    "no_two_stage": [f"{DETECTOR}two_stage=false", f"{DETECTOR}mixed_query=false"],
    "no_box_refine": [f"{DETECTOR}box_refine=false", f"{DETECTOR}look_forward_twice=false"],
}


def swin_parity() -> float:
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    model.head.fc.weight.data.mul_(20)
    ours = SwinTransformer.from_timm(model).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return (ours(images) - model(images)).abs().max().item()


def deformable_parity() -> float:
    """Our MultiScaleDeformableAttention against Hugging Face's with copied (random, non-zero) weights, on two sets
    of level shapes with and without padding; the largest |output difference|."""
    worst = 0.0
    for shapes in ([(12, 16), (6, 8), (3, 4), (2, 2)], [(9, 7), (5, 4), (3, 2), (1, 1)]):
        for padded in (False, True):
            torch.manual_seed(len(shapes) + padded)
            dim, heads, levels, points, b, q = 64, 8, len(shapes), 4, 2, 11
            config = DeformableDetrConfig(d_model=dim, encoder_attention_heads=heads, num_feature_levels=levels,
                                          encoder_n_points=points, disable_custom_kernels=True)
            theirs = DeformableDetrMultiscaleDeformableAttention(config, num_heads=heads, n_points=points).eval()
            with torch.no_grad():
                for parameter in theirs.parameters():
                    parameter.normal_(0, 0.2)
            ours = MultiScaleDeformableAttention(dim, heads=heads, levels=levels, points=points).eval()
            ours.load_state_dict(theirs.state_dict())
            m = sum(h * w for h, w in shapes)
            query, value = torch.randn(b, q, dim), torch.randn(b, m, dim)
            reference = torch.rand(b, q, levels, 2)
            mask = torch.zeros(b, m, dtype=torch.bool)
            if padded:
                mask[1, m // 2:] = True
            shape_tensor = torch.tensor(shapes)
            start = torch.cat((shape_tensor.new_zeros(1), shape_tensor.prod(1).cumsum(0)[:-1]))
            with torch.no_grad():
                expected = theirs(hidden_states=query, attention_mask=~mask, encoder_hidden_states=value,
                                  reference_points=reference, spatial_shapes=shape_tensor,
                                  spatial_shapes_list=shapes, level_start_index=start)[0]
                found = ours(query, reference, value, shapes, mask)
            worst = max(worst, (found - expected).abs().max().item())
    return worst


def train_ours(out: Path, name: str, extra: list[str], quick: bool, reuse: bool) -> dict:
    """Fit (its max_time as configured, or cut by `extra`), test the best checkpoint on val, weights-only copy."""
    folder = run_dir(out, CONFIG, name)
    extra = extra + (QUICK if quick else [])

    def fit_and_test() -> dict:
        fitted = fit([CONFIG], out, name, extra)
        evaluate("test", [CONFIG], out, name, extra, fitted.checkpoint("best"))
        digest = save_weights(fitted.checkpoint("best"), out / "weights" / f"{name}.ckpt")
        print(f"{out / 'weights' / f'{name}.ckpt'}: sha256 {digest}", flush=True)
        return {"minutes": fitted.seconds / 60, "sha256": digest}

    fitted = recorded(out / f"{name}.json", reuse, fit_and_test, done=finished(folder, "test/map50") is not None)
    return {"val_map50": last_value(folder, "test/map50"), "val_map": last_value(folder, "test/map"),
            "val_map50_last": last_value(folder, "val/map50"), "val_map_last": last_value(folder, "val/map"),
            "train_minutes": fitted["minutes"]}


def peer_targets(images: torch.Tensor, targets: list[dict]) -> list[dict]:
    """Our normalised (cx, cy, w, h) targets as torchvision's: (x0, y0, x1, y1) pixels of the image it is given,
    labels shifted by one (0 is torchvision's background)."""
    converted = []
    for image, target in zip(images, targets):
        height, width = image.shape[-2:]
        scale = target["boxes"].new_tensor([width, height, width, height])
        converted.append({"boxes": box_convert(target["boxes"], "cxcywh", "xyxy") * scale,
                          "labels": target["labels"] + 1})
    return converted


def unpadded(images: torch.Tensor, padding: torch.Tensor) -> list[torch.Tensor]:
    """The batch's images without their padding, un-normalised to [0, 1] (torchvision's detector normalises)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    out = []
    for image, pad in zip(images, padding):
        height, width = int((~pad[:, 0]).sum()), int((~pad[0]).sum())
        out.append(image[:, :height, :width] * std + mean)
    return out


def evaluate_peer(model, data: VOCDetectionDataModule, quick: bool) -> dict:
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    model.eval()
    with torch.no_grad():
        for index, (images, padding, targets) in enumerate(data.val_dataloader()):
            if quick and index == 2:
                break
            found = model(unpadded(images, padding))
            for image, result, target in zip(unpadded(images, padding), found, targets):
                height, width = image.shape[-2:]
                orig_h, orig_w = target["orig_size"].tolist()
                scale = result["boxes"].new_tensor([orig_w / width, orig_h / height, orig_w / width, orig_h / height])
                metric.update([{"boxes": result["boxes"] * scale, "scores": result["scores"],
                                "labels": result["labels"] - 1}],
                              [{"boxes": pixel_boxes(target), "labels": target["labels"]}])
    model.train()
    results = metric.compute()
    return {"map50": float(results["map_50"]), "map": float(results["map"])}


def config_data(**overrides) -> VOCDetectionDataModule:
    """The detector config's data module (BCCD, its resolution and batch), `overrides` replacing its settings."""
    data = CONFIG_YAML["data"]
    return datamodule_from({**data, "init_args": {**data["init_args"], **overrides}})


def peer_backbone(pretrained: bool) -> BackboneConfig:
    """Ours' backbone config (as the detector config has it), pre-trained or from random weights."""
    settings = CONFIG_YAML["model"]["init_args"]["model"]["backbone"]
    return BackboneConfig(**{**settings, "pretrained": pretrained, "frozen_bn": settings["frozen_bn"] and pretrained,
                             "strides": tuple(settings["strides"])})


def train_peer(minutes: float, quick: bool, pretrained: bool, weights: Path) -> dict:
    """torchvision's Faster R-CNN on ours' backbone and data module for `minutes` of wall time, evaluated on val as
    often as ours; its last weights saved to `weights` (for the latency part). The recipe is torchvision's detection
    reference (SGD 0.02 at 16 images a batch, momentum 0.9, weight decay 1e-4, linear warm-up) scaled linearly to
    our batch, warm-up shortened to 100 steps for an hour's ~500; gradient norm clipped at 10. A non-finite loss
    stops it, naming the step."""
    torch.manual_seed(0)
    data = config_data()
    data.setup("fit")
    model = faster_rcnn(peer_backbone(pretrained), data.num_classes, min_size=data.image_size, max_size=data.max_size)
    lr = 0.02 * data.batch_size / 16
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    every = 1 if quick else CONFIG_YAML["trainer"]["check_val_every_n_epoch"]
    start, best, epochs, steps, history = time.perf_counter(), {"map50": 0.0, "map": 0.0}, 0, 0, []
    out_of_time = False
    while not out_of_time:
        batches = 0
        for index, (images, padding, targets) in enumerate(data.train_dataloader()):
            if out_of_time := time.perf_counter() - start >= minutes * 60 or (quick and index == 3):
                break
            losses = model(unpadded(images, padding), peer_targets(images, targets))
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise SystemExit(f"peer: non-finite loss at step {steps} (epoch {epochs}): "
                                 f"{ {name: value.item() for name, value in losses.items()} }")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            warmup.step()
            steps, batches = steps + 1, batches + 1
        # an epoch the clock cuts short still ends with its scheduled evaluation, as under Lightning's max_time
        # (and a run too short for any scheduled one is evaluated once at the end)
        if batches and (epochs + 1) % every == 0 or (out_of_time and not history):
            scores = {"epoch": epochs + 1, **evaluate_peer(model, data, quick)}
            history.append(scores)
            best = max(best, scores, key=lambda s: s["map50"])
            print(f"peer epoch {epochs + 1}: val mAP@.5 {scores['map50']:.3f}, mAP {scores['map']:.3f}", flush=True)
        epochs += 0 if out_of_time else 1
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    return {"peer_val_map50": best["map50"], "peer_val_map": best["map"], "peer_val_map50_last": history[-1]["map50"],
            "peer_val_map_last": history[-1]["map"], "peer_lr": lr, "peer_epochs": epochs, "peer_steps": steps,
            "peer_minutes": (time.perf_counter() - start) / 60, "peer_history": history}


def pair(out: Path, name: str, extra: list[str], minutes: float, quick: bool, reuse: bool, pretrained: bool
         ) -> dict:
    """Ours (a subprocess) and the peer (here) at once, a core each, the same wall time."""
    clock = [] if quick else [f"--trainer.max_time=00:00:{int(minutes):02d}:00"]
    with ThreadPoolExecutor(1) as pool:
        ours = pool.submit(train_ours, out, name, extra + clock, quick, reuse)
        figures = recorded(out / f"{name}_peer.json", reuse,
                           lambda: train_peer(minutes, quick, pretrained, out / "weights" / f"{name}_peer.pt"))
        return {**figures, **ours.result()}


def median_ms(function, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*inputs)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def latency(out: Path, name: str, quick: bool) -> dict:
    """Batch 1, one thread, a val image: ours eager and through ONNX, the peer eager; alternating rounds."""
    for weights in (out / "weights" / f"{name}.ckpt", out / "weights" / f"{name}_peer.pt"):
        if not weights.is_file():
            raise SystemExit(f"latency: {weights} is missing: it times the pair's trained models, so run "
                             f"--parts pair first (with the same --out)")
    task = DeformableDetectionTask.load_from_checkpoint(out / "weights" / f"{name}.ckpt").eval()
    data = config_data(batch_size=1, num_workers=0)
    data.setup("validate")
    images, padding, _ = next(iter(data.val_dataloader()))
    height, width = task.export_size
    images = torch.nn.functional.pad(images, (0, width - images.shape[-1], 0, height - images.shape[-2]))
    padding = torch.nn.functional.pad(padding, (0, width - padding.shape[-1], 0, height - padding.shape[-2]),
                                      value=True)
    exportable = task.exportable()
    with tempfile.TemporaryDirectory() as folder:
        onnx = exportable.export(Path(folder) / "detector.onnx", "onnx")
        peer = faster_rcnn(peer_backbone(True), task.num_classes, min_size=data.image_size, max_size=data.max_size)
        peer.load_state_dict(torch.load(out / "weights" / f"{name}_peer.pt", weights_only=True))
        peer.eval()
        peer_inputs = (unpadded(images, padding),)
        with torch.no_grad():
            eager = exportable.module(images, padding)
            exported = onnx(images, padding)
            difference = max((a - b).abs().max().item() for a, b in zip(eager, exported))
            times = {"ours_eager": [], "ours_onnx": [], "peer_eager": []}
            sides = {"ours_eager": (exportable.module, (images, padding)), "ours_onnx": (onnx, (images, padding)),
                     "peer_eager": (peer, peer_inputs)}
            for function, inputs in sides.values():  # warm-up
                function(*inputs)
            for round_ in range(2 if quick else 10):
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for key in order:
                    times[key].append(median_ms(*sides[key], repeats=2))
    return {"latency_ms": {key: statistics.median(values) for key, values in times.items()},
            "onnx_max_abs_diff": difference}


def parameters(out: Path, name: str) -> dict:
    task = DeformableDetectionTask.load_from_checkpoint(out / "weights" / f"{name}.ckpt")
    data = config_data()
    peer = faster_rcnn(peer_backbone(True), task.num_classes, min_size=data.image_size, max_size=data.max_size)
    return {"ours": sum(p.numel() for p in task.model.parameters()),
            "peer": sum(p.numel() for p in peer.parameters())}


def main() -> None:
    parser = bench_parser(__doc__.split("\n")[0], ROOT / "bench_out" / "detection")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time of each side of a pair")
    parser.add_argument("--ablation-minutes", type=float, default=20.0, help="training time of each ablation row")
    parser.add_argument("--parts", nargs="+", default=["pair", "scratch", "ablation", "seeds", "latency"],
                        choices=["pair", "scratch", "ablation", "seeds", "latency"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds beside the pair's seed 0")
    parser.add_argument("--jobs", type=int, default=2, help="ablation and seed runs at a time (one thread each)")
    parser.add_argument("--rows", nargs="+", default=list(ABLATION), choices=list(ABLATION),
                        help="the ablation's rows (all: every piece on)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {"deform_attn_max_abs_diff": deformable_parity(), "swin_timm_max_abs_diff": swin_parity()}
    print(f"deformable attention vs Hugging Face: max |Δ| {figures['deform_attn_max_abs_diff']:.2e}; "
          f"Swin vs timm: {figures['swin_timm_max_abs_diff']:.2e}", flush=True)
    out, quick, reuse = args.out, args.quick, args.reuse
    if quick:  # every code path once: the first ablation row and seed
        args.rows, args.seeds = args.rows[:1], args.seeds[:1]
    if "pair" in args.parts:
        figures.update(pair(out, "deformable_detr_bccd", [], args.minutes, quick, reuse, pretrained=True))
        figures["params"] = parameters(out, "deformable_detr_bccd")
    if "scratch" in args.parts:
        scratch = pair(out, "deformable_detr_bccd_scratch", SCRATCH, args.minutes, quick, reuse, pretrained=False)
        figures.update({f"scratch_{key}": scratch[key] for key in ("val_map50", "val_map")})
        figures.update({f"scratch_{key}": scratch[key] for key in ("peer_val_map50", "peer_val_map")})
    # an ablation row's schedule is the config's, shortened in proportion to its time, so that its cosine ends too
    epochs = max(1, round(CONFIG_YAML["trainer"]["max_epochs"] * args.ablation_minutes / args.minutes))
    clock = [] if quick else [f"--trainer.max_time=00:00:{int(args.ablation_minutes):02d}:00",
                              f"--trainer.max_epochs={epochs}", "--trainer.check_val_every_n_epoch=1"]
    with ThreadPoolExecutor(args.jobs) as pool:
        if "ablation" in args.parts:
            rows = {piece: pool.submit(train_ours, out, f"ablation_{piece}", ABLATION[piece] + clock, quick, reuse)
                    for piece in args.rows}
            figures["ablation"] = {piece: row.result()["val_map50"] for piece, row in rows.items()}
            figures["ablation_minutes"] = args.ablation_minutes
        if "seeds" in args.parts:
            clock_pair = [] if quick else [f"--trainer.max_time=00:00:{int(args.minutes):02d}:00"]
            runs = {seed: pool.submit(train_ours, out, f"deformable_detr_bccd_seed{seed}",
                                      [f"--seed_everything={seed}"] + clock_pair, quick, reuse)
                    for seed in args.seeds}
            values = {seed: run_.result()["val_map50"] for seed, run_ in runs.items()}
            if "val_map50" in figures:
                values = {0: figures["val_map50"], **values}
            figures["seeds"] = {"runs": values, "mean": statistics.mean(values.values()),
                                "std": statistics.stdev(values.values()) if len(values) > 1 else 0.0}
    if "latency" in args.parts:
        figures.update(recorded(out / "latency.json", reuse, lambda: latency(out, "deformable_detr_bccd", quick)))
    figures.update({"checkpoint": "weights/vision/deformable_detr_bccd.ckpt", "config": str(CONFIG.relative_to(ROOT)),
                    "quick": quick})
    for key in ("val_map50", "val_map", "peer_val_map50", "peer_val_map", "scratch_val_map50",
                "scratch_peer_val_map50", "ablation", "seeds", "latency_ms"):
        if key in figures:
            print(f"{key}: {figures[key]}")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
