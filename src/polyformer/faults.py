"""Failures that lose nothing: atomic checkpoint writes, a stop on non-finite losses, one-line checkpoint errors, and
multi-process runs that end together when one rank raises.

- `AtomicCheckpointIO` writes every checkpoint to a temporary file in the same folder, fsyncs it and renames it over
  the old one: a process killed mid-write (SIGKILL, power loss) leaves the previous checkpoint whole.
- `StopOnNonFinite` stops training at the first NaN or inf loss, before the optimizer step would spread it into the
  weights, and refuses to write a checkpoint whose parameters are not finite: the last good checkpoint stays.
- A `CheckpointError` (polyformer/checkpoint.py) on any rank is one line naming the file and what is wrong; the
  `polyformer` command prints it as is.
- `RankFaults` makes a rank's exception end every rank of a run started by Lightning's own launcher
  (`--trainer.devices=N`), with the error printed by rank 0.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import Tensor

from polyformer.checkpoint import CheckpointError, write_atomically


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss or parameter stopped training; the message names the step."""


# ---- atomic writes ----------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing each checkpoint through `write_atomically`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, found {storage_options!r}")
        write_atomically(path, lambda file: torch.save(checkpoint, file))


# ---- non-finite losses ------------------------------------------------------------------------------------------
class StopOnNonFinite(L.Callback):
    """Stops training at the first NaN or inf loss on any rank, before its backward pass and optimizer step, and
    refuses to write a checkpoint whose parameters hold NaN or inf: the checkpoints already written are the last
    good ones. The check gathers each step's loss from every rank (one scalar), so all ranks stop together; reading
    it is one device-to-host sync per step."""

    def __init__(self) -> None:
        self.batch_idx = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        losses = pl_module.all_gather(loss.detach().float()).reshape(-1)  # (world,)
        if torch.isfinite(losses).all():
            return
        rank = int((~torch.isfinite(losses)).nonzero()[0])
        where = f" on rank {rank}" if losses.numel() > 1 else ""
        raise NonFiniteError(
            f"training loss {losses[rank].item()} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {self.batch_idx}){where}: training stopped before this step's update; the checkpoints already "
            f"written are kept")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        bad = [name for name, param in pl_module.named_parameters() if not torch.isfinite(param).all()]
        if bad:
            more = f", ... ({len(bad)} in all)" if len(bad) > 3 else ""
            raise NonFiniteError(
                f"refusing to write a checkpoint at global step {trainer.global_step}: parameters "
                f"{', '.join(bad[:3])}{more} hold NaN or inf; the checkpoints already written are kept")


# ---- multi-process runs -----------------------------------------------------------------------------------------
RANK_FAULTS = "POLYFORMER_RANK_FAULTS"  # environment variable: the folder where failing ranks leave their error


def launches_ranks(trainer: L.Trainer) -> bool:
    """Whether this process is about to start the other ranks itself (Lightning's launcher, not torchrun or SLURM)."""
    launcher = trainer.strategy.launcher
    return isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1 \
        and not launcher.cluster_environment.creates_processes_externally


def end_ranks(launcher: _SubprocessScriptLauncher) -> None:
    """SIGKILLs the ranks this process started and reaps them. Their list is emptied first: Lightning's observer
    thread watches that same list, and on seeing a rank killed it would SIGKILL this process too."""
    ranks = list(launcher.procs)
    launcher.procs.clear()
    for rank in ranks:
        rank.kill()
        rank.wait()


def share_rank_faults(trainer: L.Trainer) -> None:
    """Before the other ranks start: a fresh folder for their errors, named in the environment they inherit."""
    if launches_ranks(trainer):
        os.environ[RANK_FAULTS] = tempfile.mkdtemp(prefix="polyformer-rank-faults-")


def one_line(error: BaseException) -> str:
    """`Type: first line of the message` of an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class RankFaults(L.Callback):
    """A rank's exception ends every rank, and rank 0 prints it, in runs whose ranks rank 0 started itself (on each
    machine, its local rank 0 plays that part for the ranks it started).

    Without it, a rank that raises leaves the others blocked in their next collective (NCCL waits out its timeout),
    or failing with gloo's 'connection closed by peer' that hides the cause. Here a failing rank other than 0 prints
    its traceback, leaves its error in the folder `share_rank_faults` named and waits; rank 0 watches that folder,
    prints the error and ends every process (exit status 1). A rank 0 that raises first ends the other ranks, then
    its exception goes on as usual."""

    def __init__(self, poll_seconds: float = 0.2, wait_seconds: float = 60.0):
        self.poll_seconds, self.wait_seconds = poll_seconds, wait_seconds
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @staticmethod
    def folder(trainer: L.Trainer) -> Path | None:
        return Path(os.environ[RANK_FAULTS]) if trainer.world_size > 1 and RANK_FAULTS in os.environ else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = self.folder(trainer)
        if folder is not None and trainer.local_rank == 0 and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, args=(folder, trainer.strategy.launcher),
                                             name="polyformer-rank-faults", daemon=True)
            self._watcher.start()

    def _watch(self, folder: Path, launcher: _SubprocessScriptLauncher) -> None:
        while not self._stop.wait(self.poll_seconds):
            reports = sorted(folder.glob("rank*.txt"))
            if reports:
                sys.stderr.write(f"polyformer: {reports[0].read_text()}\n")
                sys.stderr.flush()
                # silenced first: once the ranks are gone, the main thread's collective fails ("connection closed")
                # and would print that in the moment before this process ends
                silent = os.open(os.devnull, os.O_WRONLY)
                os.dup2(silent, sys.stdout.fileno())
                os.dup2(silent, sys.stderr.fileno())
                end_ranks(launcher)
                shutil.rmtree(folder, ignore_errors=True)
                os._exit(1)  # the main thread may be blocked in a collective that will never complete

    def _end_watch(self, folder: Path) -> None:
        self._stop.set()
        shutil.rmtree(folder, ignore_errors=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        folder = self.folder(trainer)
        if folder is None:
            return
        if trainer.local_rank == 0:
            self._end_watch(folder)
            end_ranks(trainer.strategy.launcher)  # they wait for rank 0 in a collective
            return
        if not isinstance(exception, (CheckpointError, NonFiniteError)):  # the cause, for whoever debugs it
            traceback.print_exception(exception)
        message = f"rank {trainer.global_rank} failed: {one_line(exception)}"
        write_atomically(folder / f"rank{trainer.global_rank}.txt", lambda file: file.write(message.encode()))
        time.sleep(self.wait_seconds)  # rank 0 ends this process; if it does not, this rank's exception goes on

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = self.folder(trainer)
        if folder is not None and trainer.local_rank == 0:
            self._end_watch(folder)
