"""Benchmark of the RL domain: CartPole DT vs BC, target-return conditioning, KV-cache acting, training speed vs HF.

    python scripts/bench_rl.py [--quick] [--json PATH] [--figure PATH] [--threads N]

1. CartPole-v1 (the project's own mixed data): trains the DT (configs/rl/dt_cartpole.yaml) and BC
   (configs/rl/bc_cartpole.yaml) as `polyformer fit` processes (polyformer.bench, in a temporary folder), evaluates
   the DT at targets 50..500 and BC, and draws the DT paper's figure: achieved return against target return, with
   the dataset's best and mean marked.
2. HalfCheetah-v5: the 30-minute target runs are too long for a benchmark; their eval.json (written when
   `polyformer fit` ends, see domains/rl/README.md) is read from --runs and its path printed. Missing runs → null.
3. Acting latency: per-step time with the KV cache against recomputing the context (a full forward over the steps
   an action can depend on, which gives the same actions), alternating blocks of steps, medians.
4. Training throughput: our DT against HF transformers' DecisionTransformerModel of the same size (dim 128, 3 layers,
   1 head, relu MLP 4×, dropout 0.1, K = 20, batch 64), alternating steps in one process, medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from polyformer import bench
from polyformer.cli import newest_with

ROOT = Path(__file__).resolve().parents[1]


def fit(config: str, out: Path, extra: list[str], threads: int | None) -> tuple[list[dict], float]:
    """Trains through `polyformer fit` (evaluation runs at the end of fit) with `threads` torch threads (None: torch's
    choice); returns the eval rows and the fit process's wall seconds."""
    fitted = bench.fit([ROOT / config], out, Path(config).stem, ["--trainer.enable_progress_bar=false",
                                                                 "--trainer.enable_model_summary=false", *extra],
                       threads=threads)
    return json.loads((fitted.version / "eval.json").read_text()), fitted.seconds


def cartpole(args, out: Path) -> dict:
    from scipy.stats import spearmanr

    from polyformer.domains.rl.data import load_offline_data

    data = load_offline_data("polyformer/cartpole/mixed-v0")
    extra = ["--trainer.max_steps=300"] if args.quick else []
    dt_rows, dt_seconds = fit("configs/rl/dt_cartpole.yaml", out, extra, args.threads)
    bc_rows, bc_seconds = fit("configs/rl/bc_cartpole.yaml", out, extra, args.threads)
    targets = [row["target"] for row in dt_rows]
    means = [row["return_mean"] for row in dt_rows]
    at_500 = next(row for row in dt_rows if row["target"] == 500)
    return {
        "dataset_mean": float(data.returns.mean()), "dataset_best": float(data.returns.max()),
        "dt_rows": dt_rows, "bc_rows": bc_rows, "dt_seconds": dt_seconds, "bc_seconds": bc_seconds,
        "dt_return": at_500["return_mean"], "dt_return_std": at_500["return_std"],
        "bc_return": bc_rows[0]["return_mean"], "bc_return_std": bc_rows[0]["return_std"],
        "spearman": float(spearmanr(targets, means).statistic),
    }


def halfcheetah(runs: Path) -> dict:
    """The newest eval.json of each HalfCheetah target run (and BC run), at the paper's target 6,000."""
    found = {}
    for name in ("medium", "medium_replay"):
        dt_eval = newest_with(runs / f"dt_halfcheetah_{name}", "eval.json")
        if dt_eval is None:
            continue
        rows = json.loads(dt_eval.read_text())
        at_6000 = next((row for row in rows if row["target"] == 6000), rows[0])
        found[name] = {"path": str(dt_eval), "rows": rows, "return": at_6000["return_mean"],
                       "normalized": at_6000.get("normalized_mean"), "target": at_6000["target"]}
        bc_eval = newest_with(runs / f"bc_halfcheetah_{name}", "eval.json")
        if bc_eval is not None:  # BC on the same data, when it was run (configs/rl/bc_halfcheetah_medium.yaml)
            found[name]["bc_path"] = str(bc_eval)
            found[name]["bc_row"] = json.loads(bc_eval.read_text())[0]
    return found


def halfcheetah_size_dt(dropout: float):
    from polyformer.domains.rl.model import DecisionTransformer
    from polyformer.transformer import TransformerConfig

    encoder = TransformerConfig(dim=128, depth=3, heads=1, mlp_ratio=4.0, activation="relu", dropout=dropout,
                                attn_dropout=dropout)
    return DecisionTransformer(17, 6, discrete=False, encoder=encoder, context=20, max_ep_len=1000)


def acting_latency(steps: int, block: int = 20) -> dict:
    """Per-step seconds acting with the KV cache vs recomputing, on one HalfCheetah-sized episode, alternating."""
    from polyformer.domains.rl.evaluate import DTPolicy

    torch.manual_seed(0)
    model = halfcheetah_size_dt(0.0).eval()
    observations = torch.randn(steps, 1, 17, generator=torch.Generator().manual_seed(1))
    policies = {"cache": DTPolicy(model, torch.tensor([6000.0])),
                "recompute": DTPolicy(model, torch.tensor([6000.0]), cache=False),
                # the DT paper's acting: a full forward over the last K steps (a re-cut context: other actions)
                "recompute_last_k": DTPolicy(model, torch.tensor([6000.0]), cache=False,
                                             recompute_steps=model.context)}
    times: dict[str, list[float]] = {name: [] for name in policies}
    max_difference = 0.0
    for first in range(0, steps, block):  # both policies walk the same episode; their order alternates per block
        names = list(policies)
        order = names[(first // block) % 3:] + names[:(first // block) % 3]  # a rotating order
        actions = {}
        for name in order:
            acted = []
            for t in range(first, min(first + block, steps)):
                start = time.perf_counter()
                acted.append(policies[name].act(observations[t]))
                times[name].append(time.perf_counter() - start)
                policies[name].observe(torch.tensor([1.0]))
            actions[name] = torch.cat(acted)
        max_difference = max(max_difference, float((actions["cache"] - actions["recompute"]).abs().max()))
    # the first `receptive_steps` steps recompute a shorter context; the steady state starts after them
    steady = model.receptive_steps
    median = {name: statistics.median(values[steady:] or values) for name, values in times.items()}
    return {"cache_ms": 1e3 * median["cache"], "recompute_ms": 1e3 * median["recompute"],
            "recompute_last_k_ms": 1e3 * median["recompute_last_k"],
            "speedup": median["recompute"] / median["cache"],
            "speedup_vs_last_k": median["recompute_last_k"] / median["cache"],
            "max_action_difference": max_difference, "steps": steps, "recompute_steps": steady,
            "last_k_steps": model.context}


def training_throughput(steps: int, batch: int = 64, k: int = 20) -> dict:
    """Seconds per optimizer step of our DT and HF's, same size and batch, alternating; medians."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    ours = halfcheetah_size_dt(0.1).train()
    def hf_dt(embedding_dropout: float):
        return DecisionTransformerModel(DecisionTransformerConfig(
            state_dim=17, act_dim=6, hidden_size=128, n_layer=3, n_head=1, n_inner=512, activation_function="relu",
            max_ep_len=1000, resid_pdrop=0.1, embd_pdrop=embedding_dropout, attn_pdrop=0.1, action_tanh=True)).train()

    # HF as published (embedding dropout 0.1, which ours lacks), and without it: the same dropout as ours. What HF
    # still does beyond ours: GPT-2's own position table added to the tokens (131,072 parameters) and the state and
    # return heads (computed, unused by the action loss): 133,522 parameters, ~0.1 % of a step's FLOPs
    hf = hf_dt(0.1)
    hf_same_dropout = hf_dt(0.0)
    hf_same_dropout.load_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(2)
    states, actions = torch.randn(batch, k, 17, generator=g), torch.rand(batch, k, 6, generator=g) * 2 - 1
    rtg, timesteps = torch.rand(batch, k, generator=g) * 5, torch.randint(0, 980, (batch, k), generator=g)
    padding = torch.zeros(batch, k, dtype=torch.bool)
    padding[:8, 15:] = True  # some segments run past their episode's end, as in training

    def our_loss():
        out = ours(rtg, states, actions, timesteps, padding)
        return torch.nn.functional.mse_loss(out[~padding], actions[~padding])

    def hf_loss(model):
        out = model(states=states, actions=actions, rewards=torch.zeros(batch, k, 1), returns_to_go=rtg[..., None],
                    timesteps=timesteps, attention_mask=(~padding).long(), return_dict=True)
        return torch.nn.functional.mse_loss(out.action_preds[~padding], actions[~padding])

    runs = {"ours": (ours, our_loss), "hf": (hf, lambda: hf_loss(hf)),
            "hf_no_embedding_dropout": (hf_same_dropout, lambda: hf_loss(hf_same_dropout))}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
                  for name, (model, _) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps + 3):
        names = list(runs)
        for name in names[i % 3:] + names[:i % 3]:  # a rotating order
            model, loss_fn = runs[name]
            start = time.perf_counter()
            loss = loss_fn()
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizers[name].step()
            if i >= 3:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"ours_samples_per_s": batch / median["ours"], "hf_samples_per_s": batch / median["hf"],
            "hf_no_embedding_dropout_samples_per_s": batch / median["hf_no_embedding_dropout"],
            "ratio": median["hf"] / median["ours"],
            "ratio_same_dropout": median["hf_no_embedding_dropout"] / median["ours"], "steps": steps, "batch": batch,
            "k": k,
            "ours_params": sum(p.numel() for p in ours.parameters()),
            "hf_params": sum(p.numel() for p in hf.parameters())}


def draw_figure(path: Path, cart: dict, cheetah: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("CartPole-v1 (mixed data)", cart["dt_rows"], cart["dataset_mean"], cart["dataset_best"],
               cart["bc_return"])]
    for name, label in (("medium", "HalfCheetah-v5 medium"), ("medium_replay", "HalfCheetah-v5 medium-replay")):
        if name in cheetah:
            returns = cheetah[name].get("dataset_returns")
            bc = cheetah[name].get("bc_row", {}).get("return_mean")
            panels.append((label, cheetah[name]["rows"], returns[0] if returns else None,
                           returns[1] if returns else None, bc))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, mean, best, bc) in zip(axes[0], panels):
        targets = np.array([row["target"] for row in rows])
        means = np.array([row["return_mean"] for row in rows])
        stds = np.array([row["return_std"] for row in rows])
        ax.plot(targets, means, "o-", color="tab:blue", label="Decision Transformer")
        ax.fill_between(targets, means - stds, means + stds, color="tab:blue", alpha=0.2)
        ax.plot(targets, targets, ":", color="gray", label="oracle (return = target)")
        if best is not None:
            ax.axhline(best, color="tab:green", ls="--", label="best trajectory in dataset")
        if mean is not None:
            ax.axhline(mean, color="tab:orange", ls="--", label="dataset mean")
        if bc is not None:
            ax.axhline(bc, color="tab:red", ls="-.", label="behaviour cloning")
        ax.set(title=title, xlabel="target return", ylabel="achieved return")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def report(args, cart: dict, cheetah: dict, latency: dict, throughput: dict) -> dict:
    """Prints the table, draws the figure and returns the headline figures."""
    draw_figure(args.figure, cart, cheetah)
    print(f"\nCartPole-v1 (data: mean {cart['dataset_mean']:.1f}, best {cart['dataset_best']:.0f}); "
          f"DT fit+eval {cart['dt_seconds']:.0f} s, BC {cart['bc_seconds']:.0f} s")
    print("  target | DT return mean ± std")
    for row in cart["dt_rows"]:
        print(f"  {row['target']:6g} | {row['return_mean']:6.1f} ± {row['return_std']:5.1f}")
    print(f"  BC: {cart['bc_return']:.1f} ± {cart['bc_return_std']:.1f}; Spearman(target, return) = "
          f"{cart['spearman']:.3f}")
    for name, run in cheetah.items():
        print(f"HalfCheetah-v5 {name} (from {run['path']}):")
        for row in run["rows"]:
            print(f"  target {row['target']:g}: return {row['return_mean']:.1f} ± {row['return_std']:.1f}, "
                  f"normalised {row['normalized_mean']:.1f} ± {row['normalized_std']:.1f}")
        if "bc_row" in run:
            row = run["bc_row"]
            print(f"  BC (from {run['bc_path']}): return {row['return_mean']:.1f} ± {row['return_std']:.1f}, "
                  f"normalised {row['normalized_mean']:.1f} ± {row['normalized_std']:.1f}")
    print(f"Acting, batch 1, HalfCheetah-sized DT: {latency['cache_ms']:.2f} ms/step with the KV cache, "
          f"{latency['recompute_ms']:.2f} ms recomputing {latency['recompute_steps']} steps → "
          f"{latency['speedup']:.2f}× (max action difference {latency['max_action_difference']:.1e})")
    print_speed(latency, throughput)
    print(f"Figure: {args.figure}")
    return {
        "cartpole_dt_return": cart["dt_return"],
        "cartpole_bc_return": cart["bc_return"],
        "cartpole_target_return_spearman": cart["spearman"],
        "halfcheetah_medium_dt_return": cheetah.get("medium", {}).get("return"),
        "halfcheetah_medium_replay_dt_return": cheetah.get("medium_replay", {}).get("return"),
        "halfcheetah_medium_dt_normalized": cheetah.get("medium", {}).get("normalized"),
        "halfcheetah_medium_replay_dt_normalized": cheetah.get("medium_replay", {}).get("normalized"),
        "kv_cache_speedup": latency["speedup"],
        "train_ratio_vs_hf": throughput["ratio"],
    }


def print_speed(latency: dict, throughput: dict) -> None:
    print(f"Acting, batch 1: KV cache {latency['cache_ms']:.2f} ms/step; recomputing the {latency['recompute_steps']} "
          f"steps an action depends on {latency['recompute_ms']:.2f} ms ({latency['speedup']:.2f}×, same actions); "
          f"recomputing the last K = {latency['last_k_steps']} steps, the DT paper's acting "
          f"{latency['recompute_last_k_ms']:.2f} ms ({latency['speedup_vs_last_k']:.2f}×, other actions)")
    print(f"Training, batch {throughput['batch']} × K {throughput['k']}: ours {throughput['ours_samples_per_s']:.0f} "
          f"samples/s ({throughput['ours_params']:,} parameters); HF DecisionTransformerModel "
          f"{throughput['hf_samples_per_s']:.0f} ({throughput['hf_params']:,}) → {throughput['ratio']:.2f}×; HF "
          f"without its embedding dropout (the same dropout as ours) "
          f"{throughput['hf_no_embedding_dropout_samples_per_s']:.0f} → {throughput['ratio_same_dropout']:.2f}×")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short CartPole training and fewer timing steps")
    parser.add_argument("--json", type=Path, help="write the headline figures (and details) here")
    parser.add_argument("--figure", type=Path, default=ROOT / "domains/rl/results/target_return.png")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/rl", help="where the HalfCheetah runs are")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--refresh", type=Path, help="re-read the HalfCheetah runs into this earlier --json result "
                                                     "(no new measurements) and report again")
    parser.add_argument("--speed-only", action="store_true", help="parts 3 and 4 alone; --json: their figures")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speed_only:
        latency = acting_latency(120 if args.quick else 300)
        throughput = training_throughput(10 if args.quick else 30)
        print_speed(latency, throughput)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"acting": latency, "training": throughput, "quick": args.quick,
                                             "threads": torch.get_num_threads()}, indent=1) + "\n")
        return

    if args.refresh:
        details = json.loads(args.refresh.read_text())["details"]
        cart, latency, throughput = details["cartpole"], details["acting"], details["training"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cart = cartpole(args, Path(tmp))
        latency = acting_latency(120 if args.quick else 300)
        throughput = training_throughput(10 if args.quick else 30)
    cheetah = halfcheetah(args.runs)  # read last: the target runs may finish while the rest is measured
    for name, run in cheetah.items():
        from polyformer.domains.rl.data import load_offline_data

        returns = load_offline_data(f"polyformer/halfcheetah/{name.replace('_', '-')}-v0").returns
        run["dataset_returns"] = (float(returns.mean()), float(returns.max()))
    summary = report(args, cart, cheetah, latency, throughput)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary | {"details": {
            "cartpole": cart, "halfcheetah": cheetah, "acting": latency, "training": throughput}}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
