"""Conformer-CTC speech recognition as a PolyformerTask: CTC loss, greedy or beam decoding, CER and WER.

Before the first training step the task fits the feature normaliser on training audio and, for unigram tokens,
trains the SentencePiece model on the training transcripts; both are buffers of the model, saved in checkpoints.
Metrics: {stage}/cer and {stage}/wer (torchmetrics) for validation and for each test split, named after the split
(e.g. test/cer, heldout/cer); {stage}/ctc_infeasible counts targets needing more frames than the encoder gives
(their loss is zeroed by zero_infinity, so the loss never becomes inf or NaN).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.text import CharErrorRate, WordErrorRate

from polyformer.domains.speech.decoding import BeamSearchDecoder, greedy_decode
from polyformer.domains.speech.model import SpeechModelConfig, SpeechRecognizer
from polyformer.domains.speech.tokens import BLANK, TokenizerConfig, make_tokenizer
from polyformer.training import OptimizerConfig, PolyformerTask


def ctc_frames_needed(targets: Tensor, target_lengths: Tensor) -> Tensor:
    """Fewest frames a CTC alignment of each target needs: its length plus one blank per repeated label."""
    repeats = (targets[:, 1:] == targets[:, :-1]) & (torch.arange(1, targets.shape[1]) < target_lengths[:, None])
    return target_lengths + repeats.sum(dim=1)


class SpeechRecognitionTask(PolyformerTask):
    """A CTC recognizer (Conformer or Transformer encoder) on waveform batches from LibriSpeechDataModule."""

    def __init__(
        self,
        model: SpeechModelConfig | None = None,
        tokenizer: TokenizerConfig | None = None,
        decoding: Literal["greedy", "beam"] = "greedy",
        beam_size: int = 20,
        optimizer: OptimizerConfig | None = None,
    ):
        super().__init__(optimizer)
        self.model_config = model or SpeechModelConfig()
        self.tokenizer = make_tokenizer(tokenizer or TokenizerConfig())
        self.model = SpeechRecognizer(self.model_config, self.tokenizer.num_classes)
        self.decoding, self.beam_size = decoding, beam_size
        self._beam: BeamSearchDecoder | None = None
        self.metrics = nn.ModuleDict()  # "<stage>_cer" / "<stage>_wer", created on first use

    # ---- preparation ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage != "fit" or datamodule is None:
            return
        if not self.tokenizer.trained:
            rank_zero_info("training the SentencePiece unigram model on the training transcripts")
            self.tokenizer.train_from(datamodule.transcripts())
        if not self.model.normalizer.fitted:
            rank_zero_info(f"estimating feature mean/std from {datamodule.stats_utterances} training utterances")
            self.model.normalizer.fit(
                self.model.log_mel(w[None], torch.tensor([len(w)]))[0][0] for w in datamodule.stats_waveforms())

    def batch_size(self, batch: dict) -> int:
        return len(batch["transcripts"])

    # ---- steps ------------------------------------------------------------------------------------------------
    def step(self, batch: dict, stage: str) -> Tensor:
        log_probs, frames = self.model(batch["waveforms"], batch["lengths"])  # (b n v), (b,)
        encoded = [self.tokenizer.encode(t) for t in batch["transcripts"]]
        target_lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        targets = torch.zeros(len(encoded), max(1, int(target_lengths.max())), dtype=torch.long)
        for i, ids in enumerate(encoded):
            targets[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        infeasible = (ctc_frames_needed(targets, target_lengths) > frames.cpu()).sum()
        loss = F.ctc_loss(log_probs.transpose(0, 1).float(), targets.to(self.device), frames,
                          target_lengths.to(self.device), blank=BLANK, reduction="mean", zero_infinity=True)
        size = len(encoded)
        on_epoch = stage != "train"
        self.log(f"{stage}/ctc_infeasible", infeasible.float(), reduce_fx="sum", on_step=False, on_epoch=True,
                 sync_dist=on_epoch, batch_size=size, add_dataloader_idx=False)
        self.log(f"{stage}/audio_seconds", batch["lengths"].sum().float() / self.model_config.features.sample_rate,
                 reduce_fx="sum", on_step=False, on_epoch=True, batch_size=size, add_dataloader_idx=False)
        if stage != "train":
            hypotheses = self.transcribe_log_probs(log_probs, frames)
            self._metric(stage, "cer").update(hypotheses, batch["transcripts"])
            self._metric(stage, "wer").update(hypotheses, batch["transcripts"])
        return loss

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        stage = self._test_stage(dataloader_idx)
        loss = self.step(batch, stage)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=self.batch_size(batch), add_dataloader_idx=False)
        return loss

    def _test_stage(self, dataloader_idx: int) -> str:
        splits = getattr(getattr(self.trainer, "datamodule", None), "test_splits", None)
        if splits is None or len(splits) <= dataloader_idx:
            return "test" if dataloader_idx == 0 else f"test{dataloader_idx}"
        # the first test split logs as "test"; the others under their own names (e.g. "heldout", "test-other")
        return "test" if dataloader_idx == 0 else splits[dataloader_idx]

    def _metric(self, stage: str, kind: str):
        key = f"{stage}_{kind}"
        if key not in self.metrics:
            self.metrics[key] = (CharErrorRate() if kind == "cer" else WordErrorRate()).to(self.device)
        return self.metrics[key]

    def _log_metrics(self) -> None:
        for key, metric in self.metrics.items():
            if metric.update_called:
                stage, kind = key.rsplit("_", 1)
                self.log(f"{stage}/{kind}", metric.compute(), prog_bar=kind == "cer")
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics()

    def on_test_epoch_end(self) -> None:
        self._log_metrics()

    # ---- decoding ---------------------------------------------------------------------------------------------
    def transcribe_log_probs(self, log_probs: Tensor, frames: Tensor) -> list[str]:
        if self.decoding == "beam":
            if self._beam is None:
                tokens, separator = self.tokenizer.beam_tokens()
                self._beam = BeamSearchDecoder(tokens, separator, self.beam_size)
            ids = self._beam(log_probs, frames)
        else:
            ids = greedy_decode(log_probs, frames)
        return [" ".join(self.tokenizer.decode(h).split()) for h in ids]

    @torch.no_grad()
    def transcribe(self, waveforms: Tensor, lengths: Tensor) -> list[str]:
        """Transcripts of (b s) 16 kHz waveforms with (b,) sample counts."""
        self.model.eval()
        return self.transcribe_log_probs(*self.model(waveforms.to(self.device), lengths.to(self.device)))
