"""LibriSpeech-layout reading, bad input, duration batching and the synthetic corpus."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import polyformer.data
from polyformer.data import LengthBatchSampler
from polyformer.domains.speech.data import (
    AudioConfig,
    LibriSpeechDataModule,
    SpeechDataset,
    SpeechLoaderConfig,
    collate,
    read_split,
)
from polyformer.domains.speech.tokens import CharTokenizer


def test_synthetic_corpus_layout(tiny_corpus):
    root = tiny_corpus / "LibriSpeech"
    summary = json.loads((root / "corpus.json").read_text())["splits"]
    assert {s: summary[s]["utterances"] for s in summary} == {"train": 24, "dev": 6, "test": 6, "heldout": 6}
    texts = {split: {u.transcript for u in read_split(tiny_corpus, split)} for split in summary}
    assert not texts["train"] & (texts["dev"] | texts["test"] | texts["heldout"])  # unseen sentences
    tokenizer = CharTokenizer()
    for utterance in read_split(tiny_corpus, "train"):
        speaker, chapter, _ = utterance.id.split("-")
        assert utterance.path == root / "train" / speaker / chapter / f"{utterance.id}.flac"
        assert tokenizer.decode(tokenizer.encode(utterance.transcript)) == utterance.transcript
        assert sf.info(str(utterance.path)).samplerate == 16_000 and 0.3 < utterance.duration < 10
    train_speakers = {u.id.split("-")[0] for u in read_split(tiny_corpus, "train")}
    held_speakers = {u.id.split("-")[0] for u in read_split(tiny_corpus, "heldout")}
    assert not train_speakers & held_speakers
    assert "en-gb-scotland" in (root / "SPEAKERS.TXT").read_text()


@pytest.fixture
def corpus_copy(tiny_corpus, tmp_path) -> Path:
    shutil.copytree(tiny_corpus / "LibriSpeech" / "dev", tmp_path / "LibriSpeech" / "dev")
    return tmp_path


def test_missing_audio_is_an_error_or_a_counted_skip(corpus_copy, caplog):
    victim = sorted((corpus_copy / "LibriSpeech" / "dev").glob("*/*/*.flac"))[0]
    victim.unlink()
    with pytest.raises(ValueError, match=f"{victim.stem} has no audio"):
        read_split(corpus_copy, "dev")
    with caplog.at_level(logging.WARNING):
        kept = read_split(corpus_copy, "dev", skip_bad=True)
    assert len(kept) == 5
    assert "skipped 1 bad utterances" in caplog.text


def test_corrupt_flac_and_wrong_rate_are_errors(corpus_copy):
    files = sorted((corpus_copy / "LibriSpeech" / "dev").glob("*/*/*.flac"))
    files[0].write_bytes(b"not a flac file at all")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        read_split(corpus_copy, "dev")
    files[0].unlink()
    sf.write(files[0], np.zeros(8000, dtype=np.float32), 8000, format="FLAC")
    with pytest.raises(ValueError, match="expected 16000 Hz audio, found 8000 Hz"):
        read_split(corpus_copy, "dev")
    assert len(read_split(corpus_copy, "dev", skip_bad=True)) == 5


def test_corrupt_audio_body_fails_at_decoding_or_is_skipped(corpus_copy):
    utterances = read_split(corpus_copy, "dev")
    data = utterances[0].path.read_bytes()
    utterances[0].path.write_bytes(data[:200])  # header survives, the frames are gone
    with pytest.raises(ValueError, match=str(utterances[0].path)):
        SpeechDataset(utterances)[0]
    dataset = SpeechDataset(utterances, skip_bad=True)
    batch = collate([dataset[0], dataset[1]])
    assert dataset.skipped == 1 and len(batch["transcripts"]) == 1


def test_duration_batches_cover_everything_under_the_cap(monkeypatch):
    rng = np.random.default_rng(0)
    durations = rng.uniform(1.0, 15.0, size=200).tolist()
    sampler = LengthBatchSampler(durations, 40.0, num_buckets=5, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(max(durations[i] for i in b) * len(b) <= 40.0 for b in batches)
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    # under DDP each rank takes every world-th batch; together they cover everything, equally many per rank
    shards = []
    for rank in range(3):
        monkeypatch.setattr(polyformer.data, "world", lambda r=rank: (r, 3))
        shards.append(list(sampler))
    assert len({len(s) for s in shards}) == 1
    assert {i for s in shards for b in s for i in b} == set(range(200))


def test_long_utterances_are_dropped_with_a_count(tiny_corpus, caplog):
    module = LibriSpeechDataModule(root=str(tiny_corpus), train_splits=["train"], audio=AudioConfig(max_duration=3.0),
                                   loader=SpeechLoaderConfig(num_workers=0))
    everything = read_split(tiny_corpus, "train")
    with caplog.at_level(logging.WARNING):
        kept = module.train_utterances()
    dropped = sum(u.duration > 3.0 for u in everything)
    assert len(kept) == len(everything) - dropped and 0 < dropped < len(everything)
    assert f"dropped {dropped} of {len(everything)}" in caplog.text


def test_the_flat_arguments_of_0_1_0_are_read_with_a_deprecation_message(tiny_corpus):
    with pytest.warns(DeprecationWarning, match="max_duration, batch_seconds, num_workers are deprecated .* write "
                                                "audio.max_duration, loader.batch_seconds, loader.num_workers"):
        old = LibriSpeechDataModule(root=str(tiny_corpus), max_duration=3.0, batch_seconds=30.0, num_workers=0)
    assert old.audio == AudioConfig(max_duration=3.0)
    assert old.loader == SpeechLoaderConfig(batch_seconds=30.0, num_workers=0)
    with pytest.raises(ValueError, match="num_workers are the old, flat form of `loader`: set loader.num_workers, "
                                         "found both"):
        LibriSpeechDataModule(loader=SpeechLoaderConfig(), num_workers=0)


def test_evaluation_loaders_keep_every_utterance_even_over_max_duration(tiny_corpus):
    # max_duration drops long *training* utterances only: validation and test loaders read every one, once
    module = LibriSpeechDataModule(root=str(tiny_corpus), train_splits=["train"], val_splits=["dev"],
                                   test_splits=["test", "heldout"], audio=AudioConfig(max_duration=1.0),
                                   loader=SpeechLoaderConfig(eval_batch_seconds=8.0, num_workers=0))
    module.setup("validate")
    module.setup("test")
    loaders = {"dev": module.val_dataloader(), **dict(zip(["test", "heldout"], module.test_dataloader()))}
    for split, loader in loaders.items():
        expected = sorted(u.id for u in read_split(tiny_corpus, split))
        seen = sorted(i for batch in loader for i in batch["ids"])
        assert seen == expected and len(seen) > 0, split
        assert any(u.duration > 1.0 for u in read_split(tiny_corpus, split)), f"{split}: nothing over the cap"


def test_speed_perturbation_changes_length_and_keeps_batches_under_the_cap(tiny_corpus):
    import random

    from polyformer.domains.speech import LibriSpeechDataModule

    data = LibriSpeechDataModule(root=str(tiny_corpus), train_splits=["train"], val_splits=["dev"],
                                 test_splits=["test"], audio=AudioConfig(speed_factors=[0.9, 1.1]),
                                 loader=SpeechLoaderConfig(batch_seconds=20.0, num_workers=0))
    data.setup("fit")
    loader = data.train_dataloader()
    dataset, original = loader.dataset, loader.dataset.utterances[0]
    random.seed(0)
    lengths = {len(dataset[0][0]) for _ in range(12)}
    samples = round(original.duration * 16000)
    assert len(lengths) == 2  # both factors drawn in 12 decodings, neither the original length
    slow, fast = max(lengths), min(lengths)
    assert abs(slow - samples / 0.9) <= 1 and abs(fast - samples / 1.1) <= 1
    for batch in loader:  # packed on durations / 0.9: perturbed audio stays under 20 s of padded samples
        assert batch["waveforms"].numel() <= 20.0 * 16000
    with pytest.raises(ValueError, match="speed_factors must be positive"):
        AudioConfig(speed_factors=[0.0, 1.0])
    assert data.val_dataloader().dataset.speed_factors is None  # evaluation hears the audio as recorded


def test_duration_batches_go_through_the_seeded_make_loader():
    """The speech loaders are built by the core's make_loader: starting an epoch leaves the global RNG alone (the
    training base reseeds it per epoch), and a batch sampler beside a batch size is refused."""
    import torch

    from polyformer.data import make_loader

    durations = [1.0, 2.0, 3.0, 4.0]
    sampler = LengthBatchSampler(durations, 5.0, num_buckets=2, seed=0)
    loader = make_loader(list(range(4)), batch_sampler=sampler)
    state = torch.get_rng_state()
    batches = [batch.tolist() for batch in loader]
    assert torch.equal(state, torch.get_rng_state())
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="a batch_sampler draws the batches itself"):
        make_loader(list(range(4)), batch_size=2, batch_sampler=sampler)
