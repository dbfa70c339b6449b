"""Sharded training: what `--trainer.strategy=fsdp` means in Polyformer, on GPUs and on CPU processes alike; and the
other switches that act on a task's repeated blocks (activation checkpointing, `--compile`).

Lightning 2.6's own `fsdp` strategy (FSDP1) refuses a CPU accelerator; its `ModelParallelStrategy` builds a device
mesh on any device (NCCL on GPUs, gloo on CPU) and leaves the parallelism to the module's `configure_model`. So
`fsdp` is routed to `ShardedStrategy` — ModelParallelStrategy with every process in one data-parallel group and no
tensor parallelism — and `PolyformerTask.configure_model` shards the task with FSDP2 (`torch.distributed.fsdp.
fully_shard`, Zhao et al. 2023, https://arxiv.org/abs/2304.11277): each repeated block (the core's
`TransformerBlock`, and the blocks a domain names in its task's `block_types`) is one unit whose parameters,
gradients and optimizer state live in 1/world_size shards and are gathered for its forward and backward only; the
task's other submodules (embeddings, heads) form the last units. The same switches act on the same blocks:
activation checkpointing (recompute a block's activations in the backward pass), bf16 mixed precision, and
`--compile` (torch.compile of each block, in that order: checkpointing, compilation, sharding, as torchtitan does).

Checkpoints of a sharded run are distributed checkpoints (a folder of shards, `torch.distributed.checkpoint`);
`polyformer consolidate` turns one into the single weights-only file that `test`, `export` and `init_from` read.
"""

from __future__ import annotations

import json
import resource
import shutil
import socket
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from polyformer.checkpoint import recover_folder, replace_folder
from polyformer.transformer import TransformerBlock


@dataclass
class ShardingConfig:
    """How a task's blocks are sharded and recomputed (the `--sharding.*` options of `polyformer`)."""

    activation_checkpointing: bool = False  # recompute each block's activations in backward (any strategy)
    bf16: bool = False  # FSDP: bf16 parameters and compute, fp32 gradient reduction
    reshard_after_forward: bool = True  # FSDP: free gathered parameters after each block's forward (ZeRO-3)


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure data-parallel FSDP2: all processes of all nodes shard one model."""

    strategy_name = "polyformer_fsdp"

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = timedelta(seconds=1800)):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process in the data-parallel group
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath: str | Path, storage_options: Any = None) -> None:
        """A sharded checkpoint written atomically: every rank writes its shards into `.<name>.partial` beside the
        checkpoint's path; once all have (a barrier), rank 0 puts the folder in place by renames (replace_folder).
        A run killed while saving keeps its previous checkpoint whole (Lightning itself writes into the old folder)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        partial = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0 and partial.exists():  # left by a save that was killed
            shutil.rmtree(partial)
        self.barrier("polyformer_partial_cleared")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("polyformer_shards_written")
        if self.global_rank == 0:
            replace_folder(partial, path)
        self.barrier("polyformer_checkpoint_in_place")

    def load_checkpoint(self, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """As Lightning's, after putting back a checkpoint a killed save left as `.<name>.old` (recover_folder)."""
        recover_folder(checkpoint_path)
        self.barrier("polyformer_checkpoint_recovered")
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)


def blocks_of(module: nn.Module, block_types: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """The module's blocks of `block_types` (and the core's TransformerBlock), outermost first: a block inside
    another is not a unit of its own."""
    types = (TransformerBlock, *block_types)
    found: list[nn.Module] = []
    inner: set[int] = set()
    for child in module.modules():
        if id(child) in inner or child is module or not isinstance(child, types):
            continue
        found.append(child)
        inner |= {id(m) for m in child.modules()}
    return found


def checkpoint_activations(module: nn.Module, block_types: tuple[type[nn.Module], ...]) -> int:
    """Recomputes each block's activations in the backward pass (torch's composable `checkpoint`); returns the count."""
    from torch.distributed._composable import checkpoint

    blocks = blocks_of(module, block_types)
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def compile_blocks(module: nn.Module, block_types: tuple[type[nn.Module], ...]) -> int:
    """torch.compile of each block in place (one compiled graph per block class and shape, reused by every block of
    the class); returns the count."""
    blocks = blocks_of(module, block_types)
    for block in blocks:
        block.compile()
    return len(blocks)


def shard(module: nn.Module, mesh, config: ShardingConfig, block_types: tuple[type[nn.Module], ...] = ()) -> int:
    """FSDP2 over `mesh`: every block a unit, then each remaining top-level submodule with parameters; returns the
    number of units."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if config.bf16 \
        else MixedPrecisionPolicy()
    units = 0
    for block in blocks_of(module, block_types):
        fully_shard(block, mesh=mesh, mp_policy=precision, reshard_after_forward=config.reshard_after_forward)
        units += 1
    for child in module.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=precision, reshard_after_forward=config.reshard_after_forward)
            units += 1
    return units


def wait_for_master(address: str, port: int, node_rank: int, num_nodes: int, timeout_s: float) -> None:
    """On a node other than node 0, waits up to `timeout_s` for the master's port to accept a connection, and ends
    the run with one line saying what to check if it never does (the process group's own wait is 30 minutes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((address, port), timeout=min(5.0, max(timeout_s, 0.1))):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise SystemExit(
                    f"polyformer: --trainer.num_nodes={num_nodes}: node {node_rank} found no master at "
                    f"{address}:{port} within {timeout_s:g} s ({error.strerror or error}): start node 0 first, check "
                    f"MASTER_ADDR / MASTER_PORT (or the launcher's) and that the port is open between the machines; "
                    f"--run.master_timeout sets the wait") from None
            time.sleep(0.5)


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds of a tensor: its shard of a DTensor (FSDP2), the whole of a plain tensor."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def state_bytes(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (e.g. AdamW's two moments)."""
    parameters = list(module.parameters())
    return {"parameters": sum(local_bytes(p) for p in parameters),
            "gradients": sum(local_bytes(p.grad) for p in parameters if p.grad is not None),
            "optimizer": sum(local_bytes(v) for o in optimizers for state in o.state.values()
                             for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)}


class RankReport(L.Callback):
    """Writes <folder>/rank<R>.json as a fit ends: the rank's largest bytes of parameters, gradients and optimizer
    state over the steps (its shards under FSDP), its peak resident memory (ru_maxrss; and CUDA's peak allocation on a
    GPU) and the median seconds of its
    training steps after the first `warmup`; what `scripts/bench_scale.py` compares FSDP and DDP by."""

    def __init__(self, folder: str, warmup: int = 3):
        self.folder, self.warmup = Path(folder), warmup
        self.seconds: list[float] = []
        self.state: dict[str, int] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.seconds.append(time.perf_counter() - self.start)
        for key, value in state_bytes(pl_module, trainer.optimizers).items():
            self.state[key] = max(self.state.get(key, 0), value)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timed = self.seconds[self.warmup:] or self.seconds
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "state_bytes": self.state,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                  "step_seconds": statistics.median(timed) if timed else None, "steps": len(self.seconds)}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=1) + "\n")
