"""Beyond one process, measured on this machine's CPU cores (gloo): what FSDP saves per rank against DDP for a core
encoder of >= 50 M parameters, how DDP scales from one rank to two, streaming against in-memory loading, compiled
against eager steps, graph breaks, and what converting a sharded checkpoint costs.

    python scripts/bench_scale.py [--quick] [--json docs/results/bench_scale.json] [--reuse]

Every training run is `polyformer fit` of the core's sorting task (configs/core/sort_tiny.yaml, encoder widened) with
polyformer.distributed.RankReport writing each rank's state bytes, peak RSS and median step seconds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from polyformer.bench import bench_parser, polyformer, recorded, run, write_json
from polyformer.data import PROJECT_ROOT, shared_data_dir
from polyformer.streaming import split_uri, write_stream

CONFIG = PROJECT_ROOT / "configs" / "core" / "sort_tiny.yaml"
COMMON = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
          "--trainer.limit_val_batches=0", "--trainer.gradient_clip_val=null", "--trainer.logger=false"]


def encoder(dim: int, depth: int, heads: int) -> list[str]:
    return [f"--model.init_args.encoder.dim={dim}", f"--model.init_args.encoder.depth={depth}",
            f"--model.init_args.encoder.heads={heads}", "--model.init_args.encoder.mlp_ratio=4.0"]


def fit_report(out: Path, name: str, ranks: int, strategy: str, extra: list[str]) -> list[dict]:
    """A `polyformer fit` on `ranks` processes; each rank's RankReport."""
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    callbacks = folder / "callbacks.yaml"
    callbacks.write_text("trainer:\n  callbacks:\n    - class_path: polyformer.distributed.RankReport\n"
                         f"      init_args:\n        folder: {folder / 'reports'}\n")
    run(polyformer("fit", "-c", str(CONFIG), "-c", str(callbacks), *COMMON, f"--trainer.devices={ranks}",
                   f"--trainer.strategy={strategy}", f"--checkpoint.dirpath={folder / 'checkpoints'}",
                   f"--trainer.default_root_dir={folder}", *extra),  # without a logger, config.yaml goes there
        out / "logs" / f"{name}.log")
    return [json.loads((folder / "reports" / f"rank{r}.json").read_text()) for r in range(ranks)]


def mb(n: float) -> float:
    return round(n / 2**20, 1)


def memory(out: Path, quick: bool) -> dict:
    """FSDP against DDP on two ranks: per-rank parameters + gradients + AdamW state, and peak RSS; then the
    conversion of FSDP's sharded last.ckpt into one weights-only file."""
    dim, depth, heads = (256, 2, 4) if quick else (768, 8, 12)
    extra = [*encoder(dim, depth, heads), "--data.init_args.batch_size=8", "--trainer.max_steps=3"]
    result = {"encoder": {"dim": dim, "depth": depth, "heads": heads}}
    for strategy in ("ddp", "fsdp"):
        reports = fit_report(out, f"memory_{strategy}", 2, strategy, extra)
        state = [sum(r["state_bytes"].values()) for r in reports]
        result[strategy] = {"state_mb_per_rank": [mb(s) for s in state],
                            "parts_mb_rank0": {k: mb(v) for k, v in reports[0]["state_bytes"].items()},
                            "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in reports]}
    from polyformer.toy import SortingTask
    from polyformer.transformer import TransformerConfig

    task = SortingTask(encoder=TransformerConfig(dim=dim, depth=depth, heads=heads, mlp_ratio=4.0, position="learned",
                                                 max_len=64))
    result["parameters"] = sum(p.numel() for p in task.parameters())
    sharded = out / "memory_fsdp" / "checkpoints" / "last.ckpt"
    single = out / "memory_fsdp" / "consolidated.ckpt"
    seconds = run(polyformer("consolidate", str(sharded), str(single)), out / "logs" / "consolidate.log")
    result["consolidate"] = {"seconds": round(seconds, 2), "sharded_mb": mb(sum(
        f.stat().st_size for f in sharded.rglob("*") if f.is_file())), "weights_only_mb": mb(single.stat().st_size)}
    return result


def scaling(out: Path, quick: bool, repeats: int) -> dict:
    """DDP from one rank to two at the same per-rank batch: samples/s = ranks × batch / median step seconds."""
    batch = 64
    extra = [*encoder(256, 4, 4), f"--data.init_args.batch_size={batch}",
             f"--trainer.max_steps={12 if quick else 80}"]
    steps: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for ranks in ((1, 2) if repeat % 2 == 0 else (2, 1)):  # alternating order
            reports = fit_report(out, f"scaling_{ranks}", ranks, "ddp", extra)
            steps[ranks].append(max(r["step_seconds"] for r in reports))  # the slowest rank sets the pace
    rate = {ranks: ranks * batch / statistics.median(seconds) for ranks, seconds in steps.items()}
    return {"samples_per_s": {str(k): round(v, 1) for k, v in rate.items()},
            "step_seconds": {str(k): [round(s, 4) for s in v] for k, v in steps.items()},
            "efficiency": round(rate[2] / (2 * rate[1]), 3), "batch_per_rank": batch, "encoder": "256x4"}


def loader_rate(loader, limit: int) -> float:
    """Samples per second of one pass over a loader (at most `limit` batches)."""
    count, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        count += batch_size(batch)
        if i + 1 >= limit:
            break
    return count / (time.perf_counter() - start)


def batch_size(batch) -> int:
    if isinstance(batch, dict):
        return len(batch["ids"])
    return len(batch[0])


def streaming(out: Path, quick: bool, repeats: int) -> dict:
    """In-memory (folders, make_loader) against streaming (litdata chunks) loaders, one process, no workers, same
    decoding and transforms, at each domain's training batch: LibriSpeech-sample and BCCD's images."""
    from polyformer.domains.speech.data import AudioConfig, LibriSpeechDataModule, SpeechLoaderConfig
    from polyformer.domains.vision.detection.data import VOCDetectionDataModule
    from polyformer.streaming import StreamConfig

    speech_root, bccd = shared_data_dir() / "speech" / "librispeech-sample", shared_data_dir() / "vision" / "bccd"
    limit = 6 if quick else 10_000
    results = {}
    # the in-memory speech batches hold 80 s of audio (conformer_ctc_tiny_real.yaml): the stream takes as many
    # utterances per batch as they hold on average
    speech = dict(root=str(speech_root), train_splits=["train"], val_splits=["dev"], test_splits=["dev"],
                  audio=AudioConfig(max_duration=24.0), loader=SpeechLoaderConfig(batch_seconds=80.0, num_workers=0))
    detection = dict(root=str(bccd), batch_size=4, num_workers=0, skip_bad=True)
    for name, module, settings in (("librispeech", LibriSpeechDataModule, speech),
                                   ("bccd_images", VOCDetectionDataModule, detection)):
        memory_module = module(**settings)
        memory_module.setup("fit")
        stream = out / "streams" / name
        if not (stream / "train" / "polyformer.json").is_file():
            shutil.rmtree(stream, ignore_errors=True)
            for split in ("train", "val"):  # what setup("fit") opens
                for folder, source in memory_module.stream_sources(split).items():
                    write_stream(source, split_uri(str(stream), folder), split=folder)
        memory_loader = memory_module.train_dataloader()
        if name == "librispeech":
            per_batch = max(1, round(len(memory_module.train_set) / len(memory_loader)))
        else:
            per_batch = settings["batch_size"]
        stream_module = module(**{**settings, "stream": StreamConfig(str(stream), batch_size=per_batch)})
        stream_module.setup("fit")
        stream_loader = stream_module.train_dataloader()
        rates: dict[str, list[float]] = {"memory": [], "stream": []}
        for repeat in range(repeats):
            order = (("memory", memory_loader), ("stream", stream_loader))
            for kind, loader in (order if repeat % 2 == 0 else order[::-1]):
                torch.manual_seed(repeat)
                rates[kind].append(loader_rate(loader, limit))
        medians = {k: statistics.median(v) for k, v in rates.items()}
        results[name] = {"memory_samples_per_s": round(medians["memory"], 1),
                         "stream_samples_per_s": round(medians["stream"], 1),
                         "ratio": round(medians["stream"] / medians["memory"], 3), "stream_batch": per_batch,
                         "repeats": {k: [round(x, 1) for x in v] for k, v in rates.items()}}
    return results


def compiled(quick: bool, repeats: int) -> tuple[dict, dict]:
    """One training step (forward, backward, AdamW) of the core encoder, eager against each block torch.compiled
    (inductor on CPU), alternating, median step seconds; and the graph breaks of every block the compile switch
    acts on, counted and named by torch._dynamo.explain."""
    from polyformer.distributed import compile_blocks
    from polyformer.toy import SortingTask
    from polyformer.transformer import TransformerBlock, TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(dim=256, depth=4, heads=4, mlp_ratio=4.0, position="learned", max_len=128)
    tasks = {"eager": SortingTask(encoder=config), "compiled": SortingTask(encoder=config)}
    tasks["compiled"].load_state_dict(tasks["eager"].state_dict())
    compile_blocks(tasks["compiled"], (TransformerBlock,))
    optimizers = {k: torch.optim.AdamW(t.parameters(), lr=1e-3) for k, t in tasks.items()}
    tokens = torch.randint(0, 10, (16, 128))
    targets = tokens.sort(dim=1).values

    def step(kind: str) -> float:
        start = time.perf_counter()
        logits = tasks[kind].model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        optimizers[kind].step()
        optimizers[kind].zero_grad()
        return time.perf_counter() - start

    warmup_start = time.perf_counter()
    for kind in tasks:  # the first compiled step compiles
        step(kind)
    compile_seconds = time.perf_counter() - warmup_start
    steps = 3 if quick else 10
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    for repeat in range(repeats):
        for kind in (("eager", "compiled") if repeat % 2 == 0 else ("compiled", "eager")):
            seconds[kind].append(statistics.median(step(kind) for _ in range(steps)))
    eager, fast = statistics.median(seconds["eager"]), statistics.median(seconds["compiled"])
    speedup = {"eager_step_s": round(eager, 4), "compiled_step_s": round(fast, 4), "speedup": round(eager / fast, 3),
               "first_steps_s": round(compile_seconds, 1), "encoder": "256x4, 16 x 128 tokens",
               "threads": torch.get_num_threads()}
    return speedup, graph_breaks()


def graph_breaks() -> dict:
    """Graph breaks of every domain's block, on an input of its shape: count and reasons."""
    from polyformer.domains.longrange.model import S4DBlock, S4DConfig
    from polyformer.domains.speech.conformer import ConformerBlock, ConformerConfig
    from polyformer.transformer import TransformerBlock, TransformerConfig

    x, padding = torch.randn(2, 16, 64), torch.zeros(2, 16, dtype=torch.bool)
    blocks = {"core.TransformerBlock": (TransformerBlock(TransformerConfig(dim=64, heads=4)), (x,)),
              "speech.ConformerBlock": (ConformerBlock(ConformerConfig(dim=64, heads=4)), (x, padding)),
              "longrange.S4DBlock": (S4DBlock(S4DConfig(dim=64)), (x, padding))}
    found = {}
    for name, (block, inputs) in blocks.items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block)(*inputs)
        found[name] = {"count": explained.graph_break_count,
                       "reasons": sorted({str(reason.reason).splitlines()[0] for reason in explained.break_reasons})}
    return found


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], PROJECT_ROOT / "bench_out" / "scale")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats of each comparison")
    args = parser.parse_args()
    out, repeats = args.out, args.repeats or (1 if args.quick else 3)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    memory_figures = recorded(out / f"memory_{tag}.json", args.reuse, lambda: memory(out, args.quick))
    scaling_figures = recorded(out / f"scaling_{tag}.json", args.reuse, lambda: scaling(out, args.quick, repeats))
    stream_figures = recorded(out / f"stream_{tag}.json", args.reuse, lambda: streaming(out, args.quick, repeats))
    speed, breaks = recorded(out / f"compile_{tag}.json", args.reuse, lambda: compiled(args.quick, repeats))
    fsdp = max(memory_figures["fsdp"]["state_mb_per_rank"])
    ddp = max(memory_figures["ddp"]["state_mb_per_rank"])
    figures = {
        "fsdp_peak_mb": fsdp, "ddp_peak_mb": ddp, "fsdp_over_ddp": round(fsdp / ddp, 3),
        "ddp_scaling": scaling_figures, "stream_vs_memory": stream_figures, "compile_speedup": speed,
        "graph_breaks": breaks, "memory": memory_figures,
        "protocol": {"quick": args.quick, "repeats": repeats, "torch": torch.__version__, "cpus": "2 cores, gloo",
                     "peak": "per-rank bytes of parameters + gradients + AdamW state, largest over the steps "
                             "(RankReport); peak RSS beside it", "command": " ".join(sys.argv)},
    }
    print(json.dumps({k: figures[k] for k in ("fsdp_peak_mb", "ddp_peak_mb", "fsdp_over_ddp")}))
    print("ddp scaling efficiency", scaling_figures["efficiency"], "| stream/memory",
          {k: v["ratio"] for k, v in stream_figures.items()}, "| compile speedup", speed["speedup"])
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
