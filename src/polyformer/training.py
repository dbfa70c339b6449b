"""The Lightning base every domain task derives from: optimiser, schedule, logging, seeding and safe checkpoints.

A domain task implements `step(batch, stage) -> loss` (logging its own metrics under f"{stage}/...") and builds its
model in `__init__`; everything else is here.
"""

from __future__ import annotations

import inspect
import math
import random
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from polyformer.checkpoint import (CLASS_PATH, from_plain, load_checkpoint, load_weights, read_pretrained,
                                   rename_hparams, renamed_arguments, task_class, to_plain)
from polyformer.data import global_seed
from polyformer.deploy import Exportable
from polyformer.distributed import ShardedStrategy, ShardingConfig, checkpoint_activations, compile_blocks, shard
from polyformer.finetune import FinetuneConfig, check_architecture, layer_ids, load_matching


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up, then cosine decay (or a constant rate)."""

    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05  # applied to weight matrices only (not norms, biases, positions, special tokens)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # the cosine ends at min_lr_ratio * lr
    total_steps: int | None = None  # length of the schedule; default: the trainer's estimated stepping batches

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, found {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"optimizer.warmup_steps and weight_decay must be >= 0, found "
                             f"{self.warmup_steps} and {self.weight_decay}")
        if not all(0 <= beta < 1 for beta in self.betas) or self.eps < 0:
            raise ValueError(f"optimizer.betas must be in [0, 1) and eps >= 0, found {self.betas} and {self.eps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], found {self.min_lr_ratio}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"optimizer.total_steps must be at least 1 (or null), found {self.total_steps}")

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of lr at an optimizer step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def first_tensor(batch: Any) -> Tensor:
    """The first tensor in a (nested) batch of tensors, dicts, lists and tuples."""
    if isinstance(batch, Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, (Tensor, dict, list, tuple)):
            try:
                return first_tensor(value)
            except ValueError:
                continue
    raise ValueError(f"no tensor found in a batch of type {type(batch).__name__}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block (rollouts, figures), its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class PolyformerTask(L.LightningModule):
    """Base LightningModule: subclasses build their model and implement `step(batch, stage) -> loss`."""

    flops_per_batch: float | None = None  # measured on the first GPU step by `Throughput` (for MFU)

    def __init__(self, optimizer: OptimizerConfig | None = None, *, init_from: str | None = None,
                 finetune: FinetuneConfig | None = None):
        """init_from: a checkpoint whose tensors initialise the task's by name when fitting starts (see finetune.py);
        finetune: how those weights train on (freezing, linear probe, layer-wise lr decay)."""
        super().__init__()
        self.optimizer_config = optimizer if optimizer is not None else OptimizerConfig()
        self.init_from = init_from
        self.finetune = finetune if finetune is not None else FinetuneConfig()
        self._loaded: list[str] = []  # parameter names set by init_from (the ones freezing acts on)
        self._frozen = False
        self._initialised = False
        # collects the init arguments of the whole subclass chain; stored as plain data in checkpoints
        self.save_hyperparameters()

    # hyper-parameters renamed since releases up to 0.1.0, old name → new dotted path (vision's "vit" → "model", RL's
    # "context" → "model.context"): the task still takes the old arguments (model_argument), and a checkpoint's old
    # names are read as the new ones (checkpoint.rename_hparams: init_from, `polyformer test --ckpt_path`)
    renamed_hparams: dict[str, str] = {}

    def model_argument(self, model: Any, config_type: Callable[..., Any], **old_values: Any) -> Any:
        """The task's `model` config, or the one its arguments of releases up to 0.1.0 give, read for one more release
        with a deprecation message: the whole config under an old name (`renamed_hparams` maps it to "model") or its
        fields given flat (mapped to "model.<field>", built with config_type); config_type() when none is given. The
        hyper-parameters then record it as `model`."""
        if all(value is None for value in old_values.values()):
            return model if model is not None else config_type()
        model = renamed_arguments(f"{type(self).__name__}", old_values, self.renamed_hparams, {"model": model},
                                  {"model": config_type})["model"]
        for old in old_values:
            self.hparams.pop(old, None)
        self.hparams["model"] = model
        return model

    # ---- what a domain implements -------------------------------------------------------------------------------
    def step(self, batch: Any, stage: str) -> Tensor:
        """Loss of one batch; log stage metrics with self.log(f"{stage}/name", ...)."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage)")

    @property
    def datamodule(self) -> L.LightningDataModule | None:
        """The data module of the trainer this task is attached to; None outside a trainer or without one."""
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def batch_size(self, batch: Any) -> int:
        """Samples in a batch, for logging and throughput; override when the first tensor is not batch-major."""
        return first_tensor(batch).shape[0]

    # ---- pre-trained weights -----------------------------------------------------------------------------------
    architecture_fields: tuple[str, ...] = ()  # hyper-parameters (e.g. "model.dim") a pre-trained encoder must share
    # hyper-parameters that say how to use a trained model (decoding, drawing), not what was trained: in `polyformer
    # test / predict --ckpt_path`, the config and command line set them, not the checkpoint
    inference_fields: tuple[str, ...] = ()

    def pretrained(self, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, hyper-parameters) that `init_from` names, under this task's names or a bare model's; domains
        extend the sources (e.g. `timm:<name>`) or adapt tensors (resampled positions) here."""
        return read_pretrained(source)

    def load_pretrained(self, source: str) -> None:
        """Initialises the task from `source` by name, prints what was loaded, missing and unexpected."""
        state, hyper_parameters = self.pretrained(source)
        hyper_parameters = rename_hparams(hyper_parameters, self.renamed_hparams)
        check_architecture(hyper_parameters, dict(self.hparams), self.architecture_fields, source)
        report = load_matching(self, state, source=source, exclude=self.finetune.exclude)
        parameters = dict(self.named_parameters())
        self._loaded = [name for name in report.loaded if name in parameters]
        rank_zero_info(report.summary(source))
        freezing = self.finetune.linear_probe or self.finetune.freeze_steps > 0
        if freezing and len(self._loaded) == sum(p.requires_grad for p in parameters.values()):
            raise ValueError(f"finetune: init_from {source} set every trainable parameter, so freezing the loaded ones "
                             f"(freeze_steps={self.finetune.freeze_steps}, linear_probe={self.finetune.linear_probe})"
                             f" leaves nothing to train; leave a head out (finetune.exclude) or do not freeze")

    # ---- sharding (polyformer.distributed) -----------------------------------------------------------------------
    block_types: tuple[type[nn.Module], ...] = ()  # a domain's repeated blocks beside the core's TransformerBlock
    sharding = ShardingConfig()  # `polyformer --sharding.*` sets it on the task it builds
    compiling = False  # `polyformer --compile true`: torch.compile of each block

    def configure_model(self) -> None:
        """Activation checkpointing and compilation of the blocks when asked, and under `--trainer.strategy=fsdp`
        FSDP2 of them."""
        if getattr(self, "_configured", False):  # fit, then test in the same process: once
            return
        self._configured = True
        if self.sharding.activation_checkpointing:
            checkpoint_activations(self, self.block_types)
        if self.compiling:
            compile_blocks(self, self.block_types)
        if isinstance(self.trainer.strategy, ShardedStrategy):
            shard(self, self.device_mesh["data_parallel"], self.sharding, self.block_types)

    def setup(self, stage: str) -> None:
        # initial weights when fitting only (a resumed run restores its checkpoint after setup, over these), so that
        # evaluating or loading a finished checkpoint (load_from_checkpoint) reads nothing else
        if stage == "fit" and self.init_from and not self._initialised:
            self.load_pretrained(self.init_from)
        self._initialised = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        frozen = bool(self._loaded) and (self.finetune.linear_probe or self.global_step < self.finetune.freeze_steps)
        if frozen != self._frozen:
            parameters = dict(self.named_parameters())
            for name in self._loaded:
                parameters[name].requires_grad_(not frozen)
            self._frozen = frozen

    def exportable(self) -> Exportable:
        """The inference model as export sees it (polyformer/deploy.py, `polyformer export`)."""
        raise NotImplementedError(f"{type(self).__name__} defines no exportable inference model (exportable())")

    # ---- Lightning hooks ----------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.step(batch, "train")
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_size(batch))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.step(batch, "val")
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=self.batch_size(batch))
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.step(batch, "test")
        self.log("test/loss", loss, sync_dist=True, batch_size=self.batch_size(batch))
        return loss

    def on_train_epoch_start(self) -> None:
        # every RNG restarts from (seed, epoch, rank): a run resumed at an epoch boundary draws the same dropout
        # masks and augmentations as one that never stopped
        seed = (global_seed() * 1_000_003 + self.current_epoch * 1_009 + self.global_rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def on_train_start(self) -> None:
        # A fit resumed mid-epoch goes on from the training loader's saved position (make_loader's loaders keep it
        # in the checkpoint). Lightning applies it when it first sets up the loader, but configure_optimizers' call
        # to estimated_stepping_batches sets it up before the checkpoint's loop state is restored: apply it here, to
        # the epoch's order, and start the loader's iterator again from there (at an epoch's end the next epoch
        # starts afresh: nothing to apply)
        loop = self.trainer.fit_loop
        states, loop._combined_loader_states_to_load = loop._combined_loader_states_to_load, []
        if states and loop._combined_loader is not None and loop.restarted_mid_epoch:
            for loader in loop._combined_loader.flattened:
                _set_sampler_epoch(loader, loop.epoch_progress.current.processed)
            loop._combined_loader._load_state_dicts(states)
            iter(loop._data_fetcher)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = to_plain(dict(checkpoint[key]))

    # ---- optimisation -------------------------------------------------------------------------------------------
    def no_weight_decay_names(self) -> set[str]:
        """Parameter names excluded from weight decay via any submodule's `no_weight_decay()` (timm's convention)."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
        return names

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay or not, and with finetune.layer_decay one pair per layer, each with its lr."""
        excluded = self.no_weight_decay_names()
        named = [(name, param) for name, param in self.named_parameters() if param.requires_grad]
        decay_rate = self.finetune.layer_decay
        layer, depth = layer_ids([name for name, _ in named]) if decay_rate is not None else ({}, 0)
        groups: dict[tuple[bool, int], dict[str, Any]] = {}
        for name, param in named:
            decays = param.ndim >= 2 and name not in excluded
            lr_scale = decay_rate ** (depth + 1 - layer[name]) if decay_rate is not None else 1.0
            group = groups.setdefault((decays, layer.get(name, 0)), {
                "params": [], "weight_decay": self.optimizer_config.weight_decay if decays else 0.0,
                "lr": self.optimizer_config.lr * lr_scale})
            group["params"].append(param)
        # per layer (stem first), the decayed group before the other
        return [groups[key] for key in sorted(groups, key=lambda key: (key[1], not key[0]))]

    def configure_optimizers(self):
        cfg = self.optimizer_config
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                      fused=self.device.type == "cuda")
        total = cfg.total_steps or int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = "cpu", strict: bool = True,
                             **overrides: Any):
        """Rebuilds the task from a checkpoint's hyper-parameters and weights, loading with weights_only=True."""
        return cls.from_checkpoint(load_checkpoint(checkpoint_path, map_location), f"checkpoint {checkpoint_path}",
                                   map_location, strict, **overrides)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, source: str, map_location: Any = "cpu", strict: bool = True,
                        **overrides: Any):
        """The task of a checkpoint already read (`source` names it in errors)."""
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        hparams.pop(CLASS_PATH, None)
        hints = typing.get_type_hints(cls.__init__)
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {key: from_plain(hints.get(key), value) for key, value in hparams.items() if key in accepted}
        kwargs.update(overrides)
        task = cls(**kwargs)
        load_weights(task, checkpoint["state_dict"], strict=strict, source=source)
        return task.to(map_location) if map_location is not None else task


def load_task(path: str | Path, default: type[PolyformerTask] | None = None,
              map_location: Any = "cpu") -> PolyformerTask:
    """The task a checkpoint holds, of the class LightningCLI recorded in it (else `default`), reading the file
    once."""
    checkpoint = load_checkpoint(path, map_location)
    cls = task_class(checkpoint, default, source=str(path))
    return cls.from_checkpoint(checkpoint, f"checkpoint {path}", map_location)


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor (samples/s, and MFU on GPUs when the task defines `flops_per_batch`),
    counting samples with the task's own `batch_size(batch)`."""

    def __init__(self, window_size: int = 50):
        super().__init__(batch_size_fn=self._count, window_size=window_size)
        self._task: PolyformerTask | None = None
        self._flop_counter: FlopCounterMode | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._task = pl_module
        super().setup(trainer, pl_module, stage)

    def _count(self, batch: Any) -> int:
        return self._task.batch_size(batch) if hasattr(self._task, "batch_size") else first_tensor(batch).shape[0]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # MFU needs FLOPs per batch: count those of the first real step (forward, backward, optimizer) on a GPU
        if getattr(pl_module, "flops_per_batch", 0) is None and trainer.strategy.root_device.type == "cuda" \
                and self._flop_counter is None:
            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()
        super().on_train_batch_start(trainer, pl_module, *args)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._flop_counter is not None and pl_module.flops_per_batch is None:
            self._flop_counter.__exit__(None, None, None)
            pl_module.flops_per_batch = float(self._flop_counter.get_total_flops())
        super().on_train_batch_end(trainer, pl_module, *args)
