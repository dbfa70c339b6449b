"""A LibriSpeech-layout corpus written as a stream (polyformer.streaming) reads back utterance for utterance."""

from __future__ import annotations

import pytest
import torch

from polyformer.domains.speech.data import LibriSpeechDataModule, SpeechDataset, SpeechLoaderConfig
from polyformer.streaming import StreamConfig, split_uri, write_stream


def test_a_streamed_corpus_gives_the_utterances_of_the_folders(tiny_corpus, tmp_path):
    splits = dict(root=str(tiny_corpus), train_splits=["train"], val_splits=["dev"], test_splits=["test", "heldout"],
                  loader=SpeechLoaderConfig(num_workers=0))
    folders = LibriSpeechDataModule(**splits)
    folders.setup(None)
    for split in ("train", "val", "test"):
        for folder, source in folders.stream_sources(split).items():
            write_stream(source, split_uri(str(tmp_path), folder), split=folder)
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == ["heldout", "test"]

    streamed = LibriSpeechDataModule(**splits, stream=StreamConfig(str(tmp_path), batch_size=4))
    streamed.setup(None)
    expected = SpeechDataset(folders.val_set)
    assert [streamed.val_set[i][2] for i in range(len(expected))] == [expected[i][2] for i in range(len(expected))]
    for i in range(len(expected)):
        waveform, transcript, _ = streamed.val_set[i]
        assert torch.equal(waveform, expected[i][0]) and transcript == expected[i][1]
    for memory, stream in zip(folders.test_sets, streamed.test_sets):
        assert [stream[i][2] for i in range(len(stream))] == [u.id for u in memory]
    batches = list(streamed.train_dataloader())
    assert [len(b["ids"]) for b in batches] == [4] * 6
    assert sorted(i for b in batches for i in b["ids"]) == sorted(u.id for u in folders.train_set)
    assert sorted(streamed.transcripts()) == sorted(folders.transcripts())
    assert len(list(streamed.stats_waveforms())) == len(folders.train_set)

    with pytest.raises(ValueError, match="stream.batch_size: expected the utterances per batch"):
        LibriSpeechDataModule(**splits, stream=StreamConfig(str(tmp_path)))
