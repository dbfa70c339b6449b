"""Long Range Arena's data (Tay et al. 2021, https://arxiv.org/abs/2011.04006) as Lightning data modules of token
sequences: ListOps expressions (`listops.py`), IMDB reviews as UTF-8 bytes, Pathfinder-32 pixels (`pathfinder.py`).

Every batch is {"tokens": (b n) int64, "padding": (b n) bool, True at padding, "labels": (b,)}: sequences are padded
to the longest of the batch (at most `max_len`), not to `max_len`, which changes no result of a model that masks
padding and saves the work on it. Token 0 is padding and token 1 the mask token of self-pretraining in every task.

Shapes: b batch, n tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset

from polyformer.data import PROJECT_ROOT, LengthBatchSampler, SplitDataModule, make_loader, shared_data_dir
from polyformer.streaming import StreamConfig, StreamSource, open_stream, stream_loader
from polyformer.domains.longrange import listops, pathfinder

PAD, MASK = 0, 1
BYTE_OFFSET = 2  # byte v is token v + 2
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET
PIXEL_VOCAB_SIZE = 256 + BYTE_OFFSET  # intensity v is token v + 2
CACHE = PROJECT_ROOT / "data" / "longrange"  # generated splits
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class SequenceDataset(Dataset):
    """Token sequences (lists or arrays of ids) and their labels."""

    def __init__(self, sequences: Sequence, labels: Sequence[int]):
        if len(sequences) != len(labels):
            raise ValueError(f"{len(sequences)} sequences but {len(labels)} labels")
        self.sequences, self.labels = sequences, labels

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return torch.as_tensor(np.asarray(self.sequences[index], dtype=np.int64)), int(self.labels[index])


def encode_example(example: tuple[Sequence[int], int]) -> dict:
    """A stream's record of one (tokens, label) example: every task's tokens fit int16."""
    tokens = np.asarray(example[0])
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int16).max):
        raise ValueError(f"stream record: expected token ids in [0, 32767], found {tokens.min()}..{tokens.max()}")
    return {"tokens": tokens.astype(np.int16), "label": int(example[1])}


def decode_example(record: dict) -> tuple[Tensor, int]:
    return torch.as_tensor(record["tokens"].astype(np.int64)), int(record["label"])


def collate(examples: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """Pads the batch's sequences to its longest."""
    longest = max(len(tokens) for tokens, _ in examples)
    tokens = torch.full((len(examples), longest), PAD, dtype=torch.long)
    for row, (sequence, _) in enumerate(examples):
        tokens[row, :len(sequence)] = sequence
    return {"tokens": tokens, "padding": tokens == PAD, "labels": torch.tensor([label for _, label in examples])}


@dataclass
class LoaderConfig:
    """Fixed batches of `batch_size`, or with `max_tokens` batches of similar length holding at most that many
    tokens with padding (the core's LengthBatchSampler: long inputs of unequal length waste far less on padding)."""

    batch_size: int = 32
    eval_batch_size: int | None = None  # default: batch_size
    max_tokens: int | None = None  # padded tokens per batch; replaces batch_size when set
    num_buckets: int = 20
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ValueError(f"loader.batch_size and max_tokens must be at least 1, found {self.batch_size} and "
                             f"{self.max_tokens}")


class SequenceDataModule(SplitDataModule):
    """Train / val / test SequenceDatasets behind the core's seeded loaders; subclasses fill `self.splits` in
    `read(stage)`. With `stream` set, the splits are read from the litdata chunks `polyformer stream` wrote of them
    instead (fixed batches of `stream.batch_size`, default `loader.batch_size`)."""

    vocab_size: int
    num_classes: int
    max_len: int
    stream_name: str  # the data set's name in a stream's manifest

    def __init__(self, loader: LoaderConfig | None, stream: StreamConfig | None = None):
        super().__init__()
        self.loader = loader if loader is not None else LoaderConfig()
        self.stream = stream
        self.splits: dict[str, Dataset] = {}

    def read(self, stage: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement read(stage)")

    def setup(self, stage: str) -> None:
        if self.stream is None:
            return self.read(stage)
        for split in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            if split not in self.splits:
                self.splits[split] = open_stream(self.stream, split, self.stream_name, decode_example,
                                                 shuffle=split == "train")
                meta, expected = self.splits[split].manifest["meta"], self.stream_meta()
                if meta != expected:
                    raise ValueError(f"stream {self.stream.uri}: its {split} split was written for {meta}, this "
                                     f"data module expects {expected}: write the stream again with its config")

    def stream_sources(self, split: str) -> dict[str, StreamSource]:
        """The split's examples as `polyformer stream` writes them (after `read`), in the folder <split>."""
        data = self.splits[split]
        return {split: StreamSource(self.stream_name, list(zip(data.sequences, data.labels)), encode_example,
                                    self.stream_meta())}

    def stream_meta(self) -> dict:
        return {"vocab_size": self.vocab_size, "num_classes": self.num_classes, "max_len": self.max_len}

    def split_loader(self, split: str, train: bool):
        if split not in self.splits:
            raise ValueError(f"{type(self).__name__} has no split {split!r} (it has {sorted(self.splits)})")
        c, data = self.loader, self.splits[split]
        if self.stream is not None:  # fixed batches: max_tokens' length buckets need every length up front
            batch_size = self.stream.batch_size or (c.batch_size if train else c.eval_batch_size or c.batch_size)
            return stream_loader(data, batch_size=batch_size, collate_fn=collate, num_workers=c.num_workers)
        if c.max_tokens is not None:
            lengths = [len(sequence) for sequence in data.sequences]
            sampler = LengthBatchSampler(lengths, max(c.max_tokens, max(lengths)), num_buckets=c.num_buckets,
                                         shuffle=train)
            return make_loader(data, batch_sampler=sampler, num_workers=c.num_workers, collate_fn=collate)
        return make_loader(data, batch_size=c.batch_size if train else c.eval_batch_size or c.batch_size,
                           shuffle=train, num_workers=c.num_workers, collate_fn=collate)

    def describe(self) -> str:
        return ", ".join(f"{split} {len(data)}" for split, data in self.splits.items())


# ---- ListOps ----------------------------------------------------------------------------------------------------
class ListOpsDataModule(SequenceDataModule):
    """LRA's ListOps: generated from `spec` (cached under data/longrange/), or read from LRA-format TSVs —
    `train_file` / `val_file` / `test_file` replace the generated split of the same name (e.g. `polyformer test ...
    --data.init_args.test_file basic_test.tsv` evaluates LRA's official test file)."""

    vocab_size = listops.VOCAB_SIZE
    num_classes = listops.NUM_CLASSES
    stream_name = "longrange.listops"

    def __init__(self, spec: listops.ListOpsSpec | None = None, train_file: str | None = None,
                 val_file: str | None = None, test_file: str | None = None, max_len: int = 2000,
                 cache: str | None = None, loader: LoaderConfig | None = None, stream: StreamConfig | None = None):
        super().__init__(loader, stream)
        self.spec = spec if spec is not None else listops.ListOpsSpec()
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.max_len = max_len
        self.cache = Path(cache) if cache is not None else CACHE

    def read(self, stage: str) -> None:
        """Reads (generating what is missing) the splits the stage needs: fit train and val, validate val, test
        and predict test."""
        needed = [s for s in STAGE_SPLITS.get(stage, listops.SPLITS) if s not in self.splits]
        drawn = tuple(split for split in needed if not self.files[split])
        generated = listops.generate(self.spec, self.cache, splits=drawn) if drawn else {}
        for split in needed:
            sequences, labels = listops.read_tsv(Path(self.files[split] or generated[split]))
            longer = sum(len(s) > self.max_len for s in sequences)
            if longer:
                rank_zero_info(f"ListOps {split}: {longer} of {len(sequences)} expressions longer than max_len="
                               f"{self.max_len} are truncated (LRA truncates too)")
            self.splits[split] = SequenceDataset([s[:self.max_len] for s in sequences], labels)


# ---- Text: byte-level IMDB --------------------------------------------------------------------------------------
def read_reviews(folder: Path, max_len: int) -> tuple[list[np.ndarray], list[int], int]:
    """(byte tokens per review, labels 1 = pos, count of reviews that are not valid UTF-8) of an aclImdb split
    folder with pos/ and neg/. Bytes are kept as they are, valid or not; the invalid are counted."""
    sequences, labels, invalid = [], [], 0
    for label, name in ((1, "pos"), (0, "neg")):
        files = sorted((folder / name).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no reviews in {folder / name} (expected aclImdb's <split>/{name}/*.txt)")
        for file in files:
            data = file.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                invalid += 1
            sequences.append(np.frombuffer(data[:max_len], dtype=np.uint8).astype(np.int16) + BYTE_OFFSET)
            labels.append(label)
    return sequences, labels, invalid


class TextDataModule(SequenceDataModule):
    """LRA's Text: IMDB reviews (Maas et al. 2011) as UTF-8 bytes, truncated to `max_len` (LRA: 4,096).

    `root` holds aclImdb's layout. Validation and a held-out test part are carved from `train_split` by a seeded
    shuffle (`val_size`, `heldout_size` reviews); with `test_split` set (e.g. `test`, aclImdb's own test reviews),
    that folder is the test split instead and nothing is held out.
    """

    vocab_size = BYTE_VOCAB_SIZE
    num_classes = 2
    stream_name = "longrange.text"

    def __init__(self, root: str | None = None, train_split: str = "train", test_split: str | None = None,
                 val_size: int = 2500, heldout_size: int = 2500, max_len: int = 4096, seed: int = 0,
                 train_size: int | None = None, loader: LoaderConfig | None = None,
                 stream: StreamConfig | None = None):
        super().__init__(loader, stream)
        self.root = Path(root) if root is not None else shared_data_dir() / "text" / "aclImdb"
        self.train_split, self.test_split = train_split, test_split
        self.val_size, self.heldout_size = val_size, heldout_size
        self.max_len, self.seed, self.train_size = max_len, seed, train_size

    def read(self, stage: str) -> None:
        if self.splits:
            return
        sequences, labels, invalid = read_reviews(self.root / self.train_split, self.max_len)
        order = list(range(len(sequences)))
        random.Random(self.seed).shuffle(order)
        held = 0 if self.test_split else self.heldout_size
        if self.val_size + held >= len(order):
            raise ValueError(f"val_size={self.val_size} + heldout_size={held} leave no training reviews of "
                             f"{len(order)} in {self.root / self.train_split}")
        parts = {"val": order[:self.val_size], "test": order[self.val_size:self.val_size + held],
                 "train": order[self.val_size + held:][:self.train_size]}
        for split, rows in parts.items():
            if rows:
                self.splits[split] = SequenceDataset([sequences[i] for i in rows], [labels[i] for i in rows])
        if self.test_split:
            test_sequences, test_labels, test_invalid = read_reviews(self.root / self.test_split, self.max_len)
            self.splits["test"] = SequenceDataset(test_sequences, test_labels)
            invalid += test_invalid
        if invalid:
            rank_zero_info(f"Text: {invalid} reviews are not valid UTF-8; their bytes are kept as they are")
        self.invalid_utf8 = invalid


# ---- Pathfinder-32 ----------------------------------------------------------------------------------------------
class PathfinderDataModule(SequenceDataModule):
    """LRA's Pathfinder-32: generated 32×32 images (`spec`, cached under data/longrange/) read row by row as 1,024
    intensity tokens; `folder` reads split files (<split>.npz) written elsewhere instead."""

    vocab_size = PIXEL_VOCAB_SIZE
    num_classes = 2
    max_len = pathfinder.SIZE * pathfinder.SIZE
    stream_name = "longrange.pathfinder"

    def __init__(self, spec: pathfinder.PathfinderSpec | None = None, folder: str | None = None,
                 cache: str | None = None, loader: LoaderConfig | None = None, stream: StreamConfig | None = None):
        super().__init__(loader, stream)
        self.spec = spec if spec is not None else pathfinder.PathfinderSpec()
        self.folder = Path(folder) if folder is not None else None
        self.cache = Path(cache) if cache is not None else CACHE

    def prepare_data(self) -> None:
        if self.folder is None and self.stream is None:
            pathfinder.generate(self.spec, self.cache)

    def read(self, stage: str) -> None:
        if self.splits:
            return
        paths = pathfinder.generate(self.spec, self.cache) if self.folder is None else \
            {split: self.folder / f"{split}.npz" for split in ("train", "val", "test")}
        for split, path in paths.items():
            images, labels = pathfinder.read_split(path)
            # intensity 0 is a real pixel: tokens are intensity + 2, so no pixel reads as padding
            tokens = images.reshape(len(images), -1).astype(np.int16) + BYTE_OFFSET
            self.splits[split] = SequenceDataset(tokens, labels)
