"""A test callback: every rank appends, as each optimizer step begins, the ids of the step's training samples to
<folder>/batches_rank<R>.jsonl, so a test can check which samples each rank saw, in which order."""

import hashlib
import json
from pathlib import Path

import lightning as L


def sample_id(tokens, padding) -> str:
    """A long-range example's id: the hash of its tokens without padding."""
    return hashlib.sha1(tokens[~padding].numpy().tobytes()).hexdigest()[:16]


class RecordBatches(L.Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        samples = [sample_id(t, p) for t, p in zip(batch["tokens"].cpu(), batch["padding"].cpu())]
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "samples": samples}
        with open(self.folder / f"batches_rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
