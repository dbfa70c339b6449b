"""Data plumbing every domain shares: where the shared data lies, fetching public data sets behind `download: true`
(checksummed), and loaders whose order is a function of the epoch (batches of similar length among them)."""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence, Sized
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """$POLYFORMER_DATA_DIR, else ../shared/data beside the project checkout (see that folder's README)."""
    if "POLYFORMER_DATA_DIR" in os.environ:
        return Path(os.environ["POLYFORMER_DATA_DIR"])
    return PROJECT_ROOT.parent / "shared" / "data"


CHECKSUM_KINDS = ("sha256", "md5", "git-blob-sha1")  # git-blob-sha1: the id git gives the file's contents


def file_checksum(path: Path, kind: str) -> str:
    """The hex digest of a file: sha256, md5, or git's blob id (sha1 of "blob <size>\\0" + contents)."""
    if kind not in CHECKSUM_KINDS:
        raise ValueError(f"checksum kind: expected one of {CHECKSUM_KINDS}, found {kind!r}")
    digest = hashlib.new("sha1" if kind == "git-blob-sha1" else kind)
    if kind == "git-blob-sha1":
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, destination: str | Path, checksum: str) -> Path:
    """Downloads `url` to `destination`, which appears only once complete and matching `checksum` ("<kind>:<hex>",
    kind one of CHECKSUM_KINDS): the bytes go to a temporary file beside it, renamed after the check."""
    kind, _, expected = checksum.partition(":")
    if kind not in CHECKSUM_KINDS or not expected:
        raise ValueError(f"checksum for {url}: expected '<kind>:<hex digest>' with kind in {CHECKSUM_KINDS}, "
                         f"found {checksum!r}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
            except (urllib.error.URLError, OSError) as error:
                raise ConnectionError(f"downloading {url} to {destination} failed: {error}") from None
        found = file_checksum(Path(partial), kind)
        if found != expected.lower():
            raise ValueError(f"downloaded {url}: {kind} {found} does not match the expected {expected}; nothing "
                             f"was written to {destination}")
        os.replace(partial, destination)
    finally:
        Path(partial).unlink(missing_ok=True)
    return destination


def fetch_and_extract(url: str, checksum: str, into: str | Path) -> None:
    """fetch() an archive (tar, tar.gz, zip) into the folder `into`, unpack it there (members may not leave it), then
    delete it."""
    archive = fetch(url, Path(into) / Path(urllib.parse.urlparse(url).path).name, checksum)
    try:
        shutil.unpack_archive(archive, into, filter="data")
    finally:
        archive.unlink(missing_ok=True)


def global_seed() -> int:
    """The seed Lightning's seed_everything set (LightningCLI's `seed_everything`), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class SplitDataModule(L.LightningDataModule):
    """A data module whose train, validation and test loaders differ by split alone: a subclass implements
    `split_loader(split, train)` (train: the training split, shuffled; the others in order)."""

    def split_loader(self, split: str, train: bool) -> DataLoader:
        raise NotImplementedError(f"{type(self).__name__} must implement split_loader(split, train)")

    def train_dataloader(self) -> DataLoader:
        return self.split_loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self.split_loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self.split_loader("test", False)


def loader_options(seed: int | None = None) -> dict:
    """What every loader of the suite (make_loader, the stream loader) shares: pinned memory where a GPU is, and worker
    seeds from a generator of its own, seeded with `seed` or the run's seed (creating an iterator must not consume the
    global RNG, which the training base reseeds per epoch)."""
    return {"pin_memory": torch.cuda.is_available(),
            "generator": torch.Generator().manual_seed(global_seed() if seed is None else seed)}


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


class LengthBatchSampler(Sampler[list[int]]):
    """Batches of similar length whose padded size (longest × count) stays under `max_total`: utterances by
    duration in seconds (speech), sequences by tokens (long-range).

    Items are sorted by length and cut into `num_buckets` buckets; each epoch shuffles within buckets (seeded
    from (seed, epoch)), packs batches, and shuffles the batch order. Under DDP it shards itself: every rank gets the
    same number of batches (the list is padded by repeating batches), rank r takes batches r, r + world, ...
    Lightning calls `set_epoch`; set `trainer.use_distributed_sampler: false` for multi-GPU runs.
    """

    def __init__(self, lengths: Sequence[float], max_total: float, *, num_buckets: int = 10, shuffle: bool = True,
                 seed: int | None = None):
        if max_total < max(lengths):
            raise ValueError(f"max_total={max_total} per batch is below the longest item ({max(lengths)}): raise it "
                             f"or shorten the items")
        self.lengths, self.max_total = list(lengths), max_total
        self.num_buckets, self.shuffle, self.seed, self.epoch = max(1, num_buckets), shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        seed = global_seed() if self.seed is None else self.seed
        rng = random.Random(seed * 100_003 + self.epoch)
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        size = math.ceil(len(order) / self.num_buckets)
        batches = []
        for start in range(0, len(order), size):
            bucket = order[start:start + size]
            if self.shuffle:
                rng.shuffle(bucket)
            batch, longest = [], 0.0
            for i in bucket:
                longest_with = max(longest, self.lengths[i])
                if batch and longest_with * (len(batch) + 1) > self.max_total:
                    batches.append(batch)
                    batch, longest_with = [], self.lengths[i]
                batch.append(i)
                longest = longest_with
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        rank, size = world()
        if len(batches) % size:
            batches += batches[: size - len(batches) % size]
        return batches[rank::size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return len(self.batches())


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int | None = None,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
    seed: int | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
) -> DataLoader:
    """A DataLoader of batches of `batch_size` (shuffled through EpochRandomSampler, so that data order survives a
    resume), or of the batches a `batch_sampler` draws (e.g. speech's duration buckets, which shuffle themselves).
    It is torchdata's StatefulDataLoader: Lightning keeps its position in every checkpoint, so a run resumed
    mid-epoch goes on with the epoch's next batch, not its first.

    It draws its worker seeds from a generator of its own: creating an iterator must not consume the global RNG,
    which the training base reseeds per epoch (Lightning creates the first epoch's iterator earlier than the others).
    """
    if batch_sampler is not None:
        if batch_size is not None or shuffle or drop_last:
            raise ValueError(f"make_loader: a batch_sampler draws the batches itself; expected batch_size None, "
                             f"shuffle and drop_last False, found {batch_size}, {shuffle}, {drop_last}")
        batching: dict = {"batch_sampler": batch_sampler}
    else:
        if batch_size is None or batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, found {batch_size}")
        batching = {"batch_size": batch_size, "drop_last": drop_last,
                    "sampler": EpochRandomSampler(dataset, seed) if shuffle else None}
    with warnings.catch_warnings():  # torchdata 0.11 calls torch's deprecated set_vital in __init__: nothing to do
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(
            dataset,
            **batching,
            num_workers=num_workers,
            collate_fn=collate_fn,
            persistent_workers=num_workers > 0,
            **loader_options(seed),
        )
