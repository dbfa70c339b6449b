"""Masked pre-training benchmark: does pre-training pay, in vision (MAE on digits) and time series (PatchTST on ETTh1)?

    python scripts/bench_pretrain.py [--quick] [--json PATH] [--out DIR] [--jobs 2] [--seeds 0 1 2]

1. Pre-trains each domain's encoder with the `polyformer fit` command it prints (configs/vision/mae_tiny_digits.yaml,
   configs/timeseries/patchtst_pretrain_etth1.yaml), keeps the checkpoint with the lowest validation loss and writes
   it weights-only to DIR/weights/ (the files committed under weights/ are copies of these).
2. Vision: vit_tiny_digits_finetune.yaml with 10 % of the training labels and with all of them, fine-tuned from the
   MAE encoder and trained from scratch (init_from null) on the same schedule, one run per seed (seed_everything and
   label_seed both the seed); each run's last checkpoint is tested once.
3. Time series: patchtst_finetune_etth1_96.yaml at H = 96, 192, 336, 720, fine-tuned and from scratch, per seed;
   the checkpoint with the lowest validation MSE is tested once.
Runs go --jobs at a time, one torch thread each. --quick: a few batches of everything (a check of the script, not
a result). --reuse: a run already finished in DIR (its test metric logged; a pre-training's weights and minutes
written) is read instead of run again, so that an interrupted benchmark, or one run domain by domain, completes.

--json writes digits_{10pct,full}_{scratch,pretrained}_acc (means over the seeds, with _std siblings and per-seed
lists under _runs), etth1_scratch_mse and etth1_finetuned_mse (horizon → mean, _std siblings, _runs), and
pretrain_minutes (domain → minutes of the pre-training fit).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from polyformer.cli import newest_version, version_numbers
from polyformer.finetune import save_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HORIZONS = (96, 192, 336, 720)
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2", "--trainer.check_val_every_n_epoch=1"]


def polyformer(*args: str) -> list[str]:
    """The CLI through this interpreter, so the script works without an activated virtual environment."""
    return [sys.executable, "-m", "polyformer.cli", *args]


def run(command: list[str], log: Path) -> float:
    """Runs a command (one torch thread), its output to `log`; returns wall seconds."""
    print("$", shlex.join(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {shlex.join(command)}; see {log}")
    return time.perf_counter() - start


def last_value(run_dir: Path, name: str) -> float:
    """The last logged value of a metric in the newest version of a run that logged it (a fit's validation metrics
    sit in an older version than the test run of its checkpoint)."""
    for version in reversed(version_numbers(run_dir)):
        value = None
        metrics = run_dir / f"version_{version}" / "metrics.csv"
        if metrics.is_file():
            with metrics.open() as f:
                for row in csv.DictReader(f):
                    value = row.get(name) or value
        if value is not None:
            return float(value)
    raise SystemExit(f"{name} not logged in any version under {run_dir}")


def finished(run_dir: Path, name: str) -> float | None:
    """The metric of a run already finished (a version logged it), else None."""
    try:
        return last_value(run_dir, name)
    except (FileNotFoundError, SystemExit):
        return None


def fit_and_test(config: Path, out: Path, name: str, extra: list[str], checkpoint: str, metric: str,
                 reuse: bool) -> float:
    """`polyformer fit` then `polyformer test` of its `checkpoint` (best / last); returns the test metric."""
    run_dir = out / "runs" / config.parent.name / name
    if reuse and (value := finished(run_dir, metric)) is not None:
        print(f"reusing {run_dir}: {metric} {value:.4f}", flush=True)
        return value
    where = [f"--run.root={out / 'runs'}", f"--run.name={name}"]
    run(polyformer("fit", "-c", str(config), *where, *extra), out / "logs" / f"{name}.fit.log")
    ckpt = newest_version(run_dir) / "checkpoints" / f"{checkpoint}.ckpt"
    run(polyformer("test", "-c", str(config), *where, *extra, f"--ckpt_path={ckpt}"), out / "logs" / f"{name}.test.log")
    return last_value(run_dir, metric)


def pretrain(config: Path, out: Path, extra: list[str], reuse: bool) -> tuple[Path, float]:
    """Pre-trains, writes the best-validation checkpoint weights-only; (weights file, minutes of the fit)."""
    name = config.stem
    weights = out / "weights" / f"{name}.ckpt"

    def fit() -> dict:
        seconds = run(polyformer("fit", "-c", str(config), f"--run.root={out / 'runs'}", *extra),
                      out / "logs" / f"{name}.fit.log")
        best = newest_version(out / "runs" / config.parent.name / name) / "checkpoints" / "best.ckpt"
        digest = save_weights(best, weights)
        print(f"{weights}: sha256 {digest}", flush=True)
        return {"minutes": seconds / 60, "sha256": digest, "checkpoint": str(best)}

    return weights, recorded(out / "weights" / f"{name}.json", reuse, fit, done=weights.is_file())["minutes"]


def recorded(record: Path, reuse: bool, produce: Callable[[], dict], done: bool = True) -> dict:
    """The JSON record of a piece of work: read from `record` when reusing and `done` (the work it describes is
    complete), else `produce()`d, written there and returned; lets a benchmark finish over several sittings."""
    if reuse and done and record.is_file():
        print(f"reusing {record}", flush=True)
        return json.loads(record.read_text())
    value = produce()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(value) + "\n")
    return value


def write_json(path: Path | None, figures: dict) -> None:
    """The figures as JSON at `path` (nothing when None), as the benchmark measured them."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {path}")


def summarise(runs: dict[int, float]) -> tuple[float, float]:
    values = list(runs.values())
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def vision_jobs(out: Path, weights: Path, seeds: list[int], quick: bool, reuse: bool) -> dict[tuple, tuple]:
    config = CONFIGS / "vision" / "vit_tiny_digits_finetune.yaml"
    jobs = {}
    for labels, fraction, epochs in (("10pct", 0.1, None), ("full", 1.0, 240)):
        for start, init in (("scratch", "null"), ("pretrained", str(weights))):
            for seed in seeds:
                extra = [f"--seed_everything={seed}", f"--data.init_args.label_seed={seed}",
                         f"--data.init_args.label_fraction={fraction}", f"--model.init_args.init_from={init}"]
                extra += [f"--trainer.max_epochs={epochs}"] if epochs and not quick else []
                extra += QUICK if quick else []
                name = f"digits_{labels}_{start}_seed{seed}"
                jobs["vision", labels, start, seed] = (config, out, name, extra, "last", "test/acc1", reuse)
    return jobs


def timeseries_jobs(out: Path, weights: Path, seeds: list[int], quick: bool, reuse: bool) -> dict[tuple, tuple]:
    config = CONFIGS / "timeseries" / "patchtst_finetune_etth1_96.yaml"
    jobs = {}
    for horizon in HORIZONS:
        for start, init in (("scratch", "null"), ("finetuned", str(weights))):
            for seed in seeds:
                extra = [f"--seed_everything={seed}", f"--model.init_args.model.horizon={horizon}",
                         f"--data.init_args.horizon={horizon}", f"--model.init_args.init_from={init}"]
                extra += QUICK if quick else []
                name = f"etth1_{horizon}_{start}_seed{seed}"
                jobs["timeseries", horizon, start, seed] = (config, out, name, extra, "best", "test/mse", reuse)
    return jobs


def bench_parser(description: str, out: Path) -> argparse.ArgumentParser:
    """The options every benchmark made of `polyformer` runs takes: --quick, --json, --out, --reuse."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few batches of everything: checks the script only")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--out", type=Path, default=out, help="runs, logs and what the runs write")
    parser.add_argument("--reuse", action="store_true", help="read runs already finished in --out instead of rerunning")
    return parser


def runs_parser(description: str, out: Path, domains: list[str]) -> argparse.ArgumentParser:
    """bench_parser's options, and --jobs, --seeds, --domains (this benchmark and bench_deploy.py)."""
    parser = bench_parser(description, out)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--domains", nargs="+", default=domains, choices=domains)
    return parser


def main() -> None:
    parser = runs_parser(__doc__.splitlines()[0], ROOT / "bench_out" / "pretrain", ["vision", "timeseries"])
    args = parser.parse_args()
    quick = QUICK if args.quick else []

    pretrain_configs = {"vision": CONFIGS / "vision" / "mae_tiny_digits.yaml",
                        "timeseries": CONFIGS / "timeseries" / "patchtst_pretrain_etth1.yaml"}
    with ThreadPoolExecutor(args.jobs) as pool:
        pretrained = {domain: pool.submit(pretrain, pretrain_configs[domain], args.out, quick, args.reuse)
                      for domain in args.domains}
        pretrained = {domain: future.result() for domain, future in pretrained.items()}
        jobs = {}
        if "vision" in pretrained:
            jobs |= vision_jobs(args.out, pretrained["vision"][0], args.seeds, args.quick, args.reuse)
        if "timeseries" in pretrained:
            jobs |= timeseries_jobs(args.out, pretrained["timeseries"][0], args.seeds, args.quick, args.reuse)
        futures = {key: pool.submit(fit_and_test, *job) for key, job in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}

    figures: dict = {"pretrain_minutes": {domain: round(minutes, 2) for domain, (_, minutes) in pretrained.items()},
                     "seeds": args.seeds, "quick": args.quick}
    print(f"\n{'what':<40}{'mean':>10}{'std':>10}   per seed")
    for (domain, setting, start) in sorted({key[:3] for key in results},
                                           key=lambda k: (k[0], str(k[1]).zfill(4), k[2])):
        runs = {seed: results[domain, setting, start, seed] for seed in args.seeds}
        mean, std = summarise(runs)
        print(f"{f'{domain} {setting} {start}':<40}{mean:>10.4f}{std:>10.4f}   "
              + " ".join(f"{seed}:{value:.4f}" for seed, value in runs.items()))
        if domain == "vision":
            key = f"digits_{setting}_{start}_acc"
            figures[key], figures[f"{key}_std"], figures[f"{key}_runs"] = mean, std, runs
        else:
            key = f"etth1_{start}_mse"
            for suffix, value in (("", mean), ("_std", std), ("_runs", runs)):
                figures.setdefault(key + suffix, {})[setting] = value
    for domain, minutes in figures["pretrain_minutes"].items():
        print(f"pre-training {domain}: {minutes:.1f} min")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
