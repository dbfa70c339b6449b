"""Checkpoint files, at the bottom of the core (torch alone, no Lightning): every other module reads and writes them
through these functions.

- Reading: `load_checkpoint` (torch.load with weights_only=True, a truncated, corrupted or code-carrying file refused
  in one line), `read_pretrained` (the tensors and hyper-parameters of any checkpoint, state dict or .safetensors).
- Checking: `load_weights` loads a state dict and names the missing and unexpected keys and the shapes that differ.
- Writing: `write_atomically` (a temporary file, fsync, rename: a killed process leaves the old file whole),
  `replace_folder` (the same for a sharded checkpoint's folder, by renames; `recover_folder` after a kill between
  them), `save_weights` (a weights-only copy of
  a Lightning checkpoint, a sharded one included: `polyformer consolidate`).
- Sharded checkpoints (a sharded run's folder of `torch.distributed.checkpoint` shards and Lightning's `meta.pt`):
  `is_sharded`, `sharded_ranks` (how many ranks wrote it; a missing shard refused naming it), `load_sharded`.
- Classes and configs: `task_class` (the task class a checkpoint records), `import_class`, `to_plain` /
  `from_plain`, the round trip of dataclass configs through the plain data a weights-only checkpoint may hold, and
  `rename_hparams` (hyper-parameters of older releases read under their new names) and `renamed_arguments` (their
  arguments, read with a deprecation message).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import os
import pickle
import re
import shutil
import warnings
import typing
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

CLASS_PATH = "_class_path"  # the hyper-parameter where LightningCLI records the task class ("package.module.Class")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


# ---- writing ----------------------------------------------------------------------------------------------------
def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Calls write(file) on `.<name>.tmp` beside `path`, fsyncs it, then renames it to `path` (atomic on POSIX).

    A process killed inside `write` leaves `path` as it was and a stale `.<name>.tmp`, which the next write of `path`
    overwrites."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def replace_folder(new: str | Path, path: str | Path) -> None:
    """Puts the finished folder `new` (e.g. a sharded checkpoint written beside `path`) in the place of `path`: the
    old folder is renamed to `.<name>.old`, `new` renamed to `path`, then the old one deleted. Each step is a rename,
    so a process killed in between leaves a whole checkpoint (`path`, or `.<name>.old` between the two renames,
    which `recover_folder` puts back), never a mix of old and new shards; a stale `.old` is cleared by the next
    replacement."""
    new, path = Path(new), Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if path.is_dir():
        path.rename(old)
    elif path.exists():
        path.unlink()
    new.rename(path)
    if old.exists():
        shutil.rmtree(old)


def recover_folder(path: str | Path) -> bool:
    """Puts back the checkpoint folder a replacement killed between its two renames left as `.<name>.old` (where
    `path` is missing); True when it did. Safe when several ranks try at once."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if path.exists() or not old.is_dir():
        return False
    try:
        old.rename(path)
    except FileNotFoundError:  # another rank put it back first
        return False
    warnings.warn(f"{path}: put back from {old.name}, left by a checkpoint replacement that was killed between its "
                  f"two renames")
    return True


def save_weights(checkpoint: str | Path, out: str | Path) -> str:
    """A weights-only copy of a Lightning checkpoint at `out`: its hyper-parameters and fp32 state dict, no optimizer
    or loop state (what `polyformer test --ckpt_path` and `init_from` need). A sharded checkpoint's folder is read
    whole first (`polyformer consolidate`). Returns the file's sha256."""
    source = load_sharded(checkpoint) if is_sharded(checkpoint) else load_checkpoint(checkpoint)
    if "state_dict" not in source:
        raise CheckpointError(f"{checkpoint}: expected a Lightning checkpoint with a 'state_dict', found keys "
                              f"{sorted(source)[:8]}")
    weights = {key: source[key] for key in ("hyper_parameters", "pytorch-lightning_version") if key in source}
    weights["state_dict"] = {name: value.float() if value.is_floating_point() else value
                             for name, value in source["state_dict"].items()}
    write_atomically(out, lambda file: torch.save(weights, file))
    return hashlib.sha256(Path(out).read_bytes()).hexdigest()


# ---- sharded checkpoints ----------------------------------------------------------------------------------------
SHARD_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # torch.distributed.checkpoint's file of rank N


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a sharded checkpoint: a folder with torch.distributed.checkpoint's `.metadata`."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def sharded_ranks(path: str | Path) -> int:
    """How many ranks wrote the sharded checkpoint at `path`. A shard file its metadata names but the folder lacks
    raises a CheckpointError naming the missing files."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    files = {item.relative_path for item in FileSystemReader(path).read_metadata().storage_data.values()}
    missing = sorted(name for name in files if not (path / name).is_file())
    if missing:
        raise CheckpointError(f"sharded checkpoint {path} lacks {', '.join(missing)} of its {len(files)} shard files "
                              f"(each rank writes its own): copy the whole folder from the run that wrote it")
    return len({match.group(1) for name in files if (match := SHARD_FILE.fullmatch(name))})


def load_sharded(path: str | Path) -> dict:
    """A sharded checkpoint read whole into one process: every tensor gathered from its shards (`state_dict`,
    `optimizer_0`, ...) and Lightning's `meta.pt` (hyper-parameters, loop state)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    sharded_ranks(path)  # every shard present
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp_to_torch_save(path, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=True)
    if (path / "meta.pt").is_file():
        checkpoint.update(load_checkpoint(path / "meta.pt"))
    return checkpoint


# ---- reading ----------------------------------------------------------------------------------------------------
def check_archive(path: str | Path) -> bool:
    """Whether `path` is a zip archive (torch.save's format since PyTorch 1.6); one that is truncated, or has an entry
    whose bytes fail their CRC-32 (a corrupted copy, which torch.load would read without complaint), raises a
    CheckpointError naming the file."""
    with open(path, "rb") as file:
        if file.read(4) != b"PK\x03\x04":
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.CRC == 0:  # written with torch's compute_crc32 off: nothing to compare
                    continue
                with archive.open(entry) as stream:  # zipfile compares the CRC-32 once an entry is read to its end
                    while stream.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: its {Path(path).stat().st_size:,} bytes "
                              f"begin a zip archive that cannot be read ({error})") from None
    return True


def torch_reason(error: BaseException) -> str:
    """The line of a torch.load error that says what is wrong, without the advice that follows it."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0].split(". ")[0] if lines else ""
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """torch.load with weights_only=True. A CheckpointError (a ValueError) naming the file refuses a checkpoint that
    is truncated or corrupted (every entry of its archive is checked against its CRC-32), one torch.load cannot read,
    and one that would unpickle arbitrary objects; a sharded checkpoint's folder is named as one, with its remedy."""
    if is_sharded(path):
        raise CheckpointError(f"{path} is a sharded checkpoint (a folder of {sharded_ranks(path)} ranks' shards): "
                              f"`polyformer consolidate {path} <file.ckpt>` writes the single weights-only file that "
                              f"test, export and init_from read")
    if check_archive(path):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:  # an intact archive whose pickle asks for more than plain weights
            raise CheckpointError(
                f"refusing to load checkpoint {path}: it holds pickled Python objects that are not plain weights, "
                f"and unpickling them could run code ({torch_reason(error)})"
            ) from None
    try:  # torch's legacy format, or not a checkpoint at all
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path} is neither a torch.save zip archive nor a readable legacy one "
                              f"({Path(path).stat().st_size:,} bytes; {torch_reason(error)})") from None


def read_pretrained(source: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, hyper-parameters) of a Lightning or weights-only checkpoint (its `state_dict` and
    `hyper_parameters`), a plain state dict (or one under `model`, as timm and DeiT releases keep it), or a
    .safetensors file; the last two carry no hyper-parameters ({})."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"init_from={str(source)!r}: expected a checkpoint file, found none there")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint)) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"init_from={str(source)!r}: expected a state dict of tensors (or a checkpoint holding one "
                         f"under 'state_dict' or 'model'), found {type(checkpoint).__name__}")
    return state, dict(checkpoint.get("hyper_parameters") or {})


# ---- checking against a model -----------------------------------------------------------------------------------
def describe_mismatch(checkpoint: Mapping[str, Tensor], model: Mapping[str, Tensor], *, strict: bool,
                      shown: int = 3) -> str:
    """Missing and unexpected keys (when strict) and tensors whose shapes differ, a few of each, on one line."""

    def some(names: list[str]) -> str:
        more = f", ... ({len(names)} in all)" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    parts = []
    if strict and (missing := [name for name in model if name not in checkpoint]):
        parts.append(f"missing keys {some(missing)}")
    if strict and (unexpected := [name for name in checkpoint if name not in model]):
        parts.append(f"unexpected keys {some(unexpected)}")
    shapes = [f"{name} (checkpoint {tuple(value.shape)} vs model {tuple(model[name].shape)})"
              for name, value in checkpoint.items() if name in model and value.shape != model[name].shape]
    if shapes:
        parts.append(f"shapes differ for {some(shapes)}")
    return "; ".join(parts)


def load_weights(module: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool, source: str) -> None:
    """module.load_state_dict(state_dict); a checkpoint of another architecture raises a CheckpointError naming
    `source`, the missing and unexpected keys and the shapes that differ."""
    try:
        module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        # compared after the attempt: load pre-hooks may have resized buffers that legitimately vary in size
        mismatch = describe_mismatch(state_dict, module.state_dict(), strict=strict) or torch_reason(error)
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: {mismatch}") from None


# ---- classes and configs ----------------------------------------------------------------------------------------
def import_class(class_path: str) -> type:
    """The class a LightningCLI config or checkpoint names by its path ("package.module.Class")."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ImportError(f"class_path {class_path!r}: expected 'package.module.Class' naming an importable class "
                          f"({type(error).__name__}: {error})") from None


def task_class(checkpoint: Mapping[str, Any], default: type | None = None, *, source: str = "checkpoint") -> type:
    """The task class LightningCLI recorded in a checkpoint's hyper-parameters, else `default`; with neither, a
    CheckpointError naming `source`."""
    class_path = str((checkpoint.get("hyper_parameters") or {}).get(CLASS_PATH) or "")
    if class_path:
        return import_class(class_path)
    if default is None:
        raise CheckpointError(f"{source} records no task class (hyper_parameters.{CLASS_PATH}, written by `polyformer "
                              f"fit`): give the config it was trained with (-c <config>, whose model.class_path names "
                              f"it)")
    return default


def rename_hparams(hparams: Mapping[str, Any], renamed: Mapping[str, str]) -> dict[str, Any]:
    """Plain hyper-parameters with names a task has renamed read under the new ones: `renamed` maps an old top-level
    name to its new dotted path ("vit" → "model", "context" → "model.context"); a value already at the new path
    stays."""
    out = dict(hparams)
    for old, new in renamed.items():
        value = out.pop(old, None)
        if value is None:
            continue
        *parents, leaf = new.split(".")
        node = out
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        if node.get(leaf) is None:
            node[leaf] = value
    return out


def renamed_arguments(owner: str, old_values: Mapping[str, Any], renamed: Mapping[str, str],
                      current: Mapping[str, Any], types: Mapping[str, Callable[..., Any]]) -> dict[str, Any]:
    """The arguments of releases up to 0.1.0, read for one more release with a deprecation message: `renamed` maps
    an old name to a whole new argument ("vit" → "model") or to a field of one ("batch_seconds" →
    "loader.batch_seconds"); old_values are the old arguments as given (None: not given); current the new arguments
    as given, each built with types[name] from its old fields when those are given. Returns the new arguments;
    giving a new argument and its old form both is refused, naming both."""
    out = dict(current)
    given = {old: value for old, value in old_values.items() if value is not None}
    if not given:
        return out
    by_target: dict[str, dict[str, tuple[str, Any]]] = {}  # new argument → field ("" for all of it) → old, value
    for old, value in given.items():
        target, _, field = renamed[old].partition(".")
        by_target.setdefault(target, {})[field] = (old, value)
    for target, parts in by_target.items():
        olds = [old for old, _ in parts.values()]
        if out.get(target) is not None:
            if "" in parts:
                raise ValueError(f"{owner}: `{olds[0]}` is the old name of `{target}`: set one, found both")
            raise ValueError(f"{owner}: {', '.join(olds)} are the old, flat form of `{target}`: set "
                             f"{'/'.join(f'{target}.{field}' for field in parts)}, found both")
        out[target] = parts[""][1] if "" in parts else types[target](**{f: v for f, (_, v) in parts.items()})
    if len(given) == 1 and renamed[next(iter(given))] in by_target:
        old = next(iter(given))
        message = f"the argument `{old}` is deprecated and will be removed: write `{renamed[old]}`"
    else:
        message = (f"the arguments {', '.join(given)} are deprecated and will be removed: write "
                   f"{', '.join(renamed[old] for old in given)}")
    warnings.warn(f"{owner}: {message}", DeprecationWarning, stacklevel=3)
    return out


def to_plain(value: Any) -> Any:
    """Dataclasses → dicts, paths → strings, recursively: what a weights-only checkpoint may hold."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item) for item in value)
    if isinstance(value, Path):
        return str(value)
    return value


def from_plain(annotation: Any, value: Any) -> Any:
    """The inverse of `to_plain` for an argument annotated `annotation`: a dict becomes the dataclass the annotation
    names (possibly inside Optional or a union), recursively; anything else is returned as it is."""
    if not isinstance(value, dict):
        return value
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate):
            fields = {f.name: f.type for f in dataclasses.fields(candidate)}
            hints = typing.get_type_hints(candidate)
            return candidate(**{key: from_plain(hints.get(key, fields[key]), item) for key, item in value.items()})
    return value
