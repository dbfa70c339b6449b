"""The `polyformer` command: LightningCLI with Polyformer's run layout, checkpoints and checks.

    polyformer fit -c configs/<domain>/<name>.yaml [--trainer.devices=2 --trainer.strategy=ddp] [--ckpt_path last]

Runs land in runs/<domain>/<name>/version_N/ (metrics.csv, TensorBoard events, checkpoints/ with last.ckpt);
<domain>/<name> come from the (first) config file's path unless --run.domain / --run.name say otherwise.
`--ckpt_path last` works in the newest version of the run (fit resumes it, test/validate evaluate it) instead of
opening a new one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from polyformer.training import PolyformerTask, Throughput, load_checkpoint


def next_version(run_dir: Path, resume: bool) -> int:
    """One past the newest version_N under run_dir; when resuming, the newest that holds checkpoints/last.ckpt
    (a later `test` opens a version without one), else the newest."""
    versions = sorted(int(m.group(1)) for p in run_dir.glob("version_*")
                      if (m := re.fullmatch(r"version_(\d+)", p.name)))
    if not versions:
        return 0
    if not resume:
        return versions[-1] + 1
    with_last = [v for v in versions if (run_dir / f"version_{v}" / "checkpoints" / "last.ckpt").is_file()]
    return with_last[-1] if with_last else versions[-1]


class PolyformerCLI(LightningCLI):
    def __init__(self, args: Any = None, run: bool = True):
        super().__init__(
            model_class=PolyformerTask,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [Throughput()]},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="folder that holds <domain>/<name>/version_N")
        parser.add_argument("--run.domain", type=str | None, default=None, help="default: the config's folder name")
        parser.add_argument("--run.name", type=str | None, default=None, help="default: the config file's stem")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def parse_arguments(self, parser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads hyper-parameters from --ckpt_path next: refuse an unsafe file first, in plain words
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        ckpt_path = config.get("ckpt_path") if hasattr(config, "get") else None
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                load_checkpoint(ckpt_path)
            except ValueError as error:
                raise SystemExit(f"polyformer: --ckpt_path: {error}") from None

    def run_location(self) -> tuple[Path, str, int]:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run = config["run"]
        files = [Path(str(p)) for p in (config.get("config") or [])]
        domain = run["domain"] or (files[0].parent.name if files else "default")
        name = run["name"] or (files[0].stem if files else "run")
        resume = config.get("ckpt_path") == "last"  # continue (fit) or evaluate (test) the newest version
        root = Path(run["root"]) / domain
        return root, name, next_version(root / name, resume)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            root, name, version = self.run_location()
            kwargs["logger"] = [CSVLogger(root, name=name, version=version)]
            try:
                kwargs["logger"].append(TensorBoardLogger(root, name=name, version=version, default_hp_metric=False))
            except ModuleNotFoundError:  # TensorBoard is optional: CSV metrics are always written
                pass
        return super().instantiate_trainer(**kwargs)


def main(args: Any = None) -> None:
    PolyformerCLI(args=args)


if __name__ == "__main__":
    main()
