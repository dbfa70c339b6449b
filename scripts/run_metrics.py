"""Prints the last logged value of metrics from the newest version of a run: used by demo.sh's summary.

    python scripts/run_metrics.py runs/core/sort_tiny test/sequence_acc test/token_acc
"""

import sys
from pathlib import Path

from polyformer.bench import last_values
from polyformer.cli import newest_version


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    run_dir, names = Path(sys.argv[1]), sys.argv[2:]
    try:
        values = last_values(newest_version(run_dir) / "metrics.csv")
    except FileNotFoundError as error:
        raise SystemExit(f"run_metrics: {error}") from None
    missing = [n for n in names if n not in values]
    if missing:
        raise SystemExit(f"run_metrics: {missing} not logged in {run_dir}; logged: {sorted(values)}")
    print(" ".join(f"{n}={values[n]:.4f}" for n in names))


if __name__ == "__main__":
    main()
