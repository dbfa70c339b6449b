"""Detection benchmark: DETR on the core against torchvision's Faster R-CNN on the BCCD blood-cell images, and the
Swin backbone's parity with timm.

    python scripts/bench_detection.py [--quick] [--json PATH] [--out DIR] [--minutes 60] [--reuse]

1. Swin: a timm swin_tiny_patch4_window7_224 (random init, head scaled so that logits differ visibly) copied by
   SwinTransformer.from_timm; the largest |logit difference| over two 224² images.
2. DETR: `polyformer fit -c configs/vision/detr_bccd.yaml` (its max_time caps training at --minutes), then
   `polyformer test` of the checkpoint with the best validation mAP@.5 on the val split; the checkpoint is written
   weights-only to DIR/weights/detr_bccd.ckpt (the committed weights/vision/detr_bccd.ckpt is a copy).
3. Peer: torchvision's fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None) — no pre-trained
   weights on either side — trained on the same training images, augmentation and resolution (the same data
   module) for the same wall time, with the same single torch thread; its val mAP measured as often as DETR's
   (the config's check_val_every_n_epoch), the best reported (as DETR's best validation checkpoint is). Like
   Lightning's max_time, the clock stops training mid-epoch, and an epoch it cuts short still ends with its
   evaluation when one is scheduled.
Both sides run at once, one torch thread each (a core each on the 2-core machine). --quick: a few batches of each
(checks the script, not a result). --reuse: a side already finished in DIR (DETR's run, the peer's DIR/peer.json) is
read instead of rerun.

--json writes val_map50, val_map (DETR), peer_val_map50, peer_val_map, train_minutes (DETR's fit), peer_minutes,
checkpoint, config, swin_timm_max_abs_diff; and, since the best of several evaluations on val flatters both sides,
each side's last evaluation too (val_map50_last, val_map_last, peer_val_map50_last, peer_val_map_last).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import timm
import torch
import yaml
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
from torchvision.ops import box_convert

from polyformer.cli import newest_version
from polyformer.domains.vision.detection_data import IMAGENET_MEAN, IMAGENET_STD, VOCDetectionDataModule
from polyformer.domains.vision.detection_task import pixel_boxes
from polyformer.domains.vision.swin import SwinTransformer
from polyformer.finetune import save_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import (QUICK, ROOT, bench_parser, finished, last_value, polyformer, recorded, run,  # noqa: E402
                            write_json)

CONFIG = ROOT / "configs" / "vision" / "detr_bccd.yaml"
CONFIG_YAML = yaml.safe_load(CONFIG.read_text())


def swin_parity() -> float:
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    model.head.fc.weight.data.mul_(20)
    ours = SwinTransformer.from_timm(model).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return (ours(images) - model(images)).abs().max().item()


def train_detr(out: Path, minutes: float, quick: bool, reuse: bool) -> dict:
    name, run_dir = "detr_bccd", out / "runs" / "vision" / "detr_bccd"
    where = [f"--run.root={out / 'runs'}", f"--run.name={name}"]
    extra = QUICK if quick else [f"--trainer.max_time=00:00:{int(minutes):02d}:00"]

    def fit_and_test() -> dict:
        seconds = run(polyformer("fit", "-c", str(CONFIG), *where, *extra), out / "logs" / f"{name}.fit.log")
        best = newest_version(run_dir) / "checkpoints" / "best.ckpt"
        run(polyformer("test", "-c", str(CONFIG), *where, *extra, f"--ckpt_path={best}"),
            out / "logs" / f"{name}.test.log")
        digest = save_weights(best, out / "weights" / "detr_bccd.ckpt")
        print(f"{out / 'weights' / 'detr_bccd.ckpt'}: sha256 {digest}", flush=True)
        return {"minutes": seconds / 60}

    fitted = recorded(out / "detr_fit.json", reuse, fit_and_test, done=finished(run_dir, "test/map50") is not None)
    return {"val_map50": last_value(run_dir, "test/map50"), "val_map": last_value(run_dir, "test/map"),
            "val_map50_last": last_value(run_dir, "val/map50"), "val_map_last": last_value(run_dir, "val/map"),
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


def train_peer(minutes: float, quick: bool) -> dict:
    """Faster R-CNN (MobileNetV3-FPN, no pre-trained weights) on DETR's data module for `minutes` of wall time,
    evaluated on val as often as DETR is."""
    torch.manual_seed(0)
    data_args = CONFIG_YAML["data"]["init_args"]
    data = VOCDetectionDataModule(**{key: data_args[key] for key in ("skip_bad", "batch_size", "image_size",
                                                                      "max_size", "num_workers")})
    data.setup("fit")
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=data.num_classes + 1,
                                              min_size=data.image_size, max_size=data.max_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
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
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            steps, batches = steps + 1, batches + 1
        # an epoch the clock cuts short still ends with its scheduled evaluation, as under Lightning's max_time
        # (and a run too short for any scheduled one is evaluated once at the end)
        if batches and (epochs + 1) % every == 0 or (out_of_time and not history):
            scores = {"epoch": epochs + 1, **evaluate_peer(model, data, quick)}
            history.append(scores)
            best = max(best, scores, key=lambda s: s["map50"])
            print(f"peer epoch {epochs + 1}: val mAP@.5 {scores['map50']:.3f}, mAP {scores['map']:.3f}", flush=True)
        epochs += 0 if out_of_time else 1
    return {"peer_val_map50": best["map50"], "peer_val_map": best["map"], "peer_val_map50_last": history[-1]["map50"],
            "peer_val_map_last": history[-1]["map"], "peer_epochs": epochs,
            "peer_steps": steps, "peer_minutes": (time.perf_counter() - start) / 60, "peer_history": history}


def main() -> None:
    parser = bench_parser(__doc__.split("\n")[0], ROOT / "bench_out" / "detection")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time of each side")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {"swin_timm_max_abs_diff": swin_parity()}
    print(f"Swin vs timm: max |logit difference| {figures['swin_timm_max_abs_diff']:.2e}", flush=True)
    with ThreadPoolExecutor(1) as pool:  # DETR's fit is a subprocess; the peer trains here meanwhile
        detr = pool.submit(train_detr, args.out, args.minutes, args.quick, args.reuse)
        figures.update(recorded(args.out / "peer.json", args.reuse, lambda: train_peer(args.minutes, args.quick)))
        figures.update(detr.result())
    figures.update({"checkpoint": "weights/vision/detr_bccd.ckpt", "config": str(CONFIG.relative_to(ROOT)),
                    "quick": args.quick})
    print(f"DETR val mAP@.5 {figures['val_map50']:.3f} mAP {figures['val_map']:.3f} ({figures['train_minutes']:.1f} "
          f"min) | Faster R-CNN val mAP@.5 {figures['peer_val_map50']:.3f} mAP {figures['peer_val_map']:.3f} "
          f"({figures['peer_minutes']:.1f} min)")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
