"""A test callback: every rank writes its final weights, so a test can compare the ranks of a DDP run."""

from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class SaveRankWeights(L.Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # sharded (FSDP2) parameters are DTensors: every rank gathers the whole tensor
        state = {name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()
                 for name, tensor in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


class KillAtStep(L.Callback):
    """Kills its own process with SIGKILL after a given optimizer step: a crash at a chosen point of training."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
