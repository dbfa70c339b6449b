"""Data plumbing every domain shares: where the shared data lies, and loaders whose order is a function of the epoch."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sized
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """$POLYFORMER_DATA_DIR, else ../shared/data beside the project checkout (see that folder's README)."""
    if "POLYFORMER_DATA_DIR" in os.environ:
        return Path(os.environ["POLYFORMER_DATA_DIR"])
    return PROJECT_ROOT.parent / "shared" / "data"


def global_seed() -> int:
    """The seed Lightning's seed_everything set (LightningCLI's `seed_everything`), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochRandomSampler(RandomSampler):
    """A random permutation drawn from (seed, epoch) alone, so a run resumed at an epoch boundary sees the same order.

    Lightning calls `set_epoch` before every training epoch; under DDP it swaps this sampler for a
    DistributedSampler, which is seeded the same way.
    """

    def __init__(self, data_source: Sized, seed: int | None = None):
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        seed = global_seed() if self.seed is None else self.seed
        generator = torch.Generator().manual_seed(seed * 100_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
    seed: int | None = None,
) -> DataLoader:
    """A DataLoader; shuffling through EpochRandomSampler so data order survives a resume.

    It draws its worker seeds from a generator of its own: creating an iterator must not consume the global RNG,
    which the training base reseeds per epoch (Lightning creates the first epoch's iterator earlier than the others).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, found {batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochRandomSampler(dataset, seed) if shuffle else None,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(global_seed() if seed is None else seed),
    )
