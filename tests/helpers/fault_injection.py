"""Test callbacks that inject faults into a `polyformer fit`: a save that stalls inside torch.save (for a SIGKILL
sent from outside), NaN weights at a chosen step, an exception on one rank of a multi-process run, and every rank
killed at a chosen step."""

import math
import os
import signal
import time
from pathlib import Path

import lightning as L


class _Stall:
    """Pickling this (inside torch.save, after the file being written was opened) marks a file, then sleeps."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text("inside torch.save")
        time.sleep(600)  # the test sends SIGKILL long before this ends
        raise AssertionError("the test was to kill this process while it was writing a checkpoint")


class StallInsideSave(L.Callback):
    """The `nth` checkpoint written at optimizer step `step` stalls inside its write; `marker` appears then. At the
    end of an epoch ModelCheckpoint writes its top-k file (epoch=E-step=S.ckpt) first, then last.ckpt: nth=2."""

    def __init__(self, step: int, nth: int, marker: str):
        self.step, self.nth, self.marker = step, nth, marker
        self.saves = 0

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step == self.step:
            self.saves += 1
            if self.saves == self.nth:
                checkpoint["stall"] = _Stall(self.marker)


class NaNWeightsAt(L.Callback):
    """Sets the first parameter to NaN at optimizer step `step`: before its batch ("start": the loss is NaN) or after
    its update ("end": the weights are NaN while the loss just computed was finite)."""

    def __init__(self, step: int, when: str):
        self.step, self.when = step, when

    @staticmethod
    def poison(pl_module: L.LightningModule) -> None:
        next(pl_module.parameters()).data.fill_(math.nan)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.when == "start" and trainer.global_step == self.step:
            self.poison(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.when == "end" and trainer.global_step == self.step:
            self.poison(pl_module)


class RaiseOnRank(L.Callback):
    """Raises on one rank only, at the start of optimizer step `step`: the other ranks go on into a collective."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self.step}")


class KillAt(L.Callback):
    """Every rank SIGKILLs itself as optimizer step `step` begins: a run killed mid-epoch, after the checkpoints of
    the steps before it were written, with no chance to write another."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
