"""BEST-RQ: the frozen quantiser, masking with noise, a seeded pre-training that learns to predict masked targets,
audio folders without transcripts, and a CTC fine-tuning that loads the pre-trained encoder."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from polyformer.domains.speech import LibriSpeechDataModule, SpeechRecognitionTask
from polyformer.domains.speech.data import AudioConfig, SpeechLoaderConfig, collate, read_audio_folder
from polyformer.domains.speech.pretrain import STACK, BestRQConfig, BestRQPretrainTask, RandomProjectionQuantizer
from polyformer.finetune import FinetuneConfig
from polyformer.masking import MaskingConfig
from polyformer.training import OptimizerConfig
from tests.speech.test_speech_task import tiny_model


def small_bestrq() -> BestRQConfig:
    return BestRQConfig(codebook_size=16, codebook_dim=8, masking=MaskingConfig(ratio=0.4, kind="span", span=3))


def test_quantizer_is_frozen_and_deterministic():
    quantizer = RandomProjectionQuantizer(4 * 80, small_bestrq())
    assert not list(quantizer.parameters())  # buffers only: nothing trains
    x = torch.randn(2, 7, 320)
    targets = quantizer(x)
    assert targets.shape == (2, 7) and targets.max() < 16
    assert torch.equal(targets, RandomProjectionQuantizer(4 * 80, small_bestrq())(x))  # the same seed, same codes
    assert torch.equal(quantizer(x * 3.0), targets)  # cosine matching: the scale of a frame does not matter


def test_masked_spans_become_noise_and_padding_is_not_counted():
    torch.manual_seed(0)
    task = BestRQPretrainTask(model=tiny_model(), bestrq=small_bestrq())
    waves = [(torch.randn(16000) * 0.1, "", "a"), (torch.randn(8000) * 0.1, "", "b")]
    batch = collate(waves)
    features, frames, targets, counted = task.masked_features(batch)
    clean, _ = task.model.log_mel(batch["waveforms"], batch["lengths"])
    clean = task.model.normalizer(clean)
    n = targets.shape[1]
    assert counted[1, frames[1] // STACK:].sum() == 0  # the short utterance's padding is never a target
    assert counted[0].float().mean().item() == pytest.approx(0.4, abs=0.05)
    changed = (features[0, : n * STACK] != clean[0, : n * STACK]).any(-1).view(n, STACK).all(-1)
    assert torch.equal(changed, counted[0])  # exactly the masked frames were replaced


def test_bestrq_learns_and_a_ctc_fine_tuning_loads_its_encoder(tiny_corpus, tmp_path, one_torch_thread):
    L.seed_everything(0)
    data = LibriSpeechDataModule(root=str(tiny_corpus), train_splits=["train"], val_splits=["dev"],
                                 test_splits=["test"], audio=AudioConfig(stats_utterances=8),
                                 loader=SpeechLoaderConfig(batch_seconds=30.0, num_workers=0),
                                 audio_folders=[str(tiny_corpus / "LibriSpeech" / "heldout")])
    task = BestRQPretrainTask(model=tiny_model(), bestrq=small_bestrq(),
                              optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2))
    trainer = L.Trainer(max_epochs=12, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="pretrain"),
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, log_every_n_steps=1, check_val_every_n_epoch=12)
    trainer.fit(task, data)
    assert len(data.train_set) == 24 + 6  # the heldout audio joined the training audio, transcripts unused
    rows = csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv"))
    losses = [float(row["train/loss"]) for row in rows if row["train/loss"]]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])  # it learns to predict the masked frames' codes
    checkpoint = tmp_path / "bestrq.ckpt"
    trainer.save_checkpoint(checkpoint)

    ctc_data = LibriSpeechDataModule(root=str(tiny_corpus), train_splits=["train"], val_splits=["dev"],
                                     test_splits=["test"], audio=AudioConfig(stats_utterances=8),
                                     loader=SpeechLoaderConfig(batch_seconds=30.0, num_workers=0))
    fine = SpeechRecognitionTask(model=tiny_model(), init_from=str(checkpoint),
                                 finetune=FinetuneConfig(exclude=["model.head."], freeze_steps=2))
    L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0).fit(fine, ctc_data)
    pretrained = dict(task.model.encoder.named_parameters())
    for name, value in fine.model.encoder.named_parameters():  # frozen for the first steps: still the loaded ones
        assert torch.equal(value, pretrained[name]), name
    assert torch.equal(fine.model.normalizer.mean, task.model.normalizer.mean)

    with pytest.raises(ValueError, match="audio without transcripts cannot train a CTC recognizer"):
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(
            SpeechRecognitionTask(model=tiny_model()), data)


def test_audio_folders_are_checked(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    sf.write(tmp_path / "a" / "b" / "x.flac", np.zeros(1600, np.float32), 16000)
    sf.write(tmp_path / "a" / "y.flac", np.zeros(1600, np.float32), 8000)
    with pytest.raises(ValueError, match=r"y.flac: expected 16000 Hz audio, found 8000 Hz"):
        read_audio_folder(tmp_path / "a")
    kept = read_audio_folder(tmp_path / "a", skip_bad=True)
    assert [u.id for u in kept] == ["b/x"] and kept[0].transcript == "" and kept[0].duration == 0.1
    with pytest.raises(FileNotFoundError, match="expected a folder of FLAC / WAV files"):
        read_audio_folder(tmp_path / "none")
    with pytest.raises(ValueError, match="BEST-RQ masks spans"):
        BestRQConfig(masking=MaskingConfig(kind="random"))


def test_bestrq_config_instantiates(tmp_path):
    from polyformer.cli import PolyformerCLI

    config = Path(__file__).resolve().parents[2] / "configs" / "speech" / "bestrq_tiny_real.yaml"
    cli = PolyformerCLI(args=["-c", str(config), "--trainer.accelerator", "cpu", "--run.root", str(tmp_path)],
                        run=False)
    assert isinstance(cli.model, BestRQPretrainTask) and cli.model.bestrq.codebook_size == 8192
    assert [f.name for f in cli.datamodule.audio_folders] == ["librispeech-unlabelled", "train"]
