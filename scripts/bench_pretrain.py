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

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from polyformer.bench import QUICK, fit, fit_and_test, recorded, runs_parser, summarise, write_json
from polyformer.checkpoint import save_weights
from polyformer.data import PROJECT_ROOT as ROOT

CONFIGS = ROOT / "configs"
HORIZONS = (96, 192, 336, 720)


def pretrain(config: Path, out: Path, extra: list[str], reuse: bool) -> tuple[Path, float]:
    """Pre-trains, writes the best-validation checkpoint weights-only; (weights file, minutes of the fit)."""
    name = config.stem
    weights = out / "weights" / f"{name}.ckpt"

    def produce() -> dict:
        fitted = fit([config], out, name, extra)
        best = fitted.checkpoint("best")
        digest = save_weights(best, weights)
        print(f"{weights}: sha256 {digest}", flush=True)
        return {"minutes": fitted.seconds / 60, "sha256": digest, "checkpoint": str(best)}

    return weights, recorded(out / "weights" / f"{name}.json", reuse, produce, done=weights.is_file())["minutes"]


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
