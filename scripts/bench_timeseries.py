"""Time-series benchmark: PatchTST and DLinear on an ETT-format file against the published figures, a forecast plot,
and training throughput of our PatchTST against HF transformers' PatchTSTForPrediction.

    python scripts/bench_timeseries.py [--quick] [--csv PATH] [--horizons 96,192,336,720] [--json PATH] [--out DIR]
                                       [--reuse]

Each horizon trains configs/timeseries/patchtst_etth1_{H}.yaml and dlinear_etth1_96.yaml (horizon overridden) as
`polyformer fit` processes (polyformer.bench), then tests the checkpoint with the best validation MSE on every test
window; --reuse reads finished runs' records from --out instead.
Throughput: both models built the same way (L 336, patch 16, stride 8, 41 patches: our end padding is off here because
HF has none; d 16, 4 heads, 3 layers, ffn 128, post-norm BatchNorm, dropout 0.3, RevIN / std scaling, MSE, AdamW),
one training step each in turn (a rotating order) on the same batch, medians over the timed steps; ratio = our
samples/s ÷ HF's, and ratio_nn_dropout the same with torch's nn.Dropout in place of our RandDropout.
--quick trains a few batches and tests a few batches: a smoke run of the whole script, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from polyformer.bench import bench_parser, evaluate, fit, last_value, recorded, run_dir, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "timeseries"

# PatchTST paper (Nie et al., ICLR 2023) Table 3, ETTh1 multivariate, (MSE, MAE); DLinear as reported there
PUBLISHED = {
    "PatchTST/64": {96: (0.370, 0.400), 192: (0.413, 0.429), 336: (0.422, 0.440), 720: (0.447, 0.468)},
    "PatchTST/42": {96: (0.375, 0.399), 192: (0.414, 0.421), 336: (0.431, 0.436), 720: (0.449, 0.466)},
    "DLinear": {96: (0.375, 0.399), 192: (0.405, 0.416), 336: (0.439, 0.443), 720: (0.472, 0.490)},
}


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__.splitlines()[0], ROOT / "bench_out" / "timeseries")
    parser.add_argument("--csv", type=Path, default=None, help="ETT-format CSV (default: $POLYFORMER_ETT_CSV or ETTh1)")
    parser.add_argument("--horizons", default=None, help="comma-separated H (default 96,192,336,720; --quick: 96)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared, oversubscribed machine)")
    parser.add_argument("--throughput-steps", type=int, default=None, help="timed steps per model (default 20)")
    parser.add_argument("--throughput-only", action="store_true", help="the throughput part alone; --json: its figures")
    return parser.parse_args()


def default_csv() -> Path:
    from polyformer.data import shared_data_dir

    return Path(os.environ.get("POLYFORMER_ETT_CSV", shared_data_dir() / "ett" / "ETTh1.csv"))


def train_and_test(config: Path, horizon: int, csv: Path, out: Path, quick: bool, threads: int,
                   reuse: bool) -> dict:
    """`polyformer fit` of `config` at horizon H, then `polyformer test` of its checkpoint with the best validation
    MSE on every test window (polyformer.bench; with `reuse`, a finished run's record is read back)."""
    name = f"{config.stem}_h{horizon}"
    extra = [f"--model.init_args.model.horizon={horizon}", f"--data.init_args.horizon={horizon}",
             f"--data.init_args.path={csv}", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false",
             *(["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
                "--trainer.limit_test_batches=2"] if quick else [])]

    def produce() -> dict:
        folder = run_dir(out, config, name)
        fitted = fit([config], out, name, extra, threads=threads)
        best = fitted.checkpoint("best")
        evaluate("test", [config], out, name, extra, best, threads=threads)
        return {"mse": last_value(folder, "test/mse"), "mae": last_value(folder, "test/mae"),
                "seconds": fitted.seconds, "checkpoint": str(best)}

    return recorded(out / "records" / f"{name}.json", reuse, produce)


def test_data(config: Path, horizon: int, csv: Path):
    """The config's data module at horizon H on `csv`, set up for testing."""
    import yaml

    from polyformer.cli import datamodule_from

    section = yaml.safe_load(config.read_text())["data"]
    section["init_args"] |= {"horizon": horizon, "path": str(csv)}
    data = datamodule_from(section)
    data.setup("test")
    return data


def plot_forecast(data, patchtst: tuple[Path, dict], dlinear: tuple[Path, dict], horizon: int, path: Path) -> None:
    """Lookback tail, truth and both forecasts of the last channel (OT for ETT) for the middle test window, from the
    two (config, run record)s' tested checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyformer.cli import task_from

    test = data.datasets["test"]
    x, y = test[len(test) // 2]
    with torch.no_grad():
        ours, linear = (task_from([str(config)], record["checkpoint"])(x[None])[0, :, -1]
                        for config, record in (patchtst, dlinear))
    tail = min(len(x), 2 * horizon)
    past = range(-tail, 0)
    future = range(0, horizon)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(past, x[-tail:, -1], color="black", lw=1, label="lookback")
    ax.plot(future, y[:, -1], color="black", lw=1, ls="--", label="truth")
    ax.plot(future, ours, color="tab:blue", label="PatchTST (ours)")
    ax.plot(future, linear, color="tab:orange", label="DLinear (ours)")
    ax.set(xlabel="steps from the forecast origin", ylabel=f"{data.channels[-1]} (scaled)",
           title=f"test window {len(test) // 2}, H = {horizon}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def throughput(steps: int, warmup: int, batch: int = 128) -> dict:
    """Alternating training steps of our PatchTST and HF's PatchTSTForPrediction, identically configured."""
    from transformers import PatchTSTConfig as HFConfig
    from transformers import PatchTSTForPrediction

    from polyformer.domains.timeseries import PatchTST, PatchTSTConfig
    from polyformer.transformer import TransformerConfig

    def patchtst(dropout_mask: str) -> PatchTST:
        encoder = TransformerConfig(dim=16, depth=3, heads=4, mlp_ratio=8.0, prenorm=False, norm="batchnorm",
                                    dropout=0.3, dropout_mask=dropout_mask, position="learned")
        return PatchTST(PatchTSTConfig(lookback=336, horizon=96, patch_len=16, stride=8, padding="none",
                                       encoder=encoder, embed_dropout=0.3)).train()

    torch.manual_seed(0)
    ours = patchtst("rand")
    hf_config = HFConfig(num_input_channels=7, context_length=336, prediction_length=96, patch_length=16,
                         patch_stride=8, d_model=16, num_attention_heads=4, num_hidden_layers=3, ffn_dim=128,
                         norm_type="batchnorm", pre_norm=False, positional_encoding_type="random",
                         use_cls_token=False, pooling_type=None, scaling="std", loss="mse", do_mask_input=False,
                         attention_dropout=0.0, positional_dropout=0.3, path_dropout=0.3, ff_dropout=0.3,
                         head_dropout=0.0, share_projection=True, attn_implementation="sdpa")
    hf = PatchTSTForPrediction(hf_config).train()
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    # ours with torch's own nn.Dropout (dropout_mask bernoulli) in place of RandDropout (the same masks' distribution)
    ours_nn_dropout = patchtst("bernoulli")
    ours_nn_dropout.load_state_dict(ours.state_dict())
    x, y = torch.randn(batch, 336, 7), torch.randn(batch, 96, 7)
    models = {"ours": ours, "hf": hf, "ours_nn_dropout": ours_nn_dropout}
    optimizers = {name: torch.optim.AdamW(model.parameters(), 1e-4) for name, model in models.items()}
    losses = {"ours": lambda: F.mse_loss(ours(x), y), "hf": lambda: hf(past_values=x, future_values=y).loss,
              "ours_nn_dropout": lambda: F.mse_loss(ours_nn_dropout(x), y)}
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(warmup + steps):
        for name in names[i % 3:] + names[:i % 3]:  # a rotating order
            start = time.perf_counter()
            loss = losses[name]()
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"batch": batch, "steps": steps, "threads": torch.get_num_threads(),
            "ours_samples_per_s": batch / medians["ours"], "hf_samples_per_s": batch / medians["hf"],
            "ours_nn_dropout_samples_per_s": batch / medians["ours_nn_dropout"],
            "ratio": medians["hf"] / medians["ours"], "ratio_nn_dropout": medians["hf"] / medians["ours_nn_dropout"],
            "params": {"ours": sum(p.numel() for p in ours.parameters()),
                       "hf": sum(p.numel() for p in hf.parameters())}}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    csv = (args.csv or default_csv()).resolve()  # the runs start in the repository
    if not csv.is_file():
        raise SystemExit(f"--csv: expected an ETT-format CSV file, found nothing at {csv}")
    if args.throughput_only:
        speed = throughput(args.throughput_steps or (4 if args.quick else 20), warmup=1 if args.quick else 3)
        print(json.dumps(speed, indent=2))
        write_json(args.json, speed | {"quick": args.quick})
        return
    horizons = [int(h) for h in (args.horizons or ("96" if args.quick else "96,192,336,720")).split(",")]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    results: dict = {"horizons": {}, "csv": str(csv), "quick": args.quick}
    for horizon in horizons:
        config = CONFIGS / f"patchtst_etth1_{horizon}.yaml"
        config = config if config.is_file() else CONFIGS / "patchtst_etth1_96.yaml"
        dlinear_config = CONFIGS / "dlinear_etth1_96.yaml"
        patchtst = train_and_test(config, horizon, csv, out, args.quick, args.threads, args.reuse)
        dlinear = train_and_test(dlinear_config, horizon, csv, out, args.quick, args.threads, args.reuse)
        data = test_data(config, horizon, csv)
        results["horizons"][str(horizon)] = {
            "mse": patchtst["mse"], "mae": patchtst["mae"], "train_seconds": patchtst["seconds"],
            "dlinear_mse": dlinear["mse"], "dlinear_mae": dlinear["mae"], "dlinear_train_seconds": dlinear["seconds"],
            "test_windows": len(data.datasets["test"]),
        }
        if horizon == horizons[0]:
            plot = out / f"forecast_h{horizon}.png"
            plot_forecast(data, (config, patchtst), (dlinear_config, dlinear), horizon, plot)
            results["plot"] = str(plot)

    steps = args.throughput_steps or (4 if args.quick else 20)
    speed = throughput(steps, warmup=1 if args.quick else 3)
    results["train_ratio_vs_hf"] = speed["ratio"]
    results["throughput"] = speed

    print(f"\n{csv.name}, L = 336, MSE / MAE on all test windows (published: PatchTST paper Table 3)")
    print(f"{'H':>5} | {'PatchTST ours':>15} | {'DLinear ours':>15} | {'PatchTST/42':>13} | {'PatchTST/64':>13} | "
          f"{'DLinear pub.':>13} | {'train s':>8}")
    for horizon in horizons:
        r = results["horizons"][str(horizon)]
        published = [PUBLISHED[name].get(horizon) for name in ("PatchTST/42", "PatchTST/64", "DLinear")]
        cells = [f"{p[0]:.3f} / {p[1]:.3f}" if p else "-" for p in published]
        print(f"{horizon:>5} | {r['mse']:.3f} / {r['mae']:.3f} | {r['dlinear_mse']:.3f} / {r['dlinear_mae']:.3f} | "
              f"{cells[0]:>13} | {cells[1]:>13} | {cells[2]:>13} | {r['train_seconds']:>8.0f}")
    print(f"\ntraining throughput, batch {speed['batch']}, {speed['threads']} thread(s), median of {steps} steps: "
          f"ours {speed['ours_samples_per_s']:.0f} samples/s, HF PatchTSTForPrediction (sdpa) "
          f"{speed['hf_samples_per_s']:.0f} samples/s, ratio {speed['ratio']:.2f}")
    if "plot" in results:
        print(f"forecast plot: {results['plot']}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
