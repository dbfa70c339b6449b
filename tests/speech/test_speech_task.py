"""The CTC task end to end: training on a tiny corpus, checkpoints, decoding, infeasible targets, configs."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import CharErrorRate

from polyformer.cli import PolyformerCLI
from polyformer.domains.speech import LibriSpeechDataModule, SpeechRecognitionTask
from polyformer.domains.speech.conformer import ConformerConfig
from polyformer.domains.speech.data import AudioConfig, SpeechLoaderConfig, collate
from polyformer.domains.speech.decoding import BeamSearchDecoder, greedy_decode
from polyformer.domains.speech.model import SpeechModelConfig
from polyformer.domains.speech.tokens import CharTokenizer, TokenizerConfig
from polyformer.training import OptimizerConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "speech"


def tiny_model() -> SpeechModelConfig:
    return SpeechModelConfig(subsampling_channels=8,
                             conformer=ConformerConfig(dim=32, depth=1, heads=2, kernel_size=5))


def peaky(ids_per_frame: list[int], classes: int = 29) -> torch.Tensor:
    log_probs = torch.full((len(ids_per_frame), classes), -20.0)
    log_probs[torch.arange(len(ids_per_frame)), ids_per_frame] = 0.0
    return log_probs.log_softmax(-1)[None]


def test_greedy_and_beam_decoding_merge_repeats_and_drop_blanks():
    tokenizer = CharTokenizer()
    h, i, space = tokenizer.encode("HI ")
    frames = [0, h, h, 0, i, i, space, 0, h, 0, h]  # HI H H: a blank separates the repeated H
    log_probs = peaky(frames)
    lengths = torch.tensor([len(frames)])
    assert tokenizer.decode(greedy_decode(log_probs, lengths)[0]) == "HI HH"
    assert tokenizer.decode(greedy_decode(log_probs, torch.tensor([4]))[0]) == "H"
    try:
        beam = BeamSearchDecoder(*tokenizer.beam_tokens(), beam_size=5)
    except ImportError as error:
        assert "flashlight-text" in str(error)
        return
    assert " ".join(tokenizer.decode(beam(log_probs, lengths)[0]).split()) == "HI HH"


def test_targets_longer_than_frames_give_finite_loss_and_are_counted(tmp_path):
    task = SpeechRecognitionTask(model=tiny_model())
    waves = [(torch.randn(4000) * 0.1, "A SENTENCE FAR TOO LONG FOR A QUARTER SECOND", "1-1-0"),
             (torch.randn(16000) * 0.1, "OK", "1-1-1")]
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    (metrics,) = trainer.validate(task, DataLoader(waves, batch_size=2, collate_fn=collate))
    assert metrics["val/ctc_infeasible"] == 1.0
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert metrics["val/audio_seconds"] == pytest.approx(1.25)
    # the logged CER is the character error rate of the greedy transcripts over the whole batch
    batch = collate(waves)
    with torch.no_grad():
        log_probs, frames = task.model.eval()(batch["waveforms"], batch["lengths"])
    hypotheses = task.transcribe_log_probs(log_probs, frames)
    assert hypotheses == [task.tokenizer.decode(ids) for ids in greedy_decode(log_probs, frames)]
    expected = CharErrorRate()(hypotheses, [text for _, text, _ in waves]).item()
    assert metrics["val/cer"] == pytest.approx(expected, abs=1e-6)


def test_fit_checkpoint_and_reload_with_unigram_tokens(tiny_corpus, tmp_path):
    L.seed_everything(0)
    task = SpeechRecognitionTask(model=tiny_model(), tokenizer=TokenizerConfig(kind="unigram", vocab_size=40),
                                 optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2))
    data = LibriSpeechDataModule(root=str(tiny_corpus), train_splits=["train"], val_splits=["dev"],
                                 test_splits=["test", "heldout"], audio=AudioConfig(stats_utterances=8),
                                 loader=SpeechLoaderConfig(batch_seconds=30.0, num_workers=0))
    trainer = L.Trainer(max_epochs=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"),
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(task, data)
    assert task.tokenizer.trained and task.model.normalizer.fitted
    assert task.model.normalizer.mean.abs().sum() > 0
    results = trainer.test(task, data)
    # each test loader's figures once, under the split they were measured on
    assert [sorted(result) for result in results] == [
        [f"test/{split}/{name}" for name in ("audio_seconds", "cer", "ctc_infeasible", "loss", "wer")]
        for split in ("test", "heldout")]
    data.test_splits = ["heldout"]  # one split: its figures under test/ alone
    assert [sorted(result) for result in trainer.test(task, data)] == [
        [f"test/{name}" for name in ("audio_seconds", "cer", "ctc_infeasible", "loss", "wer")]]
    data.test_splits = ["test", "heldout"]
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    assert any(row.get("val/cer") for row in rows) and any(row.get("train/loss") for row in rows)

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = SpeechRecognitionTask.load_from_checkpoint(path)
    assert torch.equal(restored.tokenizer.model_proto, task.tokenizer.model_proto)
    assert torch.equal(restored.model.normalizer.std, task.model.normalizer.std)
    text = "THE CAT SAT ON THE MAT"
    assert restored.tokenizer.decode(restored.tokenizer.encode(text)) == text
    batch = collate([data.test_dataloader()[0].dataset[i] for i in range(2)])
    assert restored.transcribe(batch["waveforms"], batch["lengths"]) == task.transcribe(batch["waveforms"],
                                                                                         batch["lengths"])


@pytest.mark.parametrize("name", ["conformer_ctc_tiny_synthetic", "conformer_ctc_demo_synthetic",
                                  "conformer_ctc_small_librispeech100", "conformer_ctc_medium_librispeech960"])
def test_configs_instantiate(name, tmp_path):
    cli = PolyformerCLI(args=["-c", str(CONFIGS / f"{name}.yaml"), "--trainer.accelerator", "cpu",
                              "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
                              "--run.root", str(tmp_path)], run=False)
    assert isinstance(cli.model, SpeechRecognitionTask) and isinstance(cli.datamodule, LibriSpeechDataModule)
    parameters = sum(p.numel() for p in cli.model.parameters())
    expected = {"conformer_ctc_tiny_synthetic": (1.5e6, 3e6), "conformer_ctc_demo_synthetic": (1.5e6, 3e6),
                "conformer_ctc_small_librispeech100": (2e7, 4e7),
                "conformer_ctc_medium_librispeech960": (2.5e7, 5e7)}[name]
    assert expected[0] < parameters < expected[1], parameters
