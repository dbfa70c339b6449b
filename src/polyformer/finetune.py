"""Fine-tuning pre-trained weights: `init_from` by name, layer-wise learning-rate decay, freezing and linear probes.

`PolyformerTask(init_from=..., finetune=FinetuneConfig(...))` uses these; every domain task passes both through.
- Loading matches tensors by name at the task's level (`model.blocks.0.attn.qkv.weight`), so a masked pre-training
  checkpoint (whose task keeps the same model class as `model`) loads its encoder and leaves its decoder out; a bare
  model's state dict (timm's names, no `model.` prefix) is matched under `model.`. Missing and unexpected names are
  printed. A shape that differs, or another number of blocks, is an error naming the tensors and both shapes; when the
  checkpoint holds hyper-parameters, the task's `architecture_fields` (e.g. "model.dim") are compared first and an error
  names the field and both values.
- Layer-wise decay follows timm (`param_groups_layer_decay`, from BEiT, Bao et al. 2022): the lr of layer l is
  lr · decay^(L + 1 − l) for L blocks; block i is layer i + 1, parameters that `named_parameters()` lists before the
  first block (patch embedding, special tokens, positions) layer 0, those after the last block (final norm, head)
  layer L + 1.
- Freezing acts on the loaded parameters alone: the new ones (a head) always train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from polyformer.checkpoint import describe_mismatch, to_plain

BLOCK = re.compile(r"(.*(?:^|\.)blocks\.\d+)\.")  # the "…blocks.i" module a parameter belongs to


@dataclass
class FinetuneConfig:
    """How the weights loaded by `init_from` are trained on."""

    freeze_steps: int = 0  # optimizer steps during which the loaded parameters stay frozen (the new ones train alone)
    linear_probe: bool = False  # the loaded parameters stay frozen throughout
    layer_decay: float | None = None  # lr of layer l scaled by layer_decay^(L + 1 − l); None: one lr for all (timm)
    exclude: list[str] = field(default_factory=list)  # name prefixes of checkpoint tensors not to load ("model.head.")

    def __post_init__(self) -> None:
        if self.freeze_steps < 0:
            raise ValueError(f"finetune.freeze_steps must be >= 0, found {self.freeze_steps}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"finetune.layer_decay must be in (0, 1], found {self.layer_decay}")


def field_value(hparams: dict[str, Any], path: str) -> Any:
    """hparams["model"]["dim"] for "model.dim" (dataclasses as stored: dicts); a KeyError when absent."""
    value: Any = hparams
    for key in path.split("."):
        value = value[key] if isinstance(value, dict) else getattr(value, key)
    return value


def check_architecture(theirs: dict[str, Any], ours: dict[str, Any], fields: tuple[str, ...], source: str) -> None:
    """An error naming every architecture field whose value differs between a checkpoint and this task."""
    theirs, ours = to_plain(theirs), to_plain(ours)
    differ = []
    for path in fields:
        try:
            checkpoint_value, own_value = field_value(theirs, path), field_value(ours, path)
        except (KeyError, AttributeError):
            continue  # a field the checkpoint's task does not have: the tensor names and shapes decide
        if checkpoint_value != own_value:
            differ.append(f"{path}: checkpoint {checkpoint_value!r}, this model {own_value!r}")
    if differ:
        raise ValueError(f"init_from {source}: the checkpoint's encoder does not match this model: {'; '.join(differ)}")


@dataclass
class LoadReport:
    loaded: list[str]  # names set from the checkpoint
    missing: list[str]  # names of the module the checkpoint lacks: they keep their initialisation
    unexpected: list[str]  # names of the checkpoint the module lacks: not used

    def summary(self, source: str) -> str:
        return (f"init_from {source}: loaded {len(self.loaded)} tensors; missing (kept at their initialisation): "
                f"{self.missing or 'none'}; unexpected (not used): {self.unexpected or 'none'}")


def load_matching(module: nn.Module, state: dict[str, Tensor], *, source: str,
                  exclude: list[str] | tuple[str, ...] = ()) -> LoadReport:
    """Loads the tensors of `state` whose names `module` has (see the module docstring); shapes must agree."""
    own = module.state_dict()
    state = {name: value for name, value in state.items() if not name.startswith(tuple(exclude))}
    if not state.keys() & own.keys() and {f"model.{name}" for name in state} & own.keys():
        state = {f"model.{name}": value for name, value in state.items()}  # a bare model's state dict
    if any(name in own and value.shape != own[name].shape for name, value in state.items()):
        raise ValueError(f"init_from {source}: tensors do not fit this model (another width, depth, patch size or "
                         f"head?): {describe_mismatch(state, own, strict=False)}. Leave a head out with "
                         f"finetune.exclude")
    for stack in {match.group(1).rsplit(".", 1)[0] for name in own if (match := BLOCK.match(name))}:
        theirs, mine = block_count(state, stack), block_count(own, stack)
        if theirs and theirs != mine:
            raise ValueError(f"init_from {source}: {stack} has {theirs} blocks in the checkpoint, {mine} in this "
                             f"model (depth)")
    loaded = [name for name in state if name in own]
    if not loaded:
        raise ValueError(f"init_from {source}: none of its {len(state)} tensors ({sorted(state)[:4]}...) has a name "
                         f"of this model ({sorted(own)[:4]}...)")
    module.load_state_dict({name: state[name] for name in loaded}, strict=False)
    return LoadReport(loaded, [name for name in own if name not in state], [name for name in state if name not in own])


def block_count(state: dict[str, Tensor], stack: str) -> int:
    """Blocks of a stack ("model.blocks") in a state dict: one past the highest index."""
    indices = [int(name[len(stack) + 1:].split(".")[0]) for name in state if name.startswith(stack + ".")]
    return max(indices) + 1 if indices else 0


def layer_ids(names: list[str]) -> tuple[dict[str, int], int]:
    """(layer of every parameter name, number of blocks L) for layer-wise decay, names in named_parameters() order."""
    blocks: dict[str, int] = {}
    ids: dict[str, int | None] = {}
    for name in names:
        match = BLOCK.match(name)
        if match:
            ids[name] = blocks.setdefault(match.group(1), len(blocks)) + 1
        else:
            ids[name] = 0 if not blocks else None  # after a block: the top, L + 1, known at the end
    depth = len(blocks)
    return {name: depth + 1 if layer is None else layer for name, layer in ids.items()}, depth
