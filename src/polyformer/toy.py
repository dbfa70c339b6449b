"""A built-in sequence task that needs no data: sort a sequence of symbols with a bidirectional encoder.

Position i of the output is the i-th smallest input symbol, so every output token depends on every input token:
a small test that attention, positions and training work together. Used by the core demo and the core tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from polyformer.data import SplitDataModule, make_loader
from polyformer.finetune import FinetuneConfig
from polyformer.transformer import TransformerConfig, TransformerEncoder
from polyformer.training import OptimizerConfig, PolyformerTask


class SortingDataModule(SplitDataModule):
    """Random sequences of `length` symbols from a vocabulary of `vocab`, fixed per split by `seed`."""

    def __init__(self, length: int = 12, vocab: int = 10, train_size: int = 8192, val_size: int = 1024,
                 test_size: int = 1024, batch_size: int = 64, seed: int = 1234):
        super().__init__()
        if length < 2 or vocab < 2:
            raise ValueError(f"length and vocab must be at least 2, found length={length}, vocab={vocab}")
        if min(train_size, val_size, test_size) < 1:
            raise ValueError(f"train_size, val_size and test_size must be at least 1, found {train_size}, "
                             f"{val_size} and {test_size}")
        self.length, self.vocab, self.batch_size, self.seed = length, vocab, batch_size, seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def split(self, name: str) -> TensorDataset:
        generator = torch.Generator().manual_seed(self.seed + ("train", "val", "test").index(name))
        inputs = torch.randint(self.vocab, (self.sizes[name], self.length), generator=generator)
        return TensorDataset(inputs, inputs.sort(dim=1).values)

    def setup(self, stage: str | None = None) -> None:
        self.datasets = {name: self.split(name) for name in self.sizes}

    def split_loader(self, split: str, train: bool):
        return make_loader(self.datasets[split], batch_size=self.batch_size, shuffle=train)


class SequenceTagger(nn.Module):
    """Token embedding → encoder → per-token classifier: (b n) symbols → (b n vocab) logits."""

    def __init__(self, vocab: int, encoder: TransformerConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab, encoder.dim)
        self.encoder = TransformerEncoder(encoder)
        self.head = nn.Linear(encoder.dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)))


class SortingTask(PolyformerTask):
    """Per-token cross-entropy; logs token accuracy and whole-sequence accuracy."""

    def __init__(self, vocab: int = 10, encoder: TransformerConfig | None = None,
                 optimizer: OptimizerConfig | None = None, init_from: str | None = None,
                 finetune: FinetuneConfig | None = None):
        super().__init__(optimizer, init_from=init_from, finetune=finetune)
        if vocab < 2:
            raise ValueError(f"vocab must be at least 2, found {vocab}")
        self.encoder_config = encoder or TransformerConfig(dim=64, depth=2, heads=4, position="learned", max_len=64)
        self.model = SequenceTagger(vocab, self.encoder_config)

    def step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        inputs, targets = batch
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        correct = logits.argmax(-1) == targets
        on_epoch = stage != "train"
        self.log(f"{stage}/token_acc", correct.float().mean(), prog_bar=True, on_epoch=on_epoch, sync_dist=on_epoch,
                 batch_size=inputs.shape[0])
        self.log(f"{stage}/sequence_acc", correct.all(dim=1).float().mean(), on_epoch=on_epoch, sync_dist=on_epoch,
                 batch_size=inputs.shape[0])
        return loss
