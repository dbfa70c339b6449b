"""Conformer-CTC speech recognition as a PolyformerTask: CTC loss, greedy or beam decoding, CER and WER.

Before the first training step the task fits the feature normaliser on training audio and, for unigram tokens,
trains the SentencePiece model on the training transcripts; both are buffers of the model, saved in checkpoints.
Metrics: {stage}/cer and {stage}/wer (torchmetrics) over the whole split, where stage is val, test when one split is
tested, or test/<split> for each of several test splits (test/test-clean/cer, test/heldout/wer, ...: each test
loader's figures once, under the split they were measured on); {stage}/ctc_infeasible counts targets needing more
frames than the encoder gives (their loss is zeroed by zero_infinity, so the loss never becomes inf or NaN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.text import CharErrorRate, WordErrorRate

from polyformer.domains.speech.conformer import ConformerBlock
from polyformer.domains.speech.decoding import BeamSearchDecoder, LexiconDecoder, greedy_decode
from polyformer.domains.speech.frontend import padding_mask
from polyformer.domains.speech.model import SpeechModelConfig, SpeechRecognizer
from polyformer.domains.speech.tokens import BLANK, TokenizerConfig, make_tokenizer
from polyformer.deploy import Exportable
from polyformer.distillation import DistillConfig, TeacherHolder, soft_target_loss
from polyformer.finetune import FinetuneConfig
from polyformer.training import OptimizerConfig, PolyformerTask


def ctc_frames_needed(targets: Tensor, target_lengths: Tensor) -> Tensor:
    """Fewest frames a CTC alignment of each target needs: its length plus one blank per repeated label."""
    repeats = (targets[:, 1:] == targets[:, :-1]) & (torch.arange(1, targets.shape[1]) < target_lengths[:, None])
    return target_lengths + repeats.sum(dim=1)


def fit_normalizer(model: SpeechRecognizer, datamodule) -> None:
    """Estimates the model's feature mean and std from the data module's `stats_waveforms()`, once."""
    if not model.normalizer.fitted:
        rank_zero_info(f"estimating feature mean/std from {datamodule.audio.stats_utterances} training utterances")
        model.normalizer.fit(model.log_mel(w[None], torch.tensor([len(w)]))[0][0] for w in datamodule.stats_waveforms())


class SpeechRecognitionTask(PolyformerTask):
    """A CTC recognizer (Conformer or Transformer encoder) on waveform batches from LibriSpeechDataModule."""

    inference_fields = ("decoding", "beam_size", "lexicon", "lm", "lm_weight", "word_score")
    block_types = (ConformerBlock,)  # FSDP units and activation checkpointing (polyformer.distributed)

    def __init__(
        self,
        model: SpeechModelConfig | None = None,
        tokenizer: TokenizerConfig | None = None,
        decoding: Literal["greedy", "beam", "lexicon"] = "greedy",  # lexicon: words of `lexicon`, scored by `lm`
        beam_size: int = 20,
        lexicon: str | None = None,  # word → tokens file for decoding='lexicon' (lm.py writes one)
        lm: str | None = None,  # a word n-gram ARPA file for decoding='lexicon'; None: the lexicon alone
        lm_weight: float = 2.0,
        word_score: float = 0.0,
        optimizer: OptimizerConfig | None = None,
        init_from: str | None = None,
        finetune: FinetuneConfig | None = None,
        distill: DistillConfig | None = None,
    ):
        """distill: a teacher recognizer with the same tokens and subsampling, whose frame-level CTC posteriors
        (on the clean audio; the student's may be SpecAugmented) are soft targets over the real frames."""
        super().__init__(optimizer, init_from=init_from, finetune=finetune)
        self.distill = distill
        self.teacher = TeacherHolder(distill) if distill is not None else None
        self.model_config = model or SpeechModelConfig()
        self.tokenizer = make_tokenizer(tokenizer or TokenizerConfig())
        self.model = SpeechRecognizer(self.model_config, self.tokenizer.num_classes)
        if decoding == "lexicon" and lexicon is None:
            raise ValueError("decoding='lexicon' needs a lexicon file (lexicon: <path>), found None")
        self.decoding, self.beam_size = decoding, beam_size
        self.lexicon, self.lm, self.lm_weight, self.word_score = lexicon, lm, lm_weight, word_score
        self._beam: BeamSearchDecoder | LexiconDecoder | None = None
        self.metrics = nn.ModuleDict()  # "<stage>_cer" / "<stage>_wer" (stage "val", "test/<split>"), made on first use

    def exportable(self) -> Exportable:
        """waveforms (b s) and their sample counts (b) → CTC log-probabilities (b n v) and frame counts (b): the
        whole recognizer, log-mel front end included; batch and samples are dynamic axes."""
        rate = self.model_config.features.sample_rate

        def example(batch: int, seconds: int) -> tuple[Tensor, Tensor]:
            samples = seconds * rate
            lengths = torch.randint(samples // 2, samples + 1, (batch,))
            lengths[0] = samples  # the longest fills the batch
            return torch.randn(batch, samples) * 0.1, lengths

        return Exportable(self.model, ["waveforms", "lengths"], ["log_probs", "frames"], example, lengths=(1, 3, 7),
                          dynamic_axes={"waveforms": {0: "batch", 1: "samples"}, "lengths": {0: "batch"}},
                          description=f"waveforms (batch, samples) at {rate} Hz, lengths (batch,) → CTC "
                                      f"log-probabilities (batch, frames, {self.tokenizer.num_classes}), frames "
                                      f"(batch,); greedy decoding and the tokens stay in Python")

    # ---- preparation ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.datamodule
        if stage != "fit" or datamodule is None:
            return
        if getattr(datamodule, "audio_folders", None):
            raise ValueError(f"data.audio_folders {[str(f) for f in datamodule.audio_folders]}: audio without "
                             f"transcripts cannot train a CTC recognizer; it serves self-supervised pre-training "
                             f"(BestRQPretrainTask)")
        if not self.tokenizer.trained:
            rank_zero_info("training the SentencePiece unigram model on the training transcripts")
            self.tokenizer.train_from(datamodule.transcripts())
        fit_normalizer(self.model, datamodule)

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
        if stage == "train" and self.teacher is not None:
            teacher_log_probs, _ = self.teacher(self, batch["waveforms"], batch["lengths"])
            self.teacher.check(teacher_log_probs, log_probs, "(batch, frames, classes)")
            real = ~padding_mask(frames, log_probs.shape[1])
            soft = soft_target_loss(log_probs, teacher_log_probs, self.distill.temperature, real)
            loss = self.distill.mix(loss, soft)
        size = len(encoded)
        on_epoch = stage != "train"
        self.log(f"{stage}/ctc_infeasible", infeasible.float(), reduce_fx="sum", on_step=False, on_epoch=True,
                 sync_dist=on_epoch, batch_size=size, add_dataloader_idx=False)
        self.log(f"{stage}/audio_seconds", batch["lengths"].sum().float() / self.model_config.features.sample_rate,
                 reduce_fx="sum", on_step=False, on_epoch=True, batch_size=size, add_dataloader_idx=False)
        if stage != "train":
            hypotheses = self.transcribe_log_probs(log_probs, frames)
            for kind in ("cer", "wer"):
                metric = self._metric(stage, kind)
                metric.update(hypotheses, batch["transcripts"])
                # logged as the metric object: Lightning computes it over the whole split at the epoch's end and files
                # it under this loader alone (a value logged at the epoch's end would repeat under every test loader)
                self.log(f"{stage}/{kind}", metric, on_step=False, on_epoch=True, prog_bar=kind == "cer",
                         batch_size=size, add_dataloader_idx=False, metric_attribute=f"metrics.{stage}_{kind}")
        return loss

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        stage = self._test_stage(dataloader_idx)
        loss = self.step(batch, stage)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=self.batch_size(batch), add_dataloader_idx=False)
        return loss

    def _test_stage(self, dataloader_idx: int) -> str:
        """test alone when one split is tested; with several, test/<split> of each loader (test/test-clean,
        test/heldout, ...), test/<index> for unnamed loaders."""
        if len(self.trainer.num_test_batches) <= 1:  # one test loader (called from test_step: a trainer is there)
            return "test"
        splits = getattr(self.datamodule, "test_splits", None) or []
        return f"test/{splits[dataloader_idx] if dataloader_idx < len(splits) else dataloader_idx}"

    def _metric(self, stage: str, kind: str):
        key = f"{stage}_{kind}"
        if key not in self.metrics:
            self.metrics[key] = (CharErrorRate() if kind == "cer" else WordErrorRate()).to(self.device)
        return self.metrics[key]

    # ---- decoding ---------------------------------------------------------------------------------------------
    def transcribe_log_probs(self, log_probs: Tensor, frames: Tensor) -> list[str]:
        if self.decoding == "greedy":
            ids = greedy_decode(log_probs, frames)
        else:
            if self._beam is None:
                tokens, separator = self.tokenizer.beam_tokens()
                self._beam = BeamSearchDecoder(tokens, separator, self.beam_size) if self.decoding == "beam" else \
                    LexiconDecoder(tokens, separator, self.lexicon, self.lm, self.beam_size, self.lm_weight,
                                   self.word_score)
            if self.decoding == "lexicon":
                return self._beam(log_probs, frames)
            ids = self._beam(log_probs, frames)
        return [" ".join(self.tokenizer.decode(h).split()) for h in ids]

    @torch.no_grad()
    def transcribe(self, waveforms: Tensor, lengths: Tensor) -> list[str]:
        """Transcripts of (b s) 16 kHz waveforms with (b,) sample counts."""
        self.model.eval()
        return self.transcribe_log_probs(*self.model(waveforms.to(self.device), lengths.to(self.device)))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        """`polyformer predict`: each utterance's reference and hypothesis, printed side by side and appended to the
        run's transcripts.tsv (id, reference, hypothesis)."""
        rows = [{"id": i, "reference": r, "hypothesis": h} for i, r, h in
                zip(batch["ids"], batch["transcripts"], self.transcribe(batch["waveforms"], batch["lengths"]))]
        folder = Path(self.trainer.log_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "transcripts.tsv", "a", encoding="utf-8") as f:
            for row in rows:
                f.write(f"{row['id']}\t{row['reference']}\t{row['hypothesis']}\n")
                print(f"{row['id']}\n  reference:  {row['reference']}\n  hypothesis: {row['hypothesis']}", flush=True)
        return rows
