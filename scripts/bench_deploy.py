"""Deployment benchmark: export, int8 quantization and knowledge distillation of the models the READMEs report.

    python scripts/bench_deploy.py [--quick] [--json PATH] [--out DIR] [--parts quantize distill] [--reuse]

quantize — for each domain's committed weights (weights/README.md: the ViT on digits, the Conformer-CTC on the
  synthetic corpus, PatchTST on ETTh1 at H = 96, the DT on CartPole): export to ONNX (`polyformer export`'s path,
  polyformer.deploy) and to .pt2, the largest |eager − exported| over inputs of three shapes; quantize the ONNX graph
  to int8 (onnxruntime dynamic quantization); the domain's metric on its own test data with eager fp32, onnxruntime
  fp32 and onnxruntime int8 (digits test accuracy, 360 images; synthetic-speech test CER, 300 utterances, greedy;
  ETTh1 test MSE, every window; CartPole return at target 500, 20 episodes, argmax actions, same seeds); latency at
  batch 1 and 32 (medians of 7 rounds, the three runtimes in a rotating order each round, one thread); file sizes
  (the .onnx files; the weights-only checkpoint for reference).
select — the distillation recipe (temperature, weight) chosen on validation data: the student fitted on seed 0
  with each recipe of GRID and its config's own, the best validation metric kept (digits: val accuracy of the last
  epoch, whose checkpoint is tested; ETTh1: val MSE of the best epoch, whose checkpoint is tested). No test split is
  read.
distill — the student alone, distilled with its config's recipe (set before any run) and with the selected one,
  same config and seeds (0, 1, 2), each run's checkpoint tested once: configs/vision/vit_mini_digits_distill.yaml
  (last checkpoint, test accuracy) and configs/timeseries/patchtst_small_etth1_96_distill.yaml (lowest validation
  MSE, test MSE).

--json keys per domain (vision, speech, timeseries, rl): onnx_max_abs_diff, pt2_max_abs_diff, metric, metric_fp32,
metric_onnx_fp32, metric_int8, latency_ms ({runtime: {b1, b32}}), latency_ratio_b1 and latency_ratio_b32 (eager fp32
/ onnxruntime int8), latency_ratio_b1_onnx and latency_ratio_b32_onnx (onnxruntime fp32 / int8: quantization alone),
size_mb_fp32, size_mb_int8, size_mb_checkpoint; distillation: {domain: {teacher, student_alone,
student_distilled, student_distilled_selected (means), their _std and _runs, recipe, recipe_selected}};
distillation_selection: the candidates' validation figures. --quick: a few batches of everything, the first seed
and two recipe candidates only (a check of the script). --reuse: finished fits are read back, and each domain's
quantize figures from DIR/records/quantize_<domain>.json, so that the JSON is written again as it was.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from polyformer.bench import (QUICK, fit, fit_and_test, history, recorded, run, run_dir, runs_parser, summarise,
                              write_json)
from polyformer.cli import datamodule_from, task_from
from polyformer.deploy import OnnxModel, export_onnx, file_megabytes, max_abs_diff, quantize_int8
from polyformer.training import PolyformerTask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS, WEIGHTS = ROOT / "configs", ROOT / "weights"
MODELS = {  # domain → (config it was trained with, committed weights)
    "vision": ("vision/vit_tiny_digits.yaml", "vision/vit_tiny_digits.ckpt"),
    "speech": ("speech/conformer_ctc_demo_synthetic.yaml", "speech/conformer_ctc_demo_synthetic.ckpt"),
    "timeseries": ("timeseries/patchtst_etth1_96.yaml", "timeseries/patchtst_etth1_96.ckpt"),
    "rl": ("rl/dt_cartpole.yaml", "rl/dt_cartpole.ckpt"),
}
STUDENTS = {  # domain → (config, checkpoint tested, test metric)
    "vision": ("vision/vit_mini_digits_distill.yaml", "last", "test/acc1"),
    "timeseries": ("timeseries/patchtst_small_etth1_96_distill.yaml", "best", "test/mse"),
    "speech": ("speech/conformer_ctc_narrow_demo_distill.yaml", "last", "test/test/cer"),
}
# the recipes `select` compares on validation data (seed 0): (temperature, weight); forecasts have no temperature
GRID = {"vision": [(t, w) for t in (1.0, 4.0) for w in (0.5, 0.9)] + [(2.0, 0.9)],
        "timeseries": [(2.0, w) for w in (0.25, 0.75, 0.9)], "speech": [(1.0, 0.5), (2.0, 0.9)]}
# what a selection reads: the metric, its value over a run's epochs (that of the checkpoint tested: the last
# epoch's, or the best), and which of two values is better
VALIDATION = {"vision": ("val/acc1", lambda values: values[-1], max), "timeseries": ("val/mse", min, min),
              "speech": ("val/cer", lambda values: values[-1], min)}


# the demo's synthetic corpus (scripts/demo.sh, weights/README.md): the speech teacher's data, made when missing
SPEECH_CORPUS = ["scripts/make_synthetic_librispeech.py", "--out", "data/speech_demo", "--train-utterances", "800",
                 "--dev", "50", "--test", "100", "--heldout", "50", "--max-words", "10", "--seed", "0"]


def ensure_speech_corpus(out: Path) -> None:
    """Makes the demo's synthetic LibriSpeech corpus (espeak-ng) when a fresh clone has none: what demo.sh makes."""
    if not (ROOT / "data" / "speech_demo" / "LibriSpeech" / "train").is_dir():
        run([sys.executable, *SPEECH_CORPUS], out / "logs" / "make_speech_corpus.log")


def read_config(domain: str) -> dict:
    return yaml.safe_load((CONFIGS / MODELS[domain][0]).read_text())


def committed_task(domain: str) -> PolyformerTask:
    """The task of the domain's committed weights (weights/), built from its config."""
    weights = WEIGHTS / MODELS[domain][1]
    if not weights.is_file():
        raise SystemExit(f"{weights}: missing; weights/README.md gives the command that writes it")
    return task_from([str(CONFIGS / MODELS[domain][0])], str(weights))


def datamodule(domain: str):
    """The test data of the domain's config, as its data module (set up for testing)."""
    data = read_config(domain)["data"]
    dm = datamodule_from(data)
    dm.prepare_data()
    dm.setup("test")
    return dm


# ---- each domain's metric, for any runner of its exported inputs --------------------------------------------------
def vision_metric(task, run: Callable, quick: bool) -> float:
    correct = total = 0
    for i, (images, labels) in enumerate(datamodule("vision").test_dataloader()):
        if quick and i == 2:
            break
        correct += int((run(images).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


def speech_metric(task, run: Callable, quick: bool) -> float:
    from torchmetrics.text import CharErrorRate

    cer = CharErrorRate()
    loaders = datamodule("speech").test_dataloader()
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders  # the `test` split, the config's first
    for i, batch in enumerate(loader):
        if quick and i == 2:
            break
        log_probs, frames = run(batch["waveforms"], batch["lengths"])
        cer.update(task.transcribe_log_probs(log_probs, frames), batch["transcripts"])
    return float(cer.compute())


def timeseries_metric(task, run: Callable, quick: bool) -> float:
    squared, count = 0.0, 0
    for i, (x, y) in enumerate(datamodule("timeseries").test_dataloader()):
        if quick and i == 2:
            break
        squared += float(((run(x) - y) ** 2).sum())
        count += y.numel()
    return squared / count


def rl_metric(task, run: Callable, quick: bool) -> float:
    from polyformer.domains.rl.evaluate import RolloutConfig, evaluate_acting_step

    step = task.exportable().module
    config = RolloutConfig(targets=[500.0], episodes=2 if quick else 20, seed=10_000, sample=False)
    rows = evaluate_acting_step(run, step.new_cache, task.env_id, discrete=task.discrete,
                                action_dim=task.action_dim, config=config)
    return rows[0]["return_mean"]


METRICS = {"vision": ("test accuracy", vision_metric), "speech": ("test CER (greedy)", speech_metric),
           "timeseries": ("test MSE", timeseries_metric), "rl": ("return at target 500", rl_metric)}


def median_latencies(runners: dict[str, Callable], inputs: tuple, rounds: int, calls: int) -> dict[str, float]:
    """Milliseconds per call of each runner: per round, each runner in a rotating order times `calls` calls
    (after one warm-up); the median over rounds."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            runners[name](*inputs)  # warm-up (first-call allocations, onnxruntime's lazy init)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                for _ in range(calls):
                    runners[name](*inputs)
                times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def quantize_domain(domain: str, out: Path, quick: bool) -> dict:
    torch.manual_seed(0)
    task = committed_task(domain)
    exportable = task.exportable()
    eager = exportable.module.eval()
    folder = out / "export" / domain
    fp32 = OnnxModel(export_onnx(eager, folder / "model.onnx", exportable.example_inputs(2, exportable.lengths[1]),
                                 input_names=exportable.input_names, output_names=exportable.output_names,
                                 dynamic_axes=exportable.dynamic_axes), threads=1)
    program = exportable.export(folder / "model.pt2", "pt2")
    int8 = quantize_int8(fp32.path, folder / "model.int8.onnx")
    int8 = OnnxModel(int8.path, threads=1)
    checks = exportable.check_inputs()
    figures = {"onnx_max_abs_diff": max_abs_diff(eager, fp32, checks),
               "pt2_max_abs_diff": max_abs_diff(eager, program, checks),
               "int8_max_abs_diff": max_abs_diff(eager, int8, checks)}
    name, metric = METRICS[domain]
    with torch.no_grad():
        figures |= {"metric": name, "metric_fp32": metric(task, eager, quick),
                    "metric_onnx_fp32": metric(task, fp32, quick), "metric_int8": metric(task, int8, quick)}
    runners = {"eager_fp32": eager, "onnx_fp32": fp32, "onnx_int8": int8}
    latency = {}
    for batch in (1, 32):
        inputs = exportable.example_inputs(batch, exportable.lengths[1])
        for runtime, ms in median_latencies(runners, inputs, rounds=2 if quick else 7,
                                            calls=2 if quick else 10).items():
            latency.setdefault(runtime, {})[f"b{batch}"] = ms
    figures["latency_ms"] = latency
    for batch in ("b1", "b32"):
        figures[f"latency_ratio_{batch}"] = latency["eager_fp32"][batch] / latency["onnx_int8"][batch]
        figures[f"latency_ratio_{batch}_onnx"] = latency["onnx_fp32"][batch] / latency["onnx_int8"][batch]
    figures |= {"size_mb_fp32": file_megabytes(fp32.path), "size_mb_int8": file_megabytes(int8.path),
                "size_mb_checkpoint": file_megabytes(WEIGHTS / MODELS[domain][1]),
                "latency_input": ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(exportable.input_names, inputs)),
                "parameters": sum(p.numel() for p in eager.parameters())}
    return figures


def recipe_args(temperature: float, weight: float) -> list[str]:
    return [f"--model.init_args.distill.temperature={temperature}", f"--model.init_args.distill.weight={weight}"]


def validation_value(folder: Path, name: str, over_epochs: Callable) -> float:
    """over_epochs(values of a validation metric, epoch by epoch) of a run."""
    return over_epochs(history(folder, name))


def select_recipe(domain: str, out: Path, quick: bool, reuse: bool, jobs: int) -> dict:
    """Fits the student with each recipe of GRID on seed 0 and keeps the best validation metric (no test run);
    the config's own recipe is among the candidates."""
    config = CONFIGS / STUDENTS[domain][0]
    distill = read_student_distill(domain)
    candidates = list(dict.fromkeys([(distill["temperature"], distill["weight"]), *GRID[domain]]))
    candidates = candidates[:2] if quick else candidates  # quick: the selection's code path, not its grid
    metric, over_epochs, best = VALIDATION[domain]

    def validated(recipe: tuple[float, float]) -> float:
        name = f"{config.stem}_select_t{recipe[0]:g}_w{recipe[1]:g}"
        folder = run_dir(out, config, name)
        if not (reuse and (folder / "version_0" / "checkpoints" / "last.ckpt").is_file()):
            fit([config], out, name, ["--seed_everything=0", *recipe_args(*recipe), *(QUICK if quick else [])])
        return validation_value(folder, metric, over_epochs)

    with ThreadPoolExecutor(jobs) as pool:
        scores = dict(zip(candidates, pool.map(validated, candidates)))
    chosen = best(scores, key=scores.get)
    return {"metric": metric, "seed": 0, "candidates": [{"temperature": t, "weight": w, "value": v}
                                                       for (t, w), v in scores.items()],
            "temperature": chosen[0], "weight": chosen[1]}


def read_student_distill(domain: str) -> dict:
    distill = yaml.safe_load((CONFIGS / STUDENTS[domain][0]).read_text())["model"]["init_args"]["distill"]
    return {"temperature": distill.get("temperature", 2.0), "weight": distill.get("weight", 0.5)}


def distill_jobs(domain: str, out: Path, seeds: list[int], quick: bool, reuse: bool,
                 selected: dict | None) -> dict[tuple, tuple]:
    """The student alone, distilled with its config's recipe and, when `select` ran, with the recipe chosen on
    validation data (the same runs when the two recipes agree)."""
    config, checkpoint, metric = STUDENTS[domain]
    kinds = [("alone", ["--model.init_args.distill=null"]), ("distilled", [])]
    own = read_student_distill(domain)
    if selected is not None and (selected["temperature"], selected["weight"]) != (own["temperature"], own["weight"]):
        kinds.append(("distilled_selected", recipe_args(selected["temperature"], selected["weight"])))
    jobs = {}
    for kind, distill in kinds:
        for seed in seeds:
            extra = [f"--seed_everything={seed}", *distill, *(QUICK if quick else [])]
            name = f"{Path(config).stem}_{kind}_seed{seed}"
            jobs[domain, kind, seed] = (CONFIGS / config, out, name, extra, checkpoint, metric, reuse)
    return jobs


def main() -> None:
    parser = runs_parser(__doc__.splitlines()[0], ROOT / "bench_out" / "deploy", list(MODELS))
    parser.add_argument("--parts", nargs="+", default=["quantize", "select", "distill"],
                        choices=["quantize", "select", "distill"])
    args = parser.parse_args()
    os.chdir(ROOT)  # the configs' data paths are relative to the repository
    torch.set_num_threads(1)
    if args.quick:  # every code path once: one seed
        args.seeds = args.seeds[:1]
    figures: dict = {"quick": args.quick, "seeds": args.seeds, "threads": 1}
    if "speech" in args.domains:
        ensure_speech_corpus(args.out)

    selected = {}
    if "select" in args.parts:
        for domain in (d for d in STUDENTS if d in args.domains):
            selected[domain] = select_recipe(domain, args.out, args.quick, args.reuse, args.jobs)
            print(f"select {domain}: {selected[domain]}", flush=True)
        figures["distillation_selection"] = selected
    if "distill" in args.parts:
        jobs = {}
        for domain in (d for d in STUDENTS if d in args.domains):
            jobs |= distill_jobs(domain, args.out, args.seeds, args.quick, args.reuse, selected.get(domain))
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {key: pool.submit(fit_and_test, *job) for key, job in jobs.items()}
            results = {key: future.result() for key, future in futures.items()}
        distillation = {}
        for domain in sorted({key[0] for key in results}):
            row: dict = {"metric": STUDENTS[domain][2], "config": f"configs/{STUDENTS[domain][0]}"}
            row["recipe"] = read_student_distill(domain)
            if domain in selected:
                row["recipe_selected"] = {key: selected[domain][key] for key in ("temperature", "weight")}
            for kind in sorted({key[1] for key in results if key[0] == domain}):
                runs = {seed: results[domain, kind, seed] for seed in args.seeds}
                row[f"student_{kind}"], row[f"student_{kind}_std"] = summarise(runs)
                row[f"student_{kind}_runs"] = runs
            distillation[domain] = row
        figures["distillation"] = distillation

    if "quantize" in args.parts:
        for domain in args.domains:
            print(f"quantize: {domain}", flush=True)
            figures[domain] = recorded(args.out / "records" / f"quantize_{domain}.json", args.reuse,
                                       lambda: quantize_domain(domain, args.out, args.quick))
        for domain, row in figures.get("distillation", {}).items():
            if domain in figures:
                row["teacher"] = figures[domain]["metric_fp32"]

    header = (f"{'domain':<11}{'metric':<22}{'fp32':>8}{'int8':>8}{'b1 ms fp32/int8':>18}{'×':>6}"
              f"{'b32 ms fp32/int8':>19}{'×':>6}{'onnx diff':>11}{'MB fp32/int8':>15}")
    print("\n" + header)
    for domain in (d for d in MODELS if d in figures):
        f, ms = figures[domain], figures[domain]["latency_ms"]
        print(f"{domain:<11}{f['metric']:<22}{f['metric_fp32']:>8.4f}{f['metric_int8']:>8.4f}"
              f"{ms['eager_fp32']['b1']:>10.2f}/{ms['onnx_int8']['b1']:<7.2f}{f['latency_ratio_b1']:>6.1f}"
              f"{ms['eager_fp32']['b32']:>11.2f}/{ms['onnx_int8']['b32']:<7.2f}{f['latency_ratio_b32']:>6.1f}"
              f"{f['onnx_max_abs_diff']:>11.1e}{f['size_mb_fp32']:>8.2f}/{f['size_mb_int8']:<6.2f}")
    for domain, row in figures.get("distillation", {}).items():
        teacher = f"{row['teacher']:.4f}" if "teacher" in row else "-"
        kinds = [kind for kind in ("alone", "distilled", "distilled_selected") if f"student_{kind}" in row]
        print(f"distillation {domain} ({row['metric']}, seeds {args.seeds}): teacher {teacher}; "
              + "; ".join(f"student {kind} {row[f'student_{kind}']:.4f} ± {row[f'student_{kind}_std']:.4f}"
                          for kind in kinds))
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
