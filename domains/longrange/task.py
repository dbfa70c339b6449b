"""Long Range Arena tasks: sequence classification, and self-pretraining on the task's own training inputs.

Self-pretraining (Amos, Berant & Gupta 2024, "Never Train from Scratch", https://arxiv.org/abs/2310.02980): the
classifier's embedding and mixer learn to restore masked tokens of the training sequences (BERT-style: a learned mask
token in place of the hidden tokens' embeddings, a linear layer predicts every token, cross-entropy on the masked
real tokens — the core's `MaskedPretrainingTask`), no labels and no data beyond the task's; the classifier then
fine-tunes from that checkpoint through `init_from` (the model is the same `SequenceClassifier` under the same names,
its head left out). The same recipe serves the transformer, the LSTM and S4D.

    model:
      class_path: polyformer.domains.longrange.LongRangeTask
      init_args: {model: {vocab_size: 258, num_classes: 2, mixer: transformer, transformer: {attention: local}}}
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from polyformer.deploy import Exportable
from polyformer.domains.longrange.model import S4DBlock, SequenceClassifier, SequenceClassifierConfig
from polyformer.finetune import FinetuneConfig
from polyformer.masking import MaskingConfig
from polyformer.pretraining import MaskedModelingConfig, MaskedPretrainingTask
from polyformer.training import OptimizerConfig, PolyformerTask

Batch = dict[str, Tensor]  # tokens (b n), padding (b n), labels (b,)


class TokenMeter(L.Callback):
    """Logs train/tokens_per_s (real tokens, padding left out, over the training steps' own time: validation and
    start-up excluded), train/peak_mb (the process's peak resident memory on CPU, peak allocated on a GPU) and
    train/params (the task's parameters, decoder included when pre-training)."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.started = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seconds += time.perf_counter() - self.started
        self.tokens += int((~batch["padding"]).sum())
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:  # ru_maxrss: kilobytes on Linux, bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        pl_module.log("train/tokens_per_s", self.tokens / max(self.seconds, 1e-9), on_step=True, on_epoch=False)
        pl_module.log("train/peak_mb", float(peak), on_step=True, on_epoch=False)
        pl_module.log("train/params", float(sum(p.numel() for p in pl_module.parameters())), on_step=True,
                      on_epoch=False)


def check_data(task: PolyformerTask, config: SequenceClassifierConfig) -> None:
    """The data module's vocabulary and classes (and length, for learned positions) must be the model's."""
    data = task.datamodule
    if data is None or not hasattr(data, "vocab_size"):
        return
    for name in ("vocab_size", "num_classes"):
        if getattr(data, name) != getattr(config, name):
            raise ValueError(f"the data ({type(data).__name__}) has {name}={getattr(data, name)} but model.{name}="
                             f"{getattr(config, name)}; set model.{name}: {getattr(data, name)}")
    t = config.transformer
    if config.mixer == "transformer" and t.position == "learned" and data.max_len > t.max_len:
        raise ValueError(f"data.max_len={data.max_len} is longer than model.transformer.max_len={t.max_len}, the "
                         f"learned position table")


class LongRangeTask(PolyformerTask):
    """Cross-entropy classification of whole sequences; logs {stage}/acc."""

    architecture_fields = ("model.mixer", "model.vocab_size")
    block_types = (S4DBlock,)  # FSDP units and activation checkpointing beside the core's TransformerBlock

    def __init__(self, model: SequenceClassifierConfig | None = None, optimizer: OptimizerConfig | None = None,
                 init_from: str | None = None, finetune: FinetuneConfig | None = None):
        super().__init__(optimizer, init_from=init_from, finetune=finetune)
        self.model_config = model if model is not None else SequenceClassifierConfig()
        self.model = SequenceClassifier(self.model_config)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_data(self, self.model_config)

    def forward(self, tokens: Tensor, padding: Tensor | None = None) -> Tensor:
        return self.model(tokens, padding)

    def step(self, batch: Batch, stage: str) -> Tensor:
        logits = self.model(batch["tokens"], batch["padding"])
        loss = F.cross_entropy(logits, batch["labels"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log(f"{stage}/acc", accuracy, prog_bar=stage != "train", on_epoch=True, sync_dist=True,
                 batch_size=len(batch["labels"]))
        return loss

    def batch_size(self, batch: Batch) -> int:
        return len(batch["labels"])

    def exportable(self) -> Exportable:
        c = self.model_config
        return Exportable(self.model, ["tokens", "padding"], ["logits"],
                          lambda batch, n: (torch.randint(2, c.vocab_size, (batch, n)),
                                            torch.zeros(batch, n, dtype=torch.bool)),
                          lengths=(16, 64, 256), dynamic_axes={"tokens": {0: "batch", 1: "tokens"},
                                                                "padding": {0: "batch", 1: "tokens"}},
                          description=f"tokens (batch, n) int64, padding (batch, n) bool → logits (batch, "
                                      f"{c.num_classes})")


def masked_denoising() -> MaskedModelingConfig:
    """BERT's masked-token prediction: 15 % of the tokens, mask tokens in place, a linear head, cross-entropy."""
    return MaskedModelingConfig(masking=MaskingConfig(ratio=0.15), visible_only=False, decoder=None,
                                loss="cross_entropy")


class LongRangePretrainTask(MaskedPretrainingTask):
    """Masked-token denoising of the task's training sequences (labels unused); `self.model` is the classifier
    that `LongRangeTask` fine-tunes (its head untrained here: leave it out with `finetune.exclude: [model.head.]`)."""

    block_types = (S4DBlock,)

    def __init__(self, model: SequenceClassifierConfig | None = None, pretraining: MaskedModelingConfig | None = None,
                 optimizer: OptimizerConfig | None = None):
        super().__init__(pretraining if pretraining is not None else masked_denoising(), optimizer)
        self.model_config = model if model is not None else SequenceClassifierConfig()
        if self.pretraining.loss != "cross_entropy" or self.pretraining.visible_only:
            raise ValueError(f"tokens are symbols restored in place: expected pretraining.loss=cross_entropy and "
                             f"visible_only=false, found {self.pretraining.loss!r} and {self.pretraining.visible_only}")
        if self.model_config.pooling == "cls":
            raise ValueError("self-pretraining predicts every token and has no class token: expected model.pooling="
                             "'mean' (fine-tune with the same config)")
        self.model = SequenceClassifier(self.model_config)
        self.build_decoder(self.model_config.width, self.model_config.vocab_size,
                           self.model_config.transformer.max_len)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_data(self, self.model_config)

    def tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return self.model.embed(batch["tokens"]), batch["tokens"]

    def padding(self, batch: Batch) -> Tensor:
        return batch["padding"]

    def encode(self, tokens: Tensor, keep: Tensor | None, padding: Tensor | None) -> Tensor:
        return self.model.encode(tokens, padding)

    def batch_size(self, batch: Batch) -> int:
        return len(batch["labels"])
