"""`polyformer fit` in its own process(es), for tests of real multi-process runs: one torch thread each, the test
callbacks of tests/helpers importable, and a callbacks config written under the run's folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]


def polyformer_fit(folder: Path, configs: list[Path], recorder: str, *extra: str, kill_at: int | None = None,
                   timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs under `folder` with the callback `recorder` ("module.Class" of tests/helpers, given folder=`folder`); with
    `kill_at` every rank SIGKILLs itself as that optimizer step begins (fault_injection.KillAt)."""
    folder.mkdir(exist_ok=True)
    callbacks = f"    - class_path: {recorder}\n      init_args:\n        folder: {folder}\n"
    if kill_at is not None:
        callbacks += f"    - class_path: fault_injection.KillAt\n      init_args:\n        step: {kill_at}\n"
    config = folder / f"callbacks{len(list(folder.glob('callbacks*.yaml')))}.yaml"
    config.write_text("trainer:\n  callbacks:\n" + callbacks)
    files = [option for path in configs for option in ("-c", str(path))]
    command = [sys.executable, "-m", "polyformer.cli", "fit", *files, "-c", str(config), f"--run.root={folder}",
               *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPERS)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
