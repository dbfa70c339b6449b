"""Streaming data through litdata (Lightning's streaming datasets): a data set written once as optimized chunks with
`polyformer stream`, then read back by the data module with litdata's StreamingDataset — from a local folder or an
object-store URI (s3://, gs://, ...), shuffled per epoch with the run's seed, dealt to ranks without duplicates, and
resumable mid-epoch (litdata's StreamingDataLoader keeps its position in every checkpoint, as make_loader's do).

A stream is a folder per split, <uri>/<train|val|test>, holding litdata's chunks and index.json and Polyformer's
manifest (polyformer.json: which data set and split, the stream format, the writing Polyformer's version, what the
data module needs to read it back). Each streaming data module says how a split's samples become records of bytes and
numbers (`stream_sources`) and how a record becomes a sample again (its decode function).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fsspec.core
import litdata
from litdata import StreamingDataLoader, StreamingDataset

from polyformer.data import global_seed, loader_options, world

log = logging.getLogger(__name__)
STREAM_FORMAT = 1  # the records' layout: bumped whenever a domain changes what it writes
MANIFEST = "polyformer.json"
SPLITS = ("train", "val", "test")


def polyformer_version() -> str:
    try:
        return version("polyformer")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


class StreamError(ValueError):
    """A stream folder that is missing, unfinished, or written for another data set or stream format."""


@dataclass
class StreamConfig:
    """Read a data module's splits from the litdata chunks `polyformer stream` wrote: <uri>/<train|val|test>."""

    uri: str  # a local folder, or an object-store URI (s3://bucket/prefix, gs://..., as litdata reads them)
    batch_size: int | None = None  # samples per batch; default: the data module's own batch size
    cache_dir: str | None = None  # where a remote stream's chunks are cached; default: litdata's

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"stream.batch_size must be at least 1 (or unset), found {self.batch_size}")


@dataclass
class StreamSource:
    """What `polyformer stream` writes of one split: `encode(item)` is the record of each of `items`."""

    dataset: str  # the data set's kind, e.g. "speech.librispeech"; a reader of another kind refuses the stream
    items: Sequence[Any]  # one per sample, e.g. (path, transcript) pairs
    # item → record of bytes, str, int, float and numpy arrays (a module-level function). File paths go in as bytes:
    # litdata stores a str naming an existing image, audio or video file as that file's decoded contents
    encode: Callable[[Any], dict]
    meta: dict = field(default_factory=dict)  # JSON the reader needs back, e.g. the class names


def split_uri(uri: str, split: str) -> str:
    return f"{uri.rstrip('/')}/{split}"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("local:")


def write_stream(source: StreamSource, out: str | Path, *, split: str, chunk_bytes: str = "64MB",
                 num_workers: int = 1) -> dict:
    """Writes one split as litdata chunks (litdata.optimize) and its manifest beside them; returns the manifest."""
    if is_remote(str(out)):
        raise StreamError(f"stream {out}: expected a local folder to write (copy it to an object store after, e.g. "
                          f"`aws s3 sync`); data modules read it from there")
    if not source.items:
        raise StreamError(f"stream {out}: the {split} split of {source.dataset} has no samples to write")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise StreamError(f"stream {out}: expected a new or empty folder, found files there (remove them first)")
    start = time.perf_counter()
    litdata.optimize(fn=source.encode, inputs=list(source.items), output_dir=str(out), chunk_bytes=chunk_bytes,
                     num_workers=num_workers, verbose=False, keep_data_ordered=True,
                     start_method="fork" if sys.platform == "linux" else None)  # fork: workers without re-imports
    manifest = {"dataset": source.dataset, "split": split, "samples": len(source.items), "format": STREAM_FORMAT,
                "polyformer": polyformer_version(), "meta": source.meta,
                "seconds": round(time.perf_counter() - start, 2)}
    (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(uri: str) -> dict:
    """The manifest of one split's stream folder, read through fsspec for a URI (s3:// needs s3fs, gs:// gcsfs)."""
    if is_remote(uri):
        try:
            store, path = fsspec.core.url_to_fs(split_uri(uri, MANIFEST))
        except (ImportError, ValueError) as error:  # fsspec names the package the protocol needs, or an unknown one
            raise StreamError(f"stream {uri}: cannot open its protocol ({error})") from None
        try:
            text = store.cat_file(path).decode()
        except Exception as error:  # the file systems raise their own kinds
            raise StreamError(f"stream {uri}: cannot read its {MANIFEST} ({error}): expected a folder written by "
                              f"`polyformer stream`") from None
        return parse_manifest(text, uri)
    path = Path(uri.removeprefix("local:")) / MANIFEST
    if not path.is_file():
        found = "no such folder" if not path.parent.is_dir() else (
            "litdata chunks without Polyformer's manifest" if (path.parent / "index.json").is_file()
            else "a folder without litdata's index.json (not a stream)")
        raise StreamError(f"stream {path.parent}: expected a split folder written by `polyformer stream` (with "
                          f"{MANIFEST}), found {found}")
    return parse_manifest(path.read_text(), str(path.parent))


def parse_manifest(text: str, uri: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise StreamError(f"stream {uri}: its {MANIFEST} is not JSON ({error}): write the stream again") from None


def check_manifest(manifest: dict, uri: str, dataset: str, split: str) -> None:
    """Refuses a stream of another data set, split or stream format, naming what was expected and found."""
    if manifest.get("dataset") != dataset:
        raise StreamError(f"stream {uri}: written from data set {manifest.get('dataset')!r}, but this data module "
                          f"reads {dataset!r}: convert the right data with `polyformer stream -c <its config>`")
    if manifest.get("format") != STREAM_FORMAT:
        raise StreamError(f"stream {uri}: written by Polyformer {manifest.get('polyformer')} (stream format "
                          f"{manifest.get('format')}), this is Polyformer {polyformer_version()} (stream format "
                          f"{STREAM_FORMAT}): write it again with this version's `polyformer stream`")
    if manifest.get("split") != split:
        raise StreamError(f"stream {uri}: holds split {manifest.get('split')!r}, expected {split!r}")


def open_stream(config: StreamConfig, split: str, dataset: str, decode: Callable[[dict], Any] | None, *,
                shuffle: bool, seed: int | None = None) -> StreamingDataset:
    """One split of a stream as litdata's StreamingDataset, each record passed through `decode`; shuffled per epoch
    from `seed` (default: the run's), checked against `dataset`. The manifest is kept on `.manifest`.

    Under DDP / FSDP litdata deals each rank its own chunks and drops what does not fill every rank's last batch (at
    most ranks × batch − 1 samples; in training, others each epoch), so that ranks stay in step: stream_loader logs
    the count. One process reads every sample."""
    uri = split_uri(config.uri, split)
    manifest = read_manifest(uri)
    check_manifest(manifest, uri, dataset, split)
    stream = StreamingDataset(uri, cache_dir=config.cache_dir, shuffle=shuffle,
                              seed=global_seed() if seed is None else seed, transform=decode)
    stream.manifest = manifest
    return stream


class EpochStreamingDataLoader(StreamingDataLoader):
    """litdata's loader, for Lightning: Lightning ends an epoch after len(loader) batches without exhausting the
    iterator, which leaves a resumed epoch's `restore` flag set, so the next epoch would replay the checkpoint's
    position. The next epoch after a resumed one starts afresh (whether the resumed one yielded all its samples or
    was cut short, e.g. by limit_train_batches)."""

    resumed_epoch_started = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self.resumed_epoch_started = False

    def __iter__(self):
        if self.restore and (self.resumed_epoch_started or self._num_samples_yielded_streaming >= len(self.dataset)):
            self.restore = False
        self.resumed_epoch_started = self.restore
        yield from super().__iter__()


def stream_loader(stream: StreamingDataset, *, batch_size: int, collate_fn: Callable | None = None,
                  num_workers: int = 0, drop_last: bool | None = None) -> EpochStreamingDataLoader:
    """litdata's StreamingDataLoader over a stream: its state_dict (position in the epoch, epoch, world size) goes
    into every checkpoint, so a fit resumed mid-epoch goes on with the epoch's next batch. `drop_last` True: full
    batches only (e.g. for Mixup); None keeps litdata's (drop only what keeps ranks in step). Worker seeds come from
    a generator of the run's seed, as make_loader's do; workers are not persistent (litdata hands each epoch's
    order to its workers as it starts them)."""
    if batch_size < 1:
        raise ValueError(f"stream batch_size must be at least 1, found {batch_size}")
    rank, size = world()
    left = stream.manifest["samples"] % (size * batch_size) if size > 1 else 0
    if left and rank == 0:
        log.warning("stream %s: %d of its %d samples do not fill a batch of %d on each of %d ranks and are left out "
                    "of each epoch (others each training epoch); evaluate on one process for every sample",
                    stream.input_dir.path or stream.input_dir.url, left, stream.manifest["samples"], batch_size, size)
    return EpochStreamingDataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                                    drop_last=drop_last, **loader_options())
