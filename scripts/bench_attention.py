"""Cost of full (SDPA), local (sliding window) and linear attention against sequence length N.

One MultiHeadAttention layer (model dim 512, 8 heads, batch 1, fp32, CPU), forward + backward. Each (kind, N) runs
in a fresh process so its peak resident memory is its own: peak_mb is the rise of the process's peak RSS over what
it held after building the layer and the input. seconds is the median of the timed repeats.

    python scripts/bench_attention.py [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("full", "local", "linear")
WINDOW = 256


def measure(kind: str, n: int, repeats: int, threads: int) -> dict:
    import torch

    from polyformer import MultiHeadAttention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = MultiHeadAttention(512, 8, kind=kind, window=WINDOW if kind == "local" else None)
    x = torch.randn(1, n, 512, requires_grad=True)

    def step() -> None:
        layer(x).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up, and the peak-memory measurement
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"kind": kind, "n": n, "seconds": statistics.median(times), "peak_mb": round(peak_mb, 1)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in KINDS:
        points = sorted((r["n"], r["seconds"], max(r["peak_mb"], 0.1)) for r in rows if r["kind"] == kind)
        if not points:
            continue
        ns, secs, mbs = zip(*points)
        label = f"local (w={WINDOW})" if kind == "local" else ("full (SDPA)" if kind == "full" else kind)
        ax_time.plot(ns, secs, "o-", label=label)
        ax_mem.plot(ns, mbs, "o-", label=label)
    for ax, ylabel in ((ax_time, "forward+backward seconds (median)"), (ax_mem, "peak memory rise (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("One attention layer, d=512, 8 heads, batch 1, fp32, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N from 256 to 4096, fewer repeats")
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    parser.add_argument("--plot", type=Path, default=Path("bench_out/attention_cost.png"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "N", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, n, repeats = args.worker
        print(json.dumps(measure(kind, int(n), int(repeats), args.threads)))
        return

    sizes = [256, 512, 1024, 2048, 4096] + ([] if args.quick else [8192, 16384])
    repeats = 2 if args.quick else 3
    rows = []
    print(f"{'kind':>8} {'N':>7} {'seconds':>10} {'peak_mb':>9}")
    for n in sizes:
        for kind in KINDS:  # kinds alternate at each N, so machine noise hits them alike
            out = subprocess.run([sys.executable, __file__, "--worker", kind, str(n), str(repeats),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['kind']:>8} {row['n']:>7} {row['seconds']:>10.4f} {row['peak_mb']:>9.1f}", flush=True)

    print("\ngrowth per doubling of N (time ratio, last two sizes):")
    for kind in KINDS:
        secs = [r["seconds"] for r in rows if r["kind"] == kind]
        print(f"  {kind:>6}: x{secs[-1] / secs[-2]:.2f}")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
