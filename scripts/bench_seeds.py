"""Headline figures over seeds, every choice made on validation data (issue 11).

    python scripts/bench_seeds.py [--quick] [--json PATH] [--out DIR] [--jobs 2] [--reuse] [--parts digits rl]

digits — the schedule and augmentation chosen again, on validation data: 120 or 240 epochs × ±1-pixel shifts alone
   ("shift") or with ±10° rotations and 10 % scaling ("full"), seeds 0, 1, 2, `configs/vision/vit_tiny_digits.yaml`.
   The candidate with the highest mean validation accuracy (last checkpoint) wins; a difference under one validation
   image (1/180) goes to the cheaper one (fewer epochs, then fewer augmentations). Only the winner's three runs are
   tested (last checkpoint).
rl — CartPole: `dt_cartpole.yaml` and `bc_cartpole.yaml`, seeds 0, 1, 2 (evaluation when fitting ends: eval.json).
   HalfCheetah: the DT recipe of `dt_halfcheetah_{medium,medium_replay}.yaml` + `halfcheetah_cpu_schedule.yaml` was
   fixed on seed 0 (the README's history lists the recipes tried there); it is reported on the fresh seeds 1, 2, 3,
   as CORL does. Behaviour cloning (`bc_halfcheetah_medium.yaml`: CORL's BC recipe) on both datasets and the DT
   paper's 10 %BC (`top_fraction: 0.1`) on medium-replay, seeds 1, 2, 3, recipe fixed before any was run.
Runs go --jobs at a time with one torch thread each; --reuse reads runs already finished in DIR (a fit's eval.json
or metrics) instead of rerunning them. --quick: a few steps of everything (checks the script, not a result).

--json: per figure a mean, its _std and _runs (seed → value): digits_val_acc (candidate → mean), digits_choice,
digits_test_acc; cartpole_dt_return_500, cartpole_dt_spearman (target vs return), cartpole_bc_return;
halfcheetah_{medium,medium_replay}_dt_6000 and _12000 (D4RL-normalised), halfcheetah_{medium,medium_replay}_bc
and halfcheetah_medium_replay_bc10 (normalised), with the
steps each DT run reached (its max_time may stop it before 10,000).
"""

from __future__ import annotations

import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scipy.stats import spearmanr

from polyformer.cli import newest_with

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import QUICK, ROOT, bench_parser, finished, last_value, polyformer, run, write_json  # noqa: E402

DIGITS = ROOT / "configs" / "vision" / "vit_tiny_digits.yaml"
AUGMENT = {"shift": [], "full": ["--data.init_args.max_rotation=10", "--data.init_args.max_scale=0.1"]}
DIGITS_SEEDS, CARTPOLE_SEEDS, CHEETAH_SEEDS = (0, 1, 2), (0, 1, 2), (1, 2, 3)
VAL_IMAGES = 180


def mean_std(runs: dict) -> dict:
    values = list(runs.values())
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": runs}


class Runner:
    def __init__(self, out: Path, quick: bool, reuse: bool):
        self.out, self.quick, self.reuse = out, quick, reuse

    def fit(self, config: Path, name: str, extra: list[str], done: str) -> Path:
        """`polyformer fit` unless --reuse finds `done` (a file or a metric) in the run; returns the run folder."""
        run_dir = self.out / "runs" / config.parent.name / name
        found = newest_with(run_dir, done) if done.endswith(".json") else finished(run_dir, done)
        if not (self.reuse and found is not None):
            where = [f"--run.root={self.out / 'runs'}", f"--run.name={name}", "--trainer.enable_progress_bar=false"]
            run(polyformer("fit", "-c", str(config), *where, *extra, *(QUICK if self.quick else [])),
                self.out / "logs" / f"{name}.fit.log")
        return run_dir


def eval_rows(run_dir: Path) -> list[dict]:
    return json.loads(newest_with(run_dir, "eval.json").read_text())


def digits(runner: Runner, jobs: int) -> dict:
    candidates = {f"{epochs}_{augment}": (epochs, augment) for epochs in (120, 240) for augment in AUGMENT}

    def fit(job: tuple[str, int]) -> tuple[tuple[str, int], float]:
        key, seed = job
        epochs, augment = candidates[key]
        run_dir = runner.fit(DIGITS, f"digits_{key}_seed{seed}", [f"--seed_everything={seed}",
                             f"--trainer.max_epochs={epochs}", *AUGMENT[augment]], "val/acc1")
        return job, last_value(run_dir, "val/acc1")

    with ThreadPoolExecutor(jobs) as pool:
        val = dict(pool.map(fit, [(key, seed) for key in candidates for seed in DIGITS_SEEDS]))
    val_means = {key: statistics.mean(val[(key, s)] for s in DIGITS_SEEDS) for key in candidates}
    best = max(val_means.values())
    # candidates within one validation image of the best; the cheapest wins (fewer epochs, then fewer augmentations)
    close = [key for key in candidates if val_means[key] > best - 1 / VAL_IMAGES]
    choice = min(close, key=lambda key: (candidates[key][0], candidates[key][1] != "shift"))
    test = {}
    for seed in DIGITS_SEEDS:
        name = f"digits_{choice}_seed{seed}"
        run_dir = runner.out / "runs" / "vision" / name
        checkpoint = newest_with(run_dir, "checkpoints/last.ckpt")
        if not (runner.reuse and finished(run_dir, "test/acc1") is not None):
            epochs, augment = candidates[choice]
            where = [f"--run.root={runner.out / 'runs'}", f"--run.name={name}"]
            run(polyformer("test", "-c", str(DIGITS), *where, f"--ckpt_path={checkpoint}",
                           f"--seed_everything={seed}", *AUGMENT[augment]), runner.out / "logs" / f"{name}.test.log")
        test[seed] = last_value(run_dir, "test/acc1")
    return {"digits_val_acc": val_means,
            "digits_val_acc_runs": {key: {s: val[(key, s)] for s in DIGITS_SEEDS} for key in candidates},
            "digits_choice": choice, "digits_test_acc": mean_std(test)}


def rl(runner: Runner, jobs: int) -> dict:
    configs = ROOT / "configs" / "rl"
    schedule = ["-c", str(configs / "halfcheetah_cpu_schedule.yaml")]
    fits = {}  # figure name → (config, run name, extra, seed)
    for seed in CARTPOLE_SEEDS:
        fits[("cartpole_dt", seed)] = (configs / "dt_cartpole.yaml", f"dt_cartpole_seed{seed}", [])
        fits[("cartpole_bc", seed)] = (configs / "bc_cartpole.yaml", f"bc_cartpole_seed{seed}", [])
    for seed in CHEETAH_SEEDS:
        for data in ("medium", "medium_replay"):
            fits[(f"halfcheetah_{data}_dt", seed)] = (configs / f"dt_halfcheetah_{data}.yaml",
                                                      f"dt_halfcheetah_{data}_seed{seed}", schedule)
        for data, fraction in (("medium", "1.0"), ("medium-replay", "1.0"), ("medium-replay", "0.1")):
            figure = f"halfcheetah_{data.replace('-', '_')}_bc" + ("10" if fraction == "0.1" else "")
            fits[(figure, seed)] = (configs / "bc_halfcheetah_medium.yaml", f"bc_{data}_top{fraction}_seed{seed}",
                                    [f"--data.init_args.dataset=polyformer/halfcheetah/{data}-v0",
                                     f"--data.init_args.top_fraction={fraction}"])

    quick = ["--model.init_args.evaluation.episodes=1"] if runner.quick else []

    def fit(key):
        config, name, extra = fits[key]
        return key, runner.fit(config, name, [*extra, f"--seed_everything={key[1]}", *quick], "eval.json")

    with ThreadPoolExecutor(jobs) as pool:
        done = dict(pool.map(fit, fits))
    figures: dict = {}
    for (figure, seed), run_dir in sorted(done.items()):
        rows = eval_rows(run_dir)
        if figure == "cartpole_dt":
            value = next(r["return_mean"] for r in rows if r["target"] == 500)
            figures.setdefault("cartpole_dt_return_500", {})[seed] = value
            rho = spearmanr([r["target"] for r in rows], [r["return_mean"] for r in rows]).statistic
            figures.setdefault("cartpole_dt_spearman", {})[seed] = float(rho)
        elif figure == "cartpole_bc":
            figures.setdefault("cartpole_bc_return", {})[seed] = rows[0]["return_mean"]
        elif figure.endswith("_dt"):
            for row in rows:
                figures.setdefault(f"{figure}_{int(row['target'])}", {})[seed] = row["normalized_mean"]
            steps = last_value(run_dir, "step") + 1
            figures.setdefault(f"{figure}_steps", {})[seed] = int(steps)
        else:
            figures.setdefault(figure, {})[seed] = rows[0]["normalized_mean"]
    return {name: (mean_std(runs) if not name.endswith("_steps") else runs) for name, runs in figures.items()}


def main() -> None:
    parser = bench_parser(__doc__.split("\n")[0], ROOT / "bench_out" / "seeds")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--parts", nargs="+", default=["digits", "rl"], choices=["digits", "rl"])
    args = parser.parse_args()
    runner = Runner(args.out, args.quick, args.reuse)
    figures = {"quick": args.quick}
    if "digits" in args.parts:
        figures.update(digits(runner, args.jobs))
    if "rl" in args.parts:
        figures.update(rl(runner, args.jobs))
    print(json.dumps(figures, indent=1))
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
