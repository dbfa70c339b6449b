"""BEST-RQ (Chiu et al. 2022, https://arxiv.org/abs/2202.01855): self-supervised pre-training of the speech encoder
by masked prediction of random-projection-quantised targets.

Targets need no network of their own. The normalised log-mel frames are stacked in fours (one encoder frame of
40 ms: the encoder's ×4 subsampling), projected by a frozen random matrix (Xavier-initialised) and matched to the
nearest of a frozen random codebook (unit vectors; the projection is l2-normalised too, so nearest is by cosine):
one codebook index per encoder frame. Spans of encoder frames (the core's span masking, 10 frames = 400 ms) are
replaced by Gaussian noise (std 0.1) in the features before the subsampling; the encoder sees every frame. A linear
layer — the recognizer's own head, `codebook_size` wide — predicts the index of every frame; cross-entropy counts the
masked real frames only.

The model is the `SpeechRecognizer` a CTC fine-tuning builds, under the same names, so `init_from` loads its
normaliser, subsampling and encoder (leave the head out: `finetune.exclude: [model.head.]`). Batches come from
`LibriSpeechDataModule`, whose `audio_folders` add audio without transcripts; transcripts in a batch are unused.

Departures from the paper: span masking hides an exact share of each utterance's frames (the paper masks each frame
with probability 0.01 as the start of a 400 ms span); one codebook, not several.

Shapes: b batch, t feature frames (10 ms), f mel bins, n = ⌊t/4⌋ stacked frames (40 ms), c codebook entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polyformer.domains.speech.conformer import ConformerBlock
from polyformer.domains.speech.frontend import padding_mask
from polyformer.domains.speech.model import SpeechModelConfig, SpeechRecognizer
from polyformer.domains.speech.task import fit_normalizer
from polyformer.masking import MaskingConfig
from polyformer.training import OptimizerConfig, PolyformerTask

STACK = 4  # feature frames per encoder frame: the ×4 subsampling


@dataclass
class BestRQConfig:
    codebook_size: int = 8192
    codebook_dim: int = 16
    masking: MaskingConfig = field(default_factory=lambda: MaskingConfig(ratio=0.4, kind="span", span=10))
    noise_std: float = 0.1  # the noise that replaces masked features

    def __post_init__(self) -> None:
        if self.codebook_size < 2 or self.codebook_dim < 1:
            raise ValueError(f"codebook_size must be >= 2 and codebook_dim >= 1, found {self.codebook_size} and "
                             f"{self.codebook_dim}")
        if self.masking.kind != "span":
            raise ValueError(f"BEST-RQ masks spans of frames: expected masking.kind='span', found "
                             f"{self.masking.kind!r}")


class RandomProjectionQuantizer(nn.Module):
    """Frozen random projection and codebook: stacked frames (b n STACK·f) → codebook indices (b n)."""

    def __init__(self, input_dim: int, config: BestRQConfig, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        bound = (6 / (input_dim + config.codebook_dim)) ** 0.5  # Xavier uniform
        self.register_buffer("projection", (torch.rand(input_dim, config.codebook_dim, generator=generator) * 2 - 1)
                             * bound)
        self.register_buffer("codebook", F.normalize(torch.randn(config.codebook_size, config.codebook_dim,
                                                                 generator=generator), dim=-1))

    @torch.no_grad()
    def forward(self, stacked: Tensor) -> Tensor:
        projected = F.normalize(stacked @ self.projection, dim=-1)  # (b n e)
        return (projected @ self.codebook.T).argmax(dim=-1)  # nearest unit vector = largest cosine


class BestRQPretrainTask(PolyformerTask):
    """A speech encoder pre-trained by BEST-RQ on audio alone."""

    block_types = (ConformerBlock,)  # FSDP units and activation checkpointing (polyformer.distributed)

    def __init__(self, model: SpeechModelConfig | None = None, bestrq: BestRQConfig | None = None,
                 optimizer: OptimizerConfig | None = None):
        super().__init__(optimizer)
        self.model_config = model or SpeechModelConfig()
        self.bestrq = bestrq or BestRQConfig()
        self.model = SpeechRecognizer(self.model_config, self.bestrq.codebook_size)
        self.quantizer = RandomProjectionQuantizer(STACK * self.model_config.features.n_mels, self.bestrq)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.datamodule
        if stage == "fit" and datamodule is not None:
            fit_normalizer(self.model, datamodule)

    def batch_size(self, batch: dict) -> int:
        return len(batch["lengths"])

    def masked_features(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(features with masked spans as noise (b t f), frame counts (b), targets (b n), masked real frames (b n))."""
        features, frames = self.model.log_mel(batch["waveforms"], batch["lengths"])
        features = self.model.normalizer(features)
        features = features.masked_fill(padding_mask(frames, features.shape[1])[..., None], 0.0)
        n = features.shape[1] // STACK
        stacked = rearrange(features[:, : n * STACK], "b (n s) f -> b n (s f)", s=STACK)
        targets = self.quantizer(stacked)
        mask = self.bestrq.masking.sample(len(frames), n, device=features.device).mask  # (b n)
        noise = torch.randn_like(features[:, : n * STACK]) * self.bestrq.noise_std
        frame_mask = mask.repeat_interleave(STACK, dim=1)[..., None]  # (b n·STACK 1)
        features = torch.cat((torch.where(frame_mask, noise, features[:, : n * STACK]), features[:, n * STACK:]), 1)
        real = ~padding_mask(torch.div(frames, STACK, rounding_mode="floor"), n)
        return features, frames, targets, mask & real

    def step(self, batch: dict, stage: str) -> Tensor:
        features, frames, targets, counted = self.masked_features(batch)
        encoded, lengths = self.model.forward_features(features, frames)  # (b n' d), n' <= n
        n = min(encoded.shape[1], targets.shape[1])
        logits = self.model.head(self.model.head_drop(encoded[:, :n]))  # (b n c)
        counted = counted[:, :n] & ~padding_mask(lengths, n)
        if not counted.any():
            raise ValueError(f"BEST-RQ: no masked real frame in this batch (frame counts {frames.tolist()}); the "
                             f"utterances are too short for spans of {self.bestrq.masking.span} encoder frames")
        loss = F.cross_entropy(logits[counted].float(), targets[:, :n][counted])
        accuracy = (logits[counted].argmax(-1) == targets[:, :n][counted]).float().mean()
        on_epoch = stage != "train"
        self.log(f"{stage}/masked_acc", accuracy, on_step=not on_epoch, on_epoch=on_epoch, sync_dist=on_epoch,
                 batch_size=self.batch_size(batch))
        return loss
