"""LibriSpeech-layout corpora: index, decode (soundfile), bucket by duration, batch by total seconds.

Layout: <root>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac and
<speaker>-<chapter>.trans.txt ("<utt-id> TRANSCRIPT" per line). Real LibriSpeech (download: true fetches a missing
split's archive from openslr.org or a mirror, checked against its sha256) and the synthetic corpus of scripts/make_synthetic_librispeech.py read the same way.

Bad input: a transcript line without audio, a FLAC file without a transcript line, a line that is not
"<utterance-id> TRANSCRIPT" or repeats an id, a transcript with characters other than LibriSpeech's (A-Z, apostrophe,
space), an unreadable or corrupt FLAC, audio not at the expected sample rate or not mono raise a ValueError naming the
file (and line), unless `skip_bad` is set, in which case each is logged and counted.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import soundfile as sf
import torch
import torchaudio
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from polyformer.checkpoint import renamed_arguments
from polyformer.data import LengthBatchSampler, fetch_and_extract, make_loader, shared_data_dir
from polyformer.streaming import StreamConfig, StreamSource, open_stream, stream_loader
from polyformer.domains.speech.tokens import CharTokenizer

log = logging.getLogger(__name__)
TRANSCRIPT_CHARS = frozenset(CharTokenizer.symbols)  # LibriSpeech's: upper-case A-Z, apostrophe and space


@dataclass
class Utterance:
    id: str
    path: Path
    transcript: str
    duration: float  # seconds


class BadAudio(ValueError):
    """An utterance that cannot be used as it is: the message names the file and what is wrong."""


def check_line(where: str, line: str) -> str:
    """The transcript of a line "<utterance-id> TRANSCRIPT"; BadAudio naming `where` (file:line) when malformed."""
    utt_id, _, text = line.strip().partition(" ")
    text = text.strip()
    if not text or Path(utt_id).name != utt_id:
        raise BadAudio(f"{where}: expected '<utterance-id> TRANSCRIPT', found {line!r}")
    if not TRANSCRIPT_CHARS.issuperset(text):
        bad = next(c for c in text if c not in TRANSCRIPT_CHARS)
        raise BadAudio(f"{where}: transcript of {utt_id} has character {bad!r}; expected upper-case A-Z, apostrophe "
                       f"and space (LibriSpeech's)")
    return text


def check_audio(path: Path, sample_rate: int) -> float:
    """Duration in seconds from the FLAC header; BadAudio when unreadable, not mono or at another rate."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as error:
        raise BadAudio(f"{path}: unreadable or corrupt audio ({error})") from None
    if info.samplerate != sample_rate:
        raise BadAudio(f"{path}: expected {sample_rate} Hz audio, found {info.samplerate} Hz")
    if info.channels != 1:
        raise BadAudio(f"{path}: expected mono audio, found {info.channels} channels")
    return info.frames / info.samplerate


OPENSLR_LIBRISPEECH = "https://www.openslr.org/resources/12"
LIBRISPEECH_SHA256 = {  # openslr's archives <split>.tar.gz (the checksums torchaudio's LIBRISPEECH checks too)
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}


def download_split(root: Path, split: str, mirror: str = OPENSLR_LIBRISPEECH, checksum: str | None = None) -> None:
    """Fetches `<mirror>/<split>.tar.gz` (checked against `checksum`, default openslr's sha256) and unpacks it under
    root, where it must leave LibriSpeech/<split>/."""
    if checksum is None and split not in LIBRISPEECH_SHA256:
        raise ValueError(f"split {split!r}: no checksum known (LibriSpeech's splits are {sorted(LIBRISPEECH_SHA256)});"
                         f" give data.checksums: {{{split}: '<kind>:<hex>'}} for a mirror's archive")
    checksum = checksum or f"sha256:{LIBRISPEECH_SHA256[split]}"
    fetch_and_extract(f"{mirror.rstrip('/')}/{split}.tar.gz", checksum, root)
    if not (root / "LibriSpeech" / split).is_dir():
        raise ValueError(f"{mirror}/{split}.tar.gz: unpacked under {root}, but it holds no LibriSpeech/{split}/ folder")


def read_split(root: Path, split: str, *, sample_rate: int = 16_000, skip_bad: bool = False) -> list[Utterance]:
    """Every transcribed utterance of one split, checked against its audio header."""
    folder = root / "LibriSpeech" / split
    if not folder.is_dir():
        fetchable = (f"; set data.download: true to fetch it ({OPENSLR_LIBRISPEECH}/{split}.tar.gz)"
                     if split in LIBRISPEECH_SHA256 else "")
        raise FileNotFoundError(f"split {split!r}: expected the folder {folder} (LibriSpeech layout), found none"
                                f"{fetchable}")
    utterances, skipped = [], 0
    named: dict[Path, str] = {}  # audio path → the transcript line that names it

    def bad(error: BadAudio) -> None:
        nonlocal skipped
        if not skip_bad:
            raise error
        skipped += 1
        log.warning("skipping bad utterance %d of split %s: %s", skipped, split, error)

    for transcript_file in sorted(folder.glob("*/*/*.trans.txt")):
        try:
            lines = transcript_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"{transcript_file}: expected UTF-8 text, found byte {error.object[error.start]:#04x} "
                             f"at offset {error.start}") from None
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where, utt_id = f"{transcript_file}:{line_no}", line.strip().partition(" ")[0]
            path = transcript_file.parent / f"{utt_id}.flac"
            try:
                if path in named:
                    raise BadAudio(f"{where}: utterance {utt_id} is listed again (first at {named[path]})")
                named[path] = where  # even when the line is bad: its audio is accounted for, one utterance one skip
                text = check_line(where, line)
                if not path.is_file():
                    raise BadAudio(f"{where}: transcript line for {utt_id} has no audio (expected {path})")
                duration = check_audio(path, sample_rate)
            except BadAudio as error:
                bad(error)
                continue
            utterances.append(Utterance(utt_id, path, text, duration))
    for path in sorted(set(folder.rglob("*.flac")) - named.keys()):
        bad(BadAudio(f"{path}: audio without a transcript line (expected a line '{path.stem} TRANSCRIPT' in "
                     f"{path.parent / path.stem.rpartition('-')[0]}.trans.txt)"))
    if skipped:
        log.warning("split %s: skipped %d bad utterances (skip_bad=True), kept %d", split, skipped, len(utterances))
    if not utterances:
        raise ValueError(f"split {split!r} under {folder}: no usable utterances found")
    return utterances


def read_audio_folder(folder: Path, *, sample_rate: int = 16_000, skip_bad: bool = False) -> list[Utterance]:
    """Every FLAC or WAV file below `folder`, checked like a split's audio, without a transcript (""): audio for
    self-supervised pre-training."""
    if not folder.is_dir():
        raise FileNotFoundError(f"audio folder {folder}: expected a folder of FLAC / WAV files, found none")
    utterances, skipped = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".flac", ".wav")):
        try:
            utterances.append(Utterance(str(path.relative_to(folder).with_suffix("")), path, "",
                                        check_audio(path, sample_rate)))
        except BadAudio as error:
            if not skip_bad:
                raise
            skipped += 1
            log.warning("skipping bad audio %d of folder %s: %s", skipped, folder, error)
    if not utterances:
        raise ValueError(f"audio folder {folder}: no usable FLAC or WAV file found")
    return utterances


def decode_waveform(audio, name: str, sample_rate: int, speed_factors: list[float] | None) -> Tensor:
    """float32 waveform (s,) of a FLAC / WAV file or its bytes; with `speed_factors`, played at a factor drawn from
    them (Ko et al. 2015's speed perturbation: tempo and pitch together, through torchaudio's resampling)."""
    data, rate = sf.read(audio, dtype="float32", always_2d=False)
    if rate != sample_rate:
        raise BadAudio(f"{name}: expected {sample_rate} Hz audio, found {rate} Hz")
    waveform = torch.from_numpy(data)
    factor = random.choice(speed_factors) if speed_factors else 1.0
    if factor != 1.0:
        waveform = torchaudio.functional.speed(waveform[None], sample_rate, factor)[0][0]
    return waveform


class SpeechDataset(Dataset):
    """Decodes one utterance with soundfile: (float32 waveform (s,), transcript, id), speed-perturbed when
    `speed_factors` are given (decode_waveform)."""

    def __init__(self, utterances: list[Utterance], sample_rate: int = 16_000, skip_bad: bool = False,
                 speed_factors: list[float] | None = None):
        self.utterances, self.sample_rate, self.skip_bad = utterances, sample_rate, skip_bad
        self.speed_factors = speed_factors
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> tuple[Tensor, str, str] | None:
        utterance = self.utterances[index]
        try:
            waveform = decode_waveform(str(utterance.path), str(utterance.path), self.sample_rate, self.speed_factors)
        except (RuntimeError, sf.LibsndfileError) as error:
            if not self.skip_bad:
                raise BadAudio(f"{utterance.path}: cannot decode ({error})") from None
            self.skipped += 1
            log.warning("skipping undecodable utterance (%d in this worker): %s: %s", self.skipped, utterance.path,
                        error)
            return None
        return waveform, utterance.transcript, utterance.id


STREAM_NAME = "speech.librispeech"


def encode_utterance(utterance: Utterance) -> dict:
    """A stream's record of one utterance: its FLAC / WAV file's bytes as they are, transcript, id, seconds, file."""
    return {"id": utterance.id, "transcript": utterance.transcript, "duration": utterance.duration,
            "name": str(utterance.path).encode(), "audio": utterance.path.read_bytes()}


@dataclass
class StreamedUtterance:
    """A stream record → (waveform, transcript, id), as SpeechDataset gives them (None for an undecodable record
    with skip_bad, logged)."""

    sample_rate: int = 16_000
    speed_factors: list[float] | None = None
    skip_bad: bool = False

    def __call__(self, record: dict) -> tuple[Tensor, str, str] | None:
        name = f"{record['id']} (stream record of {bytes(record['name']).decode()})"
        try:
            waveform = decode_waveform(io.BytesIO(bytes(record["audio"])), name, self.sample_rate, self.speed_factors)
        except (RuntimeError, sf.LibsndfileError) as error:
            if not self.skip_bad:
                raise BadAudio(f"{name}: cannot decode ({error})") from None
            log.warning("skipping undecodable utterance %s: %s", name, error)
            return None
        return waveform, record["transcript"], record["id"]


def collate(items: list[tuple[Tensor, str, str] | None]) -> dict:
    """Zero-padded (b s) waveforms, (b,) sample counts, transcripts and ids; skipped (None) items are left out."""
    items = [item for item in items if item is not None]
    lengths = torch.tensor([len(wave) for wave, _, _ in items], dtype=torch.long)
    waveforms = torch.zeros(len(items), int(lengths.max()) if items else 0)
    for i, (wave, _, _) in enumerate(items):
        waveforms[i, : len(wave)] = wave
    return {"waveforms": waveforms, "lengths": lengths, "transcripts": [t for _, t, _ in items],
            "ids": [u for _, _, u in items]}


@dataclass
class AudioConfig:
    """How utterances are decoded and which are trained on."""

    sample_rate: int = 16_000
    max_duration: float = 20.0  # training utterances longer than this (seconds) are dropped, with a count
    speed_factors: list[float] | None = None  # training speed perturbation, e.g. [0.9, 1.0, 1.1]
    stats_utterances: int = 500  # training utterances the normalisation statistics are estimated from
    skip_bad: bool = False  # log and count bad utterances instead of raising

    def __post_init__(self) -> None:
        if self.speed_factors is not None and (not self.speed_factors or min(self.speed_factors) <= 0):
            raise ValueError(f"speed_factors must be positive factors, found {self.speed_factors}")
        for name in ("sample_rate", "max_duration", "stats_utterances"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, found {getattr(self, name)}")


@dataclass
class SpeechLoaderConfig:
    """Batches of utterances of similar duration (num_buckets duration buckets) capped by padded seconds of audio:
    the core's LengthBatchSampler, seeded from (seed, epoch)."""

    batch_seconds: float = 200.0  # padded seconds of audio per training batch
    eval_batch_seconds: float | None = None  # default 2 × batch_seconds
    num_buckets: int = 10
    num_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("batch_seconds", "eval_batch_seconds", "num_buckets"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, found {value}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, found {self.num_workers}")


class LibriSpeechDataModule(L.LightningDataModule):
    """Train / validation / test splits of a LibriSpeech-layout corpus, bucketed and capped by seconds per batch."""

    # the flat arguments of releases up to 0.1.0 → where they live now (read with a deprecation message)
    renamed_hparams = {**{name: f"audio.{name}" for name in ("sample_rate", "max_duration", "speed_factors",
                                                                 "stats_utterances", "skip_bad")},
                         **{name: f"loader.{name}" for name in ("batch_seconds", "eval_batch_seconds", "num_buckets",
                                                                  "num_workers")}}

    def __init__(
        self,
        root: str | None = None,  # folder holding LibriSpeech/; default <shared data>/librispeech
        train_splits: list[str] | None = None,  # default ["train-clean-100"]
        val_splits: list[str] | None = None,  # default ["dev-clean"]
        test_splits: list[str] | None = None,  # default ["test-clean", "test-other"]; one test loader each
        audio_folders: list[str] | None = None,  # more training audio, without transcripts (self-supervised only)
        audio: AudioConfig | None = None,
        loader: SpeechLoaderConfig | None = None,
        download: bool = False,  # fetch missing LibriSpeech splits (GBs): only when asked
        mirror: str = OPENSLR_LIBRISPEECH,  # where <split>.tar.gz archives are fetched from
        checksums: dict[str, str] | None = None,  # split → "<kind>:<hex>", for archives other than openslr's
        seed: int | None = None,  # batch order seed; default: the run's seed_everything
        stream: StreamConfig | None = None,  # read the splits `polyformer stream` wrote (batches of stream.batch_size)
        sample_rate: int | None = None,
        max_duration: float | None = None,
        speed_factors: list[float] | None = None,
        stats_utterances: int | None = None,
        skip_bad: bool | None = None,
        batch_seconds: float | None = None,
        eval_batch_seconds: float | None = None,
        num_buckets: int | None = None,
        num_workers: int | None = None,
    ):
        """sample_rate … num_workers: the flat form of `audio` and `loader` (releases up to 0.1.0), read with a
        deprecation message."""
        super().__init__()
        old = {"sample_rate": sample_rate, "max_duration": max_duration, "speed_factors": speed_factors,
               "stats_utterances": stats_utterances, "skip_bad": skip_bad, "batch_seconds": batch_seconds,
               "eval_batch_seconds": eval_batch_seconds, "num_buckets": num_buckets, "num_workers": num_workers}
        given = renamed_arguments(type(self).__name__, old, self.renamed_hparams,
                                  {"audio": audio, "loader": loader},
                                  {"audio": AudioConfig, "loader": SpeechLoaderConfig})
        self.audio, self.loader = given["audio"] or AudioConfig(), given["loader"] or SpeechLoaderConfig()
        self.root = Path(root) if root is not None else shared_data_dir() / "librispeech"
        self.train_splits = train_splits or ["train-clean-100"]
        self.val_splits = val_splits or ["dev-clean"]
        self.test_splits = test_splits or ["test-clean", "test-other"]
        self.audio_folders = [Path(folder) for folder in audio_folders or []]
        self.download, self.mirror, self.checksums = download, mirror, checksums or {}
        self.seed = seed
        if stream is not None and stream.batch_size is None:
            raise ValueError("stream.batch_size: expected the utterances per batch of a streamed corpus (its batches "
                             "cannot be packed by seconds without every duration up front), found None")
        self.stream = stream
        self.splits: dict[str, list[Utterance]] = {}
        self.train_set: list[Utterance] | None = None

    def prepare_data(self) -> None:
        if not self.download:
            return
        for split in sorted({*self.train_splits, *self.val_splits, *self.test_splits}):
            if not (self.root / "LibriSpeech" / split).is_dir():
                download_split(self.root, split, self.mirror, self.checksums.get(split))

    def utterances(self, split: str) -> list[Utterance]:
        if split not in self.splits:
            self.splits[split] = read_split(self.root, split, sample_rate=self.audio.sample_rate,
                                            skip_bad=self.audio.skip_bad)
        return self.splits[split]

    def train_utterances(self) -> list[Utterance]:
        """The training splits without utterances over max_duration; filtered (and the drop logged) once."""
        if self.train_set is not None:
            return self.train_set
        everything = [u for split in self.train_splits for u in self.utterances(split)]
        for folder in self.audio_folders:
            everything += read_audio_folder(folder, sample_rate=self.audio.sample_rate, skip_bad=self.audio.skip_bad)
        kept = [u for u in everything if u.duration <= self.audio.max_duration]
        if len(kept) < len(everything):
            log.warning("training data: dropped %d of %d utterances longer than max_duration=%.1f s",
                        len(everything) - len(kept), len(everything), self.audio.max_duration)
        if not kept:
            raise ValueError(f"no training utterance is at most max_duration={self.audio.max_duration} s long")
        self.train_set = kept
        return kept

    def setup(self, stage: str | None = None) -> None:
        if self.stream is not None:
            return self.setup_stream(stage)
        if stage in (None, "fit"):
            self.train_utterances()
        if stage in (None, "fit", "validate"):
            self.val_set = [u for split in self.val_splits for u in self.utterances(split)]
        if stage in (None, "test", "predict"):
            self.test_sets = [self.utterances(split) for split in self.test_splits]

    def setup_stream(self, stage: str | None) -> None:
        """The splits from the stream's folders: train, val, and test/<split> for each of `test_splits`. Batches
        hold stream.batch_size utterances; max_duration was applied when the stream was written."""
        decode = StreamedUtterance(self.audio.sample_rate, skip_bad=self.audio.skip_bad)
        if stage in (None, "fit"):
            self.train_set = open_stream(self.stream, "train", STREAM_NAME,
                                         StreamedUtterance(self.audio.sample_rate, self.audio.speed_factors,
                                                           self.audio.skip_bad),
                                         shuffle=True, seed=self.seed)
            written = self.train_set.manifest["meta"].get("max_duration")
            if written is not None and written > self.audio.max_duration:
                raise ValueError(f"stream {self.stream.uri}: written with max_duration={written} s, this data module "
                                 f"has max_duration={self.audio.max_duration} s: write the stream again with it")
            log.info("streamed LibriSpeech: batches of %d utterances (batch_seconds, eval_batch_seconds and "
                     "num_buckets apply to folders only)", self.stream.batch_size)
        if stage in (None, "fit", "validate"):
            self.val_set = open_stream(self.stream, "val", STREAM_NAME, decode, shuffle=False)
        if stage in (None, "test", "predict"):
            self.test_sets = [open_stream(self.stream, f"test/{split}", STREAM_NAME, decode, shuffle=False)
                              for split in self.test_splits]

    def stream_sources(self, split: str) -> dict[str, StreamSource]:
        """What `polyformer stream` writes: the training utterances (max_duration applied), the validation splits
        together, each test split in test/<split>."""
        if split == "train":
            return {"train": StreamSource(STREAM_NAME, self.train_utterances(), encode_utterance,
                                          {"max_duration": self.audio.max_duration})}
        if split == "val":
            return {"val": StreamSource(STREAM_NAME, self.val_set, encode_utterance)}
        return {f"test/{name}": StreamSource(STREAM_NAME, utterances, encode_utterance)
                for name, utterances in zip(self.test_splits, self.test_sets)}

    def transcripts(self) -> list[str]:
        """Training transcripts (for a SentencePiece model)."""
        if self.stream is not None:  # every record, on every rank (len() of a stream is this rank's share)
            raw = open_stream(self.stream, "train", STREAM_NAME, None, shuffle=False)
            return [raw[i]["transcript"] for i in range(raw.manifest["samples"])]
        return [u.transcript for u in self.train_utterances()]

    def stats_waveforms(self) -> Iterator[Tensor]:
        """Waveforms of a seeded random subset of training utterances, for the normalisation statistics."""
        if self.stream is not None:
            train = open_stream(self.stream, "train", STREAM_NAME, StreamedUtterance(self.audio.sample_rate,
                                                                                    skip_bad=self.audio.skip_bad),
                                shuffle=False)
            count = train.manifest["samples"]  # every record, on every rank
        else:
            train = SpeechDataset(self.train_utterances(), self.audio.sample_rate, self.audio.skip_bad)
            count = len(train)
        chosen = random.Random(0).sample(range(count), min(self.audio.stats_utterances, count))
        for i in sorted(chosen):
            item = train[i]
            if item is not None:
                yield item[0]

    def _loader(self, utterances: list[Utterance], max_seconds: float, shuffle: bool,
                speed_factors: list[float] | None = None) -> DataLoader:
        if self.stream is not None:  # a StreamingDataset, decoding (and speed-perturbing) itself
            return stream_loader(utterances, batch_size=self.stream.batch_size, collate_fn=collate,
                                 num_workers=self.loader.num_workers)
        # batches are packed on the slowest factor's durations, so that perturbed audio stays under the cap
        stretch = 1.0 / min(speed_factors) if speed_factors else 1.0
        durations = [u.duration * stretch for u in utterances]
        sampler = LengthBatchSampler(durations, max(max_seconds, max(durations)),
                                     num_buckets=self.loader.num_buckets, shuffle=shuffle, seed=self.seed)
        return make_loader(SpeechDataset(utterances, self.audio.sample_rate, self.audio.skip_bad, speed_factors),
                           batch_sampler=sampler, collate_fn=collate, num_workers=self.loader.num_workers)

    def eval_batch_seconds(self) -> float:
        return self.loader.eval_batch_seconds or 2 * self.loader.batch_seconds

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.loader.batch_seconds, shuffle=True,
                            speed_factors=self.audio.speed_factors)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_seconds(), shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(s, self.eval_batch_seconds(), shuffle=False) for s in self.test_sets]

    def predict_dataloader(self) -> list[DataLoader]:
        """`polyformer predict` transcribes the test splits."""
        return self.test_dataloader()
