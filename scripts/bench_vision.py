"""Vision benchmark: throughput of our ViT against timm's, digits accuracy, and an attention-rollout figure.

    python scripts/bench_vision.py [--quick] [--json PATH] [--out DIR] [--reuse]

1. Training-step (forward, backward, AdamW step) and inference images/s of our ViT and timm's same model with the
   same weights (ViT-Ti/16, 224 px, batch 32, fp32 on CPU by default), timed alternately round by round in one
   process; medians and the ratio ours/timm — ours as it runs (the last block computes the class token alone) and
   with that read-out switched off (every token computed, timm's work exactly).
2. Trains configs/vision/vit_tiny_digits.yaml with the `polyformer fit` command it prints, then tests its last
   checkpoint on the held-out split (--quick: a shorter schedule of the same config, said so in the output).
3. Attention rollout of the trained digits model over a few test images, saved as PNG.

--reuse reads the finished digits run back from --out (its record); the throughput is measured again.
--json writes train_ratio_vs_timm, infer_ratio_vs_timm (and _full_readout siblings), digits_test_acc,
digits_train_seconds.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from polyformer.bench import bench_parser, evaluate, fit, last_value, recorded, run_dir, write_json
from polyformer.cli import datamodule_from

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = ROOT / "configs" / "vision" / "vit_tiny_digits.yaml"


def time_call(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def throughput(model_name: str, batch: int, img_size: int, rounds: int, repeats: int) -> dict[str, float]:
    """Images/s of ours and timm's, alternating inside every round so both see the same machine load."""
    import timm

    from polyformer.domains.vision.timm_compat import vit_from_timm

    torch.manual_seed(0)
    theirs = timm.create_model(model_name, pretrained=False, img_size=img_size)
    ours = vit_from_timm(theirs)
    # ours reads the class token only: its last block computes queries, feed-forward and norm there alone (timm's
    # computes every token's and then keeps one). The same model without that skip does timm's work exactly:
    models = {"ours": ours, "timm": theirs, "ours_full_readout": FullReadout(ours)}
    images = torch.randn(batch, 3, img_size, img_size)
    labels = torch.randint(theirs.num_classes, (batch,))
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}

    def train_step(name):
        model, optimizer = models[name], optimizers[name]
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer(name):
        with torch.inference_mode():
            models[name](images)

    seconds = {(kind, name): [] for kind in ("train", "infer") for name in models}
    for kind, fn in (("train", train_step), ("infer", infer)):
        for model in models.values():
            model.train(kind == "train")
        for name in models:  # warm-up
            fn(name)
        names = list(models)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # a rotating order
                seconds[kind, name].append(time_call(lambda: fn(name), repeats))
    result = {}
    for kind in ("train", "infer"):
        for name in models:
            result[f"{kind}_{name}_images_per_s"] = batch / statistics.median(seconds[kind, name])
        result[f"{kind}_ratio_vs_timm"] = result[f"{kind}_ours_images_per_s"] / result[f"{kind}_timm_images_per_s"]
        result[f"{kind}_ratio_vs_timm_full_readout"] = \
            result[f"{kind}_ours_full_readout_images_per_s"] / result[f"{kind}_timm_images_per_s"]
    return result


class FullReadout(torch.nn.Module):
    """Our ViT (the same parameters) with the class-token-only last block switched off: every token computed."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        return self.vit.forward_head(self.vit.forward_features(images, query_index=None))


def train_digits(out: Path, extra: list[str], reuse: bool) -> dict:
    """Fits the digits config with the threads the caller set, tests its last checkpoint (polyformer.bench); with
    `reuse`, the finished run's record out/records/digits.json is read back."""
    def produce() -> dict:
        cpu_start = resource.getrusage(resource.RUSAGE_CHILDREN)
        fitted = fit([DIGITS_CONFIG], out, "vit_tiny_digits", extra, threads=None)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
        print(f"    wall {fitted.seconds:.1f} s, CPU {cpu_seconds:.1f} s (user + system; the wall time includes "
              f"waiting for a busy machine)", flush=True)
        evaluate("test", [DIGITS_CONFIG], out, "vit_tiny_digits", extra, fitted.checkpoint("last"), threads=None)
        return {"seconds": fitted.seconds, "accuracy": last_value(run_dir(out, DIGITS_CONFIG, "vit_tiny_digits"),
                                                                  "test/acc1"), "version": str(fitted.version)}

    return recorded(out / "records" / "digits.json", reuse, produce)


def rollout_figure(run: Path, path: Path, count: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyformer.domains.vision import ImageClassificationTask
    from polyformer.domains.vision.rollout import attention_rollout

    task = ImageClassificationTask.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    data = datamodule_from(yaml.safe_load((run / "config.yaml").read_text())["data"])
    data.setup("test")
    images, labels = next(iter(data.test_dataloader()))
    images, labels = images[:count], labels[:count]
    heat = attention_rollout(task.model, images)  # (b gh gw)
    predictions = task(images).argmax(-1)
    figure, axes = plt.subplots(2, count, figsize=(2 * count, 4.2))
    for i in range(count):
        axes[0, i].imshow(images[i, 0], cmap="gray")
        axes[0, i].set_title(f"label {labels[i].item()} / pred {predictions[i].item()}", fontsize=8)
        axes[1, i].imshow(images[i, 0], cmap="gray")
        axes[1, i].imshow(torch.nn.functional.interpolate(heat[i][None, None], size=images.shape[-2:],
                                                          mode="nearest")[0, 0], cmap="inferno", alpha=0.6)
        for ax in axes[:, i]:
            ax.axis("off")
    figure.suptitle("vit_tiny_digits: attention rollout (Abnar & Zuidema 2020)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = bench_parser(__doc__, ROOT / "runs" / "bench_vision")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name for the throughput part")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--throughput-only", action="store_true", help="part 1 alone; --json gets its figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (8 if args.quick else 32)
    rounds, repeats = (3, 1) if args.quick else (7, 2)
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"[1] throughput {args.model} 224 px, batch {batch}, fp32 CPU, {torch.get_num_threads()} threads, "
          f"{rounds} alternating rounds x {repeats} calls", flush=True)
    speed = throughput(args.model, batch, 224, rounds, repeats)
    for key, value in speed.items():
        print(f"    {key}: {value:.3f}")

    if args.throughput_only:
        write_json(args.json, speed | {"model": args.model, "batch": batch, "rounds": rounds,
                                       "threads": torch.get_num_threads()})
        return 0
    extra = ["--trainer.max_epochs=15"] if args.quick else []
    print(f"[2] digits{' (--quick: 15-epoch schedule of the same config)' if args.quick else ''}", flush=True)
    digits = train_digits(args.out, extra, args.reuse)
    seconds, accuracy, run = digits["seconds"], digits["accuracy"], Path(digits["version"])
    print(f"    digits_test_acc: {accuracy:.4f}   digits_train_seconds: {seconds:.1f}   run: {run}")

    figure = args.out / "digits_attention_rollout.png"
    rollout_figure(run, figure)
    print(f"[3] attention rollout figure: {figure}")

    write_json(args.json, {key: speed[key] for key in speed if "_ratio_vs_timm" in key} | {
        "digits_test_acc": accuracy, "digits_train_seconds": seconds})


if __name__ == "__main__":
    sys.exit(main())
