"""The `polyformer` command: LightningCLI with Polyformer's run layout, checkpoints and checks.

    polyformer fit -c configs/<domain>/<name>.yaml [--trainer.devices=2 --trainer.strategy=ddp] [--ckpt_path last]
    polyformer export -c configs/<domain>/<name>.yaml --ckpt_path <ckpt> --format onnx|pt2 --out <path>
    polyformer consolidate <sharded checkpoint folder> <file.ckpt>
    polyformer stream -c configs/<domain>/<name>.yaml --out <folder> [--splits train val test]

Every command opens a new runs/<domain>/<name>/version_N/ (metrics.csv, TensorBoard events, config.yaml,
checkpoints/ with last.ckpt); <domain>/<name> come from the (first) config file's path unless --run.domain /
--run.name say otherwise. `--ckpt_path last` names the newest last.ckpt of the run: fit resumes from it, test /
validate / predict evaluate it; either way the new version keeps its own metrics and the earlier ones stay intact
(a resumed fit's throughput clock, train/time, starts again at zero in its version). With --checkpoint.dirpath set,
`last` is the last.ckpt there.

Faults (faults.py): checkpoints are written atomically; a NaN or inf loss stops training with the checkpoints
written so far kept; a truncated, corrupted or unsafe checkpoint, or one of another architecture, ends the command
with one line naming the file and what is wrong; in a multi-process run, a rank that raises ends every rank.

Sharding (distributed.py): `--trainer.strategy=fsdp` shards the task with FSDP2 on GPUs and CPU processes alike and
writes sharded checkpoints (folders), which `--ckpt_path` resumes on the same number of ranks and `polyformer
consolidate` turns into one weights-only file.

Streaming (streaming.py): `polyformer stream` writes the splits of a config's data module as litdata chunks, one
folder per split; `--data.init_args.stream.uri=<folder or s3://...>` then trains on them through litdata's
StreamingDataset.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from polyformer.checkpoint import (CLASS_PATH, CheckpointError, import_class, is_sharded, load_checkpoint,
                                   load_weights, recover_folder, rename_hparams, save_weights, sharded_ranks)
from polyformer.deploy import ExportError, max_abs_diff
from polyformer.faults import AtomicCheckpointIO, NonFiniteError, RankFaults, StopOnNonFinite, share_rank_faults
from polyformer.distributed import ShardedStrategy, ShardingConfig, wait_for_master
from polyformer.streaming import SPLITS, StreamError, split_uri, write_stream
from polyformer.training import PolyformerTask, Throughput, load_task


def version_numbers(run_dir: Path) -> list[int]:
    """N of every version_N folder under run_dir, ascending."""
    return sorted(int(m.group(1)) for p in run_dir.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name)))


def next_version(run_dir: Path) -> int:
    """One past the newest version_N under run_dir (0 for a new run)."""
    versions = version_numbers(run_dir)
    return versions[-1] + 1 if versions else 0


def newest_version(run_dir: Path) -> Path:
    """The newest version_N folder of a run."""
    versions = version_numbers(run_dir)
    if not versions:
        raise FileNotFoundError(f"no version_N folder under {run_dir}")
    return run_dir / f"version_{versions[-1]}"


def newest_with(run_dir: Path, relative: str) -> Path | None:
    """version_N/<relative> of the newest version that holds it, e.g. checkpoints/last.ckpt (a test run's version
    has none; a sharded run's is a folder) or a task's eval.json."""
    for version in reversed(version_numbers(run_dir)):
        path = run_dir / f"version_{version}" / relative
        recover_folder(path)  # a sharded checkpoint left as .<name>.old by a killed save
        if path.is_file() or is_sharded(path):
            return path
    return None


class PolyformerCLI(LightningCLI):
    def __init__(self, args: Any = None, run: bool = True):
        super().__init__(
            model_class=PolyformerTask,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [Throughput(), StopOnNonFinite(), RankFaults()]},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="folder that holds <domain>/<name>/version_N")
        parser.add_argument("--run.domain", type=str | None, default=None, help="default: the config's folder name")
        parser.add_argument("--run.name", type=str | None, default=None, help="default: the config file's stem")
        parser.add_argument("--run.master_timeout", type=float, default=300.0,
                            help="seconds a node other than node 0 waits for the master of a multi-node run")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_class_arguments(ShardingConfig, "sharding", help="activation checkpointing and FSDP options")
        parser.add_argument("--compile", type=bool, default=False, help="torch.compile each of the model's blocks")

    def subcommand_config(self):
        """The parsed config of the running subcommand (fit, test, ...), or the whole config without one."""
        return self.config.get(self.config.get("subcommand") or "", self.config)

    @staticmethod
    def refuse_unreadable_checkpoint(ckpt_path: str | None) -> None:
        """A checkpoint that is truncated, corrupted or whose pickle could run code is refused, in one line, before
        anything else loads it. A sharded checkpoint that a killed save left as `.<name>.old` is put back first."""
        if ckpt_path:
            recover_folder(ckpt_path)
        if ckpt_path and (Path(ckpt_path).is_file() or is_sharded(ckpt_path)):
            try:
                sharded_ranks(ckpt_path) if is_sharded(ckpt_path) else load_checkpoint(ckpt_path)
            except CheckpointError as error:
                raise SystemExit(f"polyformer: --ckpt_path: {error}") from None

    def refuse_mismatched_checkpoint(self) -> None:
        """Loads --ckpt_path's weights into the model before Lightning does, so that a checkpoint of another
        architecture ends in one line naming its missing and unexpected keys and the shapes that differ."""
        ckpt_path = self.subcommand_config().get("ckpt_path")
        if ckpt_path and is_sharded(ckpt_path):
            return self.refuse_mismatched_sharding(ckpt_path)
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        checkpoint = load_checkpoint(ckpt_path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise SystemExit(f"polyformer: --ckpt_path: checkpoint {ckpt_path} holds no 'state_dict': expected a "
                             f"Lightning checkpoint (weights to start from go in --model.init_args.init_from)")
        try:
            load_weights(self.model, checkpoint["state_dict"], strict=self.model.strict_loading,
                         source=f"checkpoint {ckpt_path}")
        except CheckpointError as error:
            raise SystemExit(f"polyformer: --ckpt_path: {error}") from None

    def refuse_mismatched_sharding(self, ckpt_path: str) -> None:
        """A sharded checkpoint resumes under `--trainer.strategy=fsdp` on as many ranks as wrote it (the samples each
        rank has seen are those of that world size); anything else ends in one line saying how to go on."""
        ranks, world = sharded_ranks(ckpt_path), self.trainer.world_size
        if isinstance(self.trainer.strategy, ShardedStrategy) and ranks == world:
            return
        found = f"this run has {world} rank(s)" + ("" if isinstance(self.trainer.strategy, ShardedStrategy)
                                                    else f" under strategy {type(self.trainer.strategy).__name__}")
        raise SystemExit(f"polyformer: --ckpt_path: {ckpt_path} is a sharded checkpoint written by {ranks} ranks, "
                         f"{found}: resume with --trainer.strategy=fsdp on {ranks} ranks, or `polyformer consolidate "
                         f"{ckpt_path} <file.ckpt>` and start from its weights (--model.init_args.init_from)")

    def before_run(self) -> None:
        """Checks before the subcommand runs (and, in a multi-process run, before the other ranks start)."""
        self.model.sharding = self._get(self.config_init, "sharding")
        self.model.compiling = self.subcommand_config()["compile"]
        self.refuse_mismatched_checkpoint()
        trainer = self.trainer
        if trainer.num_nodes > 1 and trainer.node_rank > 0:  # not a 30-minute hang when node 0 is not there
            environment = trainer.strategy.cluster_environment
            wait_for_master(environment.main_address, environment.main_port, trainer.node_rank, trainer.num_nodes,
                            self.subcommand_config()["run"]["master_timeout"])
        share_rank_faults(trainer)  # before fit, test, ... start the other ranks

    # LightningCLI calls before_<subcommand> between building the classes and running the subcommand
    before_fit = before_validate = before_test = before_predict = before_run

    def parse_arguments(self, parser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads hyper-parameters from an explicit --ckpt_path next: check the file first
        self.refuse_unreadable_checkpoint(self.subcommand_config().get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        """As LightningCLI: an explicit --ckpt_path's hyper-parameters are laid over the config and the command line.
        Besides: names the task has renamed since (its `renamed_hparams`) are read under the new ones, and the config's
        own old names cleared (the checkpoint's values stand either way), so that old checkpoints and new configs mix;
        and the task's `inference_fields` keep the values the config and command line gave."""
        config = self.subcommand_config()
        model = config.get("model")
        init_args = model.get("init_args") if model is not None and model.get("class_path") else None
        fields = import_class(model["class_path"]).inference_fields if init_args is not None else ()
        given = {name: init_args.get(name) for name in fields if name in init_args}
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            hparams = dict(load_checkpoint(ckpt_path).get("hyper_parameters") or {})
            hparams.pop("_instantiator", None)
            class_path = hparams.pop(CLASS_PATH, None)
            task = import_class(class_path or model["class_path"]) if (class_path or init_args is not None) else None
            renamed = getattr(task, "renamed_hparams", {})
            hparams = rename_hparams(hparams, renamed)
            if init_args is not None:
                for old in renamed:
                    if old in init_args:
                        init_args[old] = None
            if hparams:
                parsed = {"class_path": class_path, "dict_kwargs": hparams} if class_path else hparams
                try:
                    self.config = self.parser.parse_object({self.config.subcommand: {"model": parsed}}, self.config)
                except SystemExit:
                    sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
                    raise
        init_args = self.subcommand_config()["model"].get("init_args") if given else None
        for name, value in given.items():
            init_args[name] = value

    def before_instantiate_classes(self) -> None:
        # resolved only now, after LightningCLI's reading of hyper-parameters from an explicit path: with `last`
        # the config and the command line keep the say, as they did when Lightning resolved `last` itself
        config = self.subcommand_config()
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = self.resolve_last(config)
            self.refuse_unreadable_checkpoint(config["ckpt_path"])

    @staticmethod
    def run_folder(config) -> tuple[Path, str]:
        """(runs root / domain, name) of a parsed subcommand config."""
        run = config["run"]
        files = [Path(str(p)) for p in (config.get("config") or [])]
        domain = run["domain"] or (files[0].parent.name if files else "default")
        name = run["name"] or (files[0].stem if files else "run")
        return Path(run["root"]) / domain, name

    def resolve_last(self, config) -> str | None:
        """--ckpt_path last → last.ckpt in --checkpoint.dirpath when set, else the run's newest
        version_N/checkpoints/last.ckpt; a fit with none starts afresh, an evaluation fails."""
        dirpath = (config.get("checkpoint") or {}).get("dirpath")
        if dirpath:
            where, path = Path(dirpath), Path(dirpath) / "last.ckpt"
            recover_folder(path)
            path = path if path.is_file() or is_sharded(path) else None
        else:
            root, name = self.run_folder(config)
            where, path = root / name, newest_with(root / name, "checkpoints/last.ckpt")
        if path is not None:
            return str(path)
        if self.config.get("subcommand") == "fit":
            rank_zero_warn(f"--ckpt_path last: no last.ckpt under {where}; starting a new run")
            return None
        raise SystemExit(f"polyformer: --ckpt_path last: expected a last.ckpt under {where}, found none")

    def run_location(self) -> tuple[Path, str, int]:
        root, name = self.run_folder(self.subcommand_config())
        return root, name, next_version(root / name)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("strategy") == "fsdp":  # Lightning's own refuses CPU: FSDP2 on any device instead
            kwargs["strategy"] = ShardedStrategy()
        if trainer_config.get("logger") in (None, True):
            root, name, version = self.run_location()
            kwargs["logger"] = [CSVLogger(root, name=name, version=version)]
            try:
                kwargs["logger"].append(TensorBoardLogger(root, name=name, version=version, default_hp_metric=False))
            except ModuleNotFoundError:  # TensorBoard is optional: CSV metrics are always written
                pass
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, made atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def task_from(configs: Sequence[str], ckpt_path: str) -> PolyformerTask:
    """The task stored in a checkpoint, its class from the last config's model.class_path (else the one
    LightningCLI recorded in the checkpoint)."""
    class_path = None
    for config in configs:
        with open(config) as file:
            model = (yaml.safe_load(file) or {}).get("model") or {}
        class_path = model.get("class_path", class_path) if isinstance(model, dict) else class_path
    return (import_class(class_path).load_from_checkpoint(ckpt_path) if class_path else load_task(ckpt_path)).eval()


def datamodule_from(data: dict[str, Any]) -> L.LightningDataModule:
    """The data module a config's `data` section ({class_path, init_args}) describes, built as LightningCLI builds
    it: nested dataclass arguments (a data module's `loader`, `audio`, `spec`) typed, not left as dicts."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    config = parser.parse_object({"data": data})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # the latter before 4.49
    return instantiate(config).data


def export_command(argv: Sequence[str]) -> None:
    """polyformer export -c <config> --ckpt_path <ckpt> --format onnx|pt2 --out <path> [--no-check]"""
    parser = argparse.ArgumentParser(prog="polyformer export", description=(
        "Export a trained task's inference model (the ViT classifier, the CTC recognizer, a forecaster, the DT's "
        "acting step) to ONNX or torch.export (.pt2), then check it against eager PyTorch on inputs of three shapes."))
    parser.add_argument("-c", "--config", action="append", default=[], help="the training config (model.class_path)")
    parser.add_argument("--ckpt_path", required=True, help="Lightning or weights-only checkpoint")
    parser.add_argument("--format", choices=("onnx", "pt2"), default="onnx")
    parser.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the comparison with eager")
    args = parser.parse_args(list(argv))
    try:
        task = task_from(args.config, args.ckpt_path)
        exportable = task.exportable()
        print(f"polyformer export: {type(task).__name__} → {args.out} ({args.format}): {exportable.description}")
        exported = exportable.export(args.out, args.format)
    except (CheckpointError, ExportError, ImportError, NotImplementedError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"polyformer export: {error}") from None
    if args.check:
        torch.manual_seed(0)
        inputs = exportable.check_inputs()
        diff = max_abs_diff(exportable.module, exported, inputs)
        shapes = "; ".join(", ".join(str(tuple(t.shape)) for t in example[:2]) for example in inputs)
        print(f"polyformer export: max |eager − exported| = {diff:.3g} over three input shapes ({shapes})")


def consolidate_command(argv: Sequence[str]) -> None:
    """polyformer consolidate <sharded checkpoint folder> <file.ckpt>"""
    parser = argparse.ArgumentParser(prog="polyformer consolidate", description=(
        "Gather a sharded run's checkpoint (a folder of every rank's shards) into the single weights-only file that "
        "polyformer test, export and init_from read (hyper-parameters and fp32 weights, no optimizer state)."))
    parser.add_argument("checkpoint", help="the sharded checkpoint folder, e.g. version_0/checkpoints/last.ckpt")
    parser.add_argument("out", help="the weights-only file to write")
    args = parser.parse_args(list(argv))
    if not is_sharded(args.checkpoint):
        raise SystemExit(f"polyformer consolidate: {args.checkpoint}: expected a sharded checkpoint folder (with "
                         f"torch.distributed.checkpoint's .metadata), found "
                         f"{'a file' if Path(args.checkpoint).is_file() else 'no such folder'}")
    try:
        ranks = sharded_ranks(args.checkpoint)
        sha256 = save_weights(args.checkpoint, args.out)
    except CheckpointError as error:
        raise SystemExit(f"polyformer consolidate: {error}") from None
    size = Path(args.out).stat().st_size
    print(f"polyformer consolidate: {args.checkpoint} ({ranks} ranks) → {args.out} ({size / 2**20:.1f} MB, "
          f"sha256 {sha256})")


def stream_command(argv: Sequence[str]) -> None:
    """polyformer stream -c <config> [--data.init_args.<option>=...] --out <folder> [--splits ...]"""
    parser = argparse.ArgumentParser(prog="polyformer stream", description=(
        "Write the splits of a config's data module (LibriSpeech, image folders, VOC / COCO detection, the long-range "
        "tasks) as litdata's optimized chunks, <out>/<split>, which the same data module streams with "
        "--data.init_args.stream.uri=<out> (a local folder or an object-store copy of it). Other options "
        "(e.g. --data.init_args.root=...) configure the data module as they do for fit."))
    parser.add_argument("--out", required=True, help="the stream's folder (one sub-folder per split is written)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--chunk-bytes", default="64MB", help="litdata's chunk size, e.g. 64MB")
    parser.add_argument("--workers", type=int, default=1, help="litdata.optimize's worker processes")
    args, rest = parser.parse_known_args(list(argv))
    cli = PolyformerCLI(args=rest, run=False)
    data = cli.datamodule
    if not hasattr(data, "stream_sources"):
        raise SystemExit(f"polyformer stream: {type(data).__name__} cannot be written as a stream (expected a data "
                         f"module with stream_sources(split): LibriSpeech, image folders, VOC / COCO detection, the "
                         f"long-range tasks)")
    stages = {"train": "fit", "val": "validate", "test": "test"}
    for split in args.splits:
        data.setup(stages[split])
        for folder, source in data.stream_sources(split).items():  # speech: one folder per test split
            try:
                manifest = write_stream(source, split_uri(args.out, folder), split=folder,
                                        chunk_bytes=args.chunk_bytes, num_workers=args.workers)
            except StreamError as error:
                raise SystemExit(f"polyformer stream: {error}") from None
            print(f"polyformer stream: {manifest['dataset']} {folder}: {manifest['samples']} samples → "
                  f"{split_uri(args.out, folder)} ({manifest['seconds']:.1f} s)")


def main(args: Any = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:  # not a Lightning subcommand
        return export_command(argv[1:])
    if argv[:1] == ["consolidate"]:
        return consolidate_command(argv[1:])
    if argv[:1] == ["stream"]:
        return stream_command(argv[1:])
    try:
        PolyformerCLI(args=args)
    except (CheckpointError, NonFiniteError, StreamError) as error:  # their message says it all: no traceback
        raise SystemExit(f"polyformer: {error}") from None


if __name__ == "__main__":
    main()
