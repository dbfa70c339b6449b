"""The experiment runner every `scripts/bench_*.py` is built on: `polyformer` runs as subprocesses, their metrics,
records that let a benchmark finish over several sittings (--reuse), seeds, parallel jobs and the JSON it writes.

    from polyformer.bench import bench_parser, fit_and_test, recorded, summarise, write_json
    acc = fit_and_test(CONFIGS / "vision" / "vit_tiny_digits.yaml", out, "vit_seed1", ["--seed_everything=1"],
                       checkpoint="last", metric="test/acc1", reuse=args.reuse)

or, where a benchmark reads more than one metric or evaluates on more than one stage, its two halves:

    fitted = fit([config], out, name, extra)       # Fit(seconds, version folder)
    evaluate("test", [config], out, name, extra, fitted.checkpoint("best"))
    mse = last_value(run_dir(out, config, name), "test/mse")

A run is `polyformer fit` then `polyformer test` of one of its checkpoints, under out/runs/<domain>/<name>/, its
output in out/logs/<name>.{fit,test}.log, one torch thread per process (jobs run side by side on separate cores).
Metrics are read from the run's metrics.csv: the last value logged, in the newest version that logged it.
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
from dataclasses import dataclass
from pathlib import Path

from polyformer.cli import newest_version, version_numbers
from polyformer.data import PROJECT_ROOT

# a few batches of everything: what a benchmark's --quick adds to each run (a check of the script, not a result)
# (every step logged, so that the metrics a benchmark reads exist after 3 steps: a config's log_every_n_steps of 100
# left HalfCheetah's quick fits without any)
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2", "--trainer.check_val_every_n_epoch=1", "--trainer.log_every_n_steps=1"]


class RunError(RuntimeError):
    """A command of a benchmark failed; the message names the command and its log."""


def polyformer(*args: str) -> list[str]:
    """The `polyformer` command through this interpreter, so that it works without an activated environment."""
    return [sys.executable, "-m", "polyformer.cli", *args]


def run(command: list[str], log: Path, cwd: Path = PROJECT_ROOT, threads: int | None = 1) -> float:
    """Runs a command with `threads` torch threads (None: as the environment says), its output to `log`; returns its
    wall seconds. A failure prints the log's last lines and raises a RunError naming the command and the log (which
    may sit in a temporary folder)."""
    print("$", shlex.join(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = os.environ if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("w") as out:
        result = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print("\n".join(["--- last lines of " + str(log), *tail]), file=sys.stderr, flush=True)
        raise RunError(f"failed ({result.returncode}): {shlex.join(command)}; see {log}")
    return time.perf_counter() - start


# ---- metrics ----------------------------------------------------------------------------------------------------
def last_values(metrics_csv: Path) -> dict[str, float]:
    """The last value logged of every metric in a metrics.csv (Lightning's CSVLogger)."""
    values: dict[str, float] = {}
    with metrics_csv.open() as file:
        for row in csv.DictReader(file):
            values.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return values


def history(run_dir: Path, name: str) -> list[float]:
    """Every value of a metric in the newest version of a run that logged it, in order (e.g. val/map50 per epoch)."""
    for version in reversed(version_numbers(run_dir)):
        metrics = run_dir / f"version_{version}" / "metrics.csv"
        if metrics.is_file():
            with metrics.open() as file:
                values = [float(row[name]) for row in csv.DictReader(file) if row.get(name) not in ("", None)]
            if values:
                return values
    raise KeyError(f"{name} not logged in any version under {run_dir}")


def last_value(run_dir: Path, name: str) -> float:
    """The last logged value of a metric in the newest version of a run that logged it (a fit's validation metrics
    sit in an older version than the test run of its checkpoint)."""
    return history(run_dir, name)[-1]


def finished(run_dir: Path, name: str) -> float | None:
    """The metric of a run already finished (a version logged it), else None."""
    try:
        return last_value(run_dir, name)
    except KeyError:
        return None


# ---- runs -------------------------------------------------------------------------------------------------------
def run_dir(out: Path, config: Path, name: str) -> Path:
    """Where `polyformer` writes the run `name` of a config under out/runs: out/runs/<config's folder>/<name>."""
    return out / "runs" / config.parent.name / name


def command(subcommand: str, configs: list[Path], out: Path, name: str, extra: list[str]) -> list[str]:
    """`polyformer <subcommand> -c <config> ...` as the run `name` under out/runs, then `extra`."""
    files = [arg for config in configs for arg in ("-c", str(config))]
    return polyformer(subcommand, *files, f"--run.root={out / 'runs'}", f"--run.name={name}", *extra)


@dataclass(frozen=True)
class Fit:
    """A finished `polyformer fit`: its wall seconds and its version folder (out/runs/<domain>/<name>/version_N)."""

    seconds: float
    version: Path

    def checkpoint(self, which: str) -> Path:
        """One of the fit's checkpoints: `best` or `last`."""
        return self.version / "checkpoints" / f"{which}.ckpt"


def fit(configs: list[Path], out: Path, name: str, extra: list[str], threads: int | None = 1) -> Fit:
    """`polyformer fit -c <config> ... <extra>` as the run `name` under out/runs (its domain the first config's
    folder), its output in out/logs/<name>.fit.log."""
    seconds = run(command("fit", configs, out, name, extra), out / "logs" / f"{name}.fit.log", threads=threads)
    return Fit(seconds, newest_version(run_dir(out, configs[0], name)))


def evaluate(stage: str, configs: list[Path], out: Path, name: str, extra: list[str], checkpoint: Path,
             threads: int | None = 1, tag: str = "") -> None:
    """`polyformer <stage>` (validate / test) of a checkpoint, as a new version of the run `name`, its output in
    out/logs/<name>.<stage>[_<tag>].log; its metrics are read with last_value(run_dir(...), "<stage>/<metric>")."""
    log = out / "logs" / f"{name}.{stage}{f'_{tag}' if tag else ''}.log"
    run(command(stage, configs, out, name, [*extra, f"--ckpt_path={checkpoint}"]), log, threads=threads)


def fit_and_test(config: Path, out: Path, name: str, extra: list[str], checkpoint: str, metric: str,
                 reuse: bool) -> float:
    """`polyformer fit` then `polyformer test` of its `checkpoint` (best / last); returns the test metric. With
    `reuse`, a run that already logged the metric is read instead of run again."""
    folder = run_dir(out, config, name)
    if reuse and (value := finished(folder, metric)) is not None:
        print(f"reusing {folder}: {metric} {value:.4f}", flush=True)
        return value
    fitted = fit([config], out, name, extra)
    evaluate("test", [config], out, name, extra, fitted.checkpoint(checkpoint))
    return last_value(folder, metric)


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


# ---- figures ----------------------------------------------------------------------------------------------------
def summarise(runs: dict[int, float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of per-seed values; std 0 for a single seed."""
    values = list(runs.values())
    if not values:
        raise ValueError("summarise: expected at least one run, found none")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_json(path: Path | None, figures: dict) -> None:
    """The figures as JSON at `path` (nothing when None), as the benchmark measured them."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {path}")


# ---- command lines ----------------------------------------------------------------------------------------------
def bench_parser(description: str, out: Path) -> argparse.ArgumentParser:
    """The options every benchmark made of `polyformer` runs takes: --quick, --json, --out, --reuse."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few batches of everything: checks the script only")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--out", type=Path, default=out, help="runs, logs and what the runs write")
    parser.add_argument("--reuse", action="store_true", help="read runs already finished in --out instead of rerunning")
    return parser


def runs_parser(description: str, out: Path, domains: list[str]) -> argparse.ArgumentParser:
    """bench_parser's options, and --jobs, --seeds, --domains."""
    parser = bench_parser(description, out)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--domains", nargs="+", default=domains, choices=domains)
    return parser
