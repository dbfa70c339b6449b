"""Long Range Arena benchmark: every (task, model, from scratch | self-pretrained) cell at an equal wall-clock budget.

    python scripts/bench_longrange.py [--quick] [--json PATH] [--out DIR] [--reuse] [--jobs 2]
                                      [--tasks text listops pathfinder] [--kernels full local linear] [--peers lstm s4d]
                                      [--modes scratch spt]
                                      [--minutes text=7 listops=5 pathfinder=5] [--seed 0]
                                      [--position sinusoidal|learned|rope|alibi] [--cut NAME]

Cells: the three attention kernels (--kernels) on Text, the kernel with the best self-pretrained validation accuracy
on Text on ListOps and Pathfinder (the first of --kernels when Text is not run), the LSTM and S4D peers (--peers) on
all three. Every model has the configs' sizes (~70-85 k parameters), lengths, batches of similar length under the
same padded-token budget, loss, optimizer and learning rate; each cell trains for the same wall time
(`trainer.max_time`): `scratch` all of it on the labels, `spt` half of it self-pretraining on the task's training
inputs (configs/longrange/<task>_pretrain.yaml, masked-token denoising), half fine-tuning from that checkpoint. A run
is `polyformer fit -c configs/longrange/<task>.yaml -c configs/longrange/cpu/<task>.yaml [-c
configs/longrange/mixers/<model>.yaml]`, then `polyformer validate` and `polyformer test` of its last checkpoint, one
torch thread each, --jobs at a time. Validation alone picks the best kernel and each task's best cell, whose weights
go weights-only to DIR/weights/longrange/<task>.ckpt.

--json keys: accuracy (task → model → {scratch, spt}: test accuracy), val_accuracy (the same on validation),
minutes (task → model → {scratch, spt}: wall minutes of the cell's fits, pre-training included), tokens_per_s (the
fine-tuning or scratch fit's real tokens per second of training steps), peak_mb (the process's peak resident memory),
steps, params, protocol (budgets, lengths, sizes, widths, as run), best (task → {model, mode, checkpoint, config}).
--quick: a few batches of every cell on tiny generated data (checks the script, not a result).
--cut NAME adds configs/longrange/cuts/<task>_<NAME>.yaml after the CPU config of every fit (shorter inputs, their
batches, validation during the fit: a diagnostic, not LRA's task; cells and records named <...>_<NAME>_seed<S>, the
files' contents in protocol.cut).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from polyformer.bench import QUICK, bench_parser, evaluate, fit, last_value, last_values, recorded, run_dir, write_json
from polyformer.checkpoint import save_weights
from polyformer.transformer import TransformerConfig
from polyformer.data import PROJECT_ROOT as ROOT
from polyformer.domains.longrange import listops, pathfinder
from polyformer.domains.longrange.data import CACHE

CONFIGS = ROOT / "configs" / "longrange"
TASKS = ("text", "listops", "pathfinder")
KERNELS = ("full", "local", "linear")
PEERS = ("lstm", "s4d")
MODES = ("scratch", "spt")
# quick: tiny generated splits, the smallest Text split sizes; full runs use the configs' own
QUICK_DATA = {"text": ["--data.init_args.train_size=64", "--data.init_args.val_size=32",
                       "--data.init_args.heldout_size=32"],
              "listops": ["--data.init_args.spec.train=64", "--data.init_args.spec.val=16",
                          "--data.init_args.spec.test=16"],
              "pathfinder": ["--data.init_args.spec.train=64", "--data.init_args.spec.val=16",
                             "--data.init_args.spec.test=16"]}


def max_time(minutes: float) -> str:
    seconds = int(round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def cut_file(task: str, cut: str) -> Path:
    return CONFIGS / "cuts" / f"{task}_{cut}.yaml"


def configs(task: str, model: str, pretrain: bool = False, cut: str | None = None) -> list[Path]:
    files = [CONFIGS / f"{task}{'_pretrain' if pretrain else ''}.yaml", CONFIGS / "cpu" / f"{task}.yaml"]
    files += [cut_file(task, cut)] if cut else []
    return files + ([CONFIGS / "mixers" / f"{model}.yaml"] if model != "full" else [])


def generate_data(task: str, cut: str | None) -> None:
    """Generates a task's splits as its configs (task + CPU cut + --cut) define them, before cells run side by
    side."""
    spec: dict = {}
    for file in configs(task, "full", cut=cut):
        spec |= ((yaml.safe_load(file.read_text()).get("data") or {}).get("init_args") or {}).get("spec") or {}
    if task == "listops":
        listops.generate(listops.ListOpsSpec(**spec), CACHE)
    elif task == "pathfinder":
        pathfinder.generate(pathfinder.PathfinderSpec(**spec), CACHE)


def cell(task: str, model: str, mode: str, minutes: float, out: Path, quick: bool, seed: int, reuse: bool,
         position: str = "sinusoidal", cut: str | None = None) -> dict:
    """Trains, validates and tests one cell (the transformer's positions: `position`); its record
    (out/records/<name>.json) lets --reuse skip it."""
    transformer = model in KERNELS
    positions = f"_{position}" if transformer and position != "sinusoidal" else ""
    name = f"{task}_{model}{positions}_{mode}{f'_{cut}' if cut else ''}_seed{seed}"

    def produce() -> dict:
        if quick:  # the CPU configs validate after the fit only; quick validates its one epoch
            budget = [*QUICK, "--trainer.val_check_interval=1.0", "--trainer.log_every_n_steps=1", *QUICK_DATA[task]]
        else:
            budget = [f"--trainer.max_time={max_time(minutes / (2 if mode == 'spt' else 1))}"]
        common = [f"--seed_everything={seed}", *budget,
                  *([f"--model.init_args.model.transformer.position={position}"] if transformer else [])]
        seconds, init = 0.0, []
        if mode == "spt":
            pretrained = fit(configs(task, model, pretrain=True, cut=cut), out, f"{name}_pretrain", common)
            seconds += pretrained.seconds
            init = [f"--model.init_args.init_from={pretrained.checkpoint('last')}"]
        files, extra = configs(task, model, cut=cut), [*common, *init]
        fitted = fit(files, out, name, extra)
        seconds += fitted.seconds
        checkpoint = fitted.checkpoint("last")
        for stage in ("validate", "test"):
            evaluate(stage, files, out, name, extra, checkpoint)
        folder = run_dir(out, files[0], name)
        train = last_values(fitted.version / "metrics.csv")  # the fit's own version: its last logged values
        return {"val": last_value(folder, "val/acc"), "test": last_value(folder, "test/acc"),
                "minutes": seconds / 60, "tokens_per_s": train["train/tokens_per_s"],
                "peak_mb": train["train/peak_mb"], "steps": int(train["step"]) + 1,
                "params": int(train["train/params"]),
                "checkpoint": str(checkpoint), "config": [str(f.relative_to(ROOT)) for f in files] + init}

    return recorded(out / "records" / f"{name}.json", reuse, produce)


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], ROOT / "bench_out" / "longrange")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS,
                        help="the non-attention peers to run beside the kernels (none: --peers alone)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="from scratch, self-pretrained, or both (the kernel choice needs spt)")
    parser.add_argument("--minutes", nargs="+", default=["text=7", "listops=5", "pathfinder=5"],
                        help="wall minutes per cell, task=minutes")
    parser.add_argument("--jobs", type=int, default=2, help="cells at a time (one torch thread each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--position", default="sinusoidal", choices=("sinusoidal", "learned", "rope", "alibi"),
                        help="the transformers' positions (alibi and rope act on scores: not with --kernels linear)")
    parser.add_argument("--cut", help="a diagnostic cut of every task: configs/longrange/cuts/<task>_<CUT>.yaml")
    args = parser.parse_args()
    missing = [str(cut_file(task, args.cut).relative_to(ROOT)) for task in args.tasks
               if not cut_file(task, args.cut).is_file()] if args.cut else []
    if missing:
        raise SystemExit(f"--cut {args.cut}: expected {', '.join(missing)}, found no such file")
    for kernel in args.kernels:  # the configs' own check, before any cell runs
        try:
            TransformerConfig(attention=kernel, position=args.position, window=256)
        except ValueError as error:
            raise SystemExit(f"--kernels {kernel} with --position {args.position}: {error}") from None
    minutes = {task: 7.0 for task in TASKS}
    for item in args.minutes:
        if not re.fullmatch(r"(text|listops|pathfinder)=[0-9.]+", item):
            raise SystemExit(f"--minutes: expected task=minutes (e.g. text=7), found {item!r}")
        task, value = item.split("=")
        minutes[task] = float(value)

    def run_cells(cells: list[tuple[str, str, str]]) -> dict:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {c: pool.submit(cell, *c, minutes[c[0]], args.out, args.quick, args.seed, args.reuse,
                                      args.position, args.cut) for c in cells}
        return {c: future.result() for c, future in futures.items()}

    if not args.quick:
        for task in args.tasks:
            generate_data(task, args.cut)
    results: dict[tuple[str, str, str], dict] = {}
    if "text" in args.tasks:
        results |= run_cells([("text", model, mode) for model in (*args.kernels, *args.peers)
                              for mode in args.modes])
        kernel = max(args.kernels, key=lambda k: results[("text", k, args.modes[-1])]["val"])
    else:
        kernel = args.kernels[0]
    rest = [t for t in args.tasks if t != "text"]
    results |= run_cells([(task, model, mode) for task in rest for model in (kernel, *args.peers)
                          for mode in args.modes])

    def table(key: str) -> dict:
        """task → model → mode → the cells' `key`."""
        figures: dict = {}
        for (task, model, mode), record in results.items():
            figures.setdefault(task, {}).setdefault(model, {})[mode] = record[key]
        return figures

    best = {}
    for task in args.tasks:
        (t, model, mode), record = max(((c, r) for c, r in results.items() if c[0] == task),
                                       key=lambda item: item[1]["val"])
        weights = args.out / "weights" / "longrange" / f"{task}.ckpt"
        weights.parent.mkdir(parents=True, exist_ok=True)
        sha256 = save_weights(record["checkpoint"], weights) if not args.quick else None
        best[task] = {"model": model, "mode": mode, "val": record["val"], "test": record["test"],
                      "checkpoint": str(weights.relative_to(args.out)) if sha256 else record["checkpoint"],
                      "sha256": sha256, "config": record["config"]}
    figures = {
        "accuracy": table("test"), "val_accuracy": table("val"), "minutes": table("minutes"),
        "tokens_per_s": table("tokens_per_s"), "peak_mb": table("peak_mb"), "steps": table("steps"),
        "params": table("params"), "best": best,
        "protocol": {"quick": args.quick, "seed": args.seed, "minutes_per_cell": {t: minutes[t] for t in args.tasks},
                     "peers": args.peers, "modes": args.modes,
                     "spt": "half the cell's minutes self-pretraining, half fine-tuning",
                     "kernel_for_listops_pathfinder": kernel,
                     "max_len": {"text": 4096, "listops": 2000, "pathfinder": 1024},
                     "max_tokens_per_batch": {"text": 65536, "listops": 32000, "pathfinder": "32 images"},
                     "data": {"text": "aclImdb train: 1,000 val, 1,000 held-out test, the rest training",
                              "listops": "generated: 20,000 / 1,000 / 1,000, 500-2,000 tokens",
                              "pathfinder": "generated: 40,000 / 2,000 / 2,000, contour length 10"},
                     "widths": {"transformer": f"dim 64, 2 blocks, 4 heads, mlp 128, {args.position}",
                                "lstm": "bidirectional, 48 per direction", "s4d": "dim 64, 3 blocks, state 48"},
                     "local_window": 256,
                     **({"cut": {task: yaml.safe_load(cut_file(task, args.cut).read_text()) for task in args.tasks}}
                        if args.cut else {})},  # JSONs written before --cut existed stay byte for byte
    }
    for task in args.tasks:
        print(f"\n{task}: test accuracy (val) | minutes | tokens/s | peak MB | steps | params")
        for (t, model, mode), r in results.items():
            if t == task:
                print(f"  {model:7s} {mode:8s} {r['test']:.3f} ({r['val']:.3f}) | {r['minutes']:5.1f} | "
                      f"{r['tokens_per_s']:8.0f} | {r['peak_mb']:6.0f} | {r['steps']:5d} | {r['params']}")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
