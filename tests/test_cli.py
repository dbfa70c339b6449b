"""The `polyformer` CLI end to end: run layout, resume after SIGKILL, 2-process DDP, safe checkpoints, bad configs."""

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polyformer.cli import PolyformerCLI
from polyformer.toy import SortingTask
from polyformer.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "core" / "sort_tiny.yaml"
CLI = [sys.executable, "-m", "polyformer.cli"]
# one thread per process: these models are tiny, and the DDP test runs two processes on what may be two cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit_command(run_root: Path, *extra: str) -> list[str]:
    return [*CLI, "fit", "-c", str(CONFIG), f"--run.root={run_root}", *QUIET, *extra]


def run(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return result


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


# a short run with dropout (32 steps an epoch), so that equal weights need equal data order *and* equal random state
RESUME_ARGS = ["--trainer.max_epochs=4", "--data.init_args.train_size=2048", "--data.init_args.val_size=128",
               "--model.init_args.encoder.dropout=0.1"]
HELPERS_ENV = {**ENV, "PYTHONPATH": str(Path(__file__).parent / "helpers")}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("straight")
    run(fit_command(root, *RESUME_ARGS))
    return torch.load(root / "core" / "sort_tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)


def test_fit_writes_run_layout_and_safe_checkpoint(tmp_path):
    run(fit_command(tmp_path, "--trainer.max_epochs=1", "--data.init_args.train_size=512"))
    version = tmp_path / "core" / "sort_tiny" / "version_0"
    assert (version / "metrics.csv").read_text().startswith("epoch") or "train/loss" in (version / "metrics.csv").read_text()
    assert list(version.glob("events.out.tfevents.*")), "TensorBoard events missing"
    checkpoint = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["encoder"]["dim"] == 64
    task = SortingTask.load_from_checkpoint(version / "checkpoints" / "last.ckpt")
    assert task.encoder_config.dim == 64
    assert_same_weights(task.state_dict(), checkpoint["state_dict"], atol=0)
    run(fit_command(tmp_path, "--trainer.max_epochs=1", "--data.init_args.train_size=512"))
    assert (tmp_path / "core" / "sort_tiny" / "version_1").is_dir()  # a new run opens a new version


def test_test_with_ckpt_path_last_evaluates_the_newest_checkpoint_in_a_new_version(tmp_path):
    run(fit_command(tmp_path, "--trainer.max_epochs=1", "--data.init_args.train_size=256"))
    fit_version = tmp_path / "core" / "sort_tiny" / "version_0"
    fit_metrics = (fit_version / "metrics.csv").read_text()
    run([*CLI, "test", "-c", str(CONFIG), f"--run.root={tmp_path}", *QUIET, "--ckpt_path=last",
         "--model.init_args.optimizer.lr=0.000123"])
    assert (fit_version / "metrics.csv").read_text() == fit_metrics, "the fit's metrics must survive a test run"
    # the command line keeps the say over the checkpoint's saved hyper-parameters
    assert "lr: 0.000123" in (tmp_path / "core" / "sort_tiny" / "version_1" / "config.yaml").read_text()
    test_metrics = (tmp_path / "core" / "sort_tiny" / "version_1" / "metrics.csv").read_text()
    assert "test/token_acc" in test_metrics
    assert not (tmp_path / "core" / "sort_tiny" / "version_1" / "checkpoints" / "last.ckpt").exists()
    again = subprocess.run([*CLI, "test", "-c", str(CONFIG), f"--run.root={tmp_path / 'empty'}", *QUIET,
                            "--ckpt_path=last"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "found none" in again.stderr, again.stderr[-2000:]
    # with --checkpoint.dirpath, `last` is the last.ckpt there
    elsewhere = tmp_path / "elsewhere"
    run(fit_command(tmp_path, "--trainer.max_epochs=1", "--data.init_args.train_size=256",
                    f"--checkpoint.dirpath={elsewhere}"))
    run([*CLI, "test", "-c", str(CONFIG), f"--run.root={tmp_path}", *QUIET, "--ckpt_path=last",
         f"--checkpoint.dirpath={elsewhere}"])
    assert "test/token_acc" in (tmp_path / "core" / "sort_tiny" / "version_3" / "metrics.csv").read_text()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kill_step", [10, 80])  # before the first checkpoint; in the middle of the third epoch
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, uninterrupted_run, kill_step):
    killer = tmp_path / "kill.yaml"
    killer.write_text("trainer:\n  callbacks:\n    - class_path: rank_weights.KillAtStep\n"
                      f"      init_args:\n        step: {kill_step}\n")
    crashed = subprocess.run(fit_command(tmp_path, *RESUME_ARGS) + ["-c", str(killer)], cwd=ROOT, env=HELPERS_ENV,
                             capture_output=True, text=True, timeout=900)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    last = tmp_path / "core" / "sort_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.exists() == (kill_step > 32)

    crashed_metrics = (last.parents[1] / "metrics.csv").read_text() if kill_step > 32 else None

    run(fit_command(tmp_path, *RESUME_ARGS, "--ckpt_path=last"))
    resumed_version = tmp_path / "core" / "sort_tiny" / "version_1"  # the continued run logs in a new version
    if crashed_metrics is not None:
        assert (last.parents[1] / "metrics.csv").read_text() == crashed_metrics, "earlier metrics must stay intact"
        rows = (resumed_version / "metrics.csv").read_text().splitlines()[1:]
        assert min(int(row.split(",")[1]) for row in rows) > 32, "the resumed run continues from its checkpoint"
    resumed = torch.load(resumed_version / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == uninterrupted_run["global_step"] == 128
    assert_same_weights(resumed["state_dict"], uninterrupted_run["state_dict"], atol=1e-6)


@pytest.mark.timeout(1200)
def test_two_process_cpu_ddp_ends_with_identical_weights(tmp_path):
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n    - class_path: rank_weights.SaveRankWeights\n"
        f"      init_args:\n        folder: {tmp_path}\n"
    )
    command = [*CLI, "fit", "-c", str(CONFIG), "-c", str(callbacks), f"--run.root={tmp_path}", *QUIET,
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
               "--trainer.max_epochs=2", "--data.init_args.train_size=512", "--data.init_args.val_size=128",
               "--model.init_args.encoder.dropout=0.1"]
    result = subprocess.run(command, cwd=ROOT, env=HELPERS_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(rank0, rank1, atol=0)
    assert any(not torch.equal(v, w) for v, w in zip(rank0.values(), SortingTask().state_dict().values())), \
        "weights never moved: nothing was trained"


class Exploit:
    """Unpickling this would run code."""

    def __reduce__(self):
        return (exec, ("open('PWNED_MARKER', 'w').write('ran')",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Exploit()}, evil)
    with pytest.raises(ValueError, match="refusing to load checkpoint .*evil.ckpt"):
        load_checkpoint(evil)
    result = subprocess.run(fit_command(tmp_path, f"--ckpt_path={evil}"), cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    assert "refusing to load checkpoint" in result.stderr
    assert not (tmp_path / "PWNED_MARKER").exists()


@pytest.mark.parametrize("override,expected", [
    ("--model.init_args.encoder.dimm=64", "Option 'dimm' is not accepted"),
    ("--model.init_args.encoder.depth=two", 'Parser key "depth"'),
    ("--model.init_args.encoder.heads=5", "dim=64 must be divisible by heads=5"),
    ("--model.init_args.encoder.attention=fancy", 'Parser key "attention"'),
    ("--data.init_args.batch_size=many", 'Parser key "batch_size"'),
])
def test_bad_config_names_the_field(override, expected, capsys):
    with pytest.raises((SystemExit, ValueError)) as error:
        cli = PolyformerCLI(args=["-c", str(CONFIG), override], run=False)
        cli.instantiate_classes()
    stderr = capsys.readouterr().err
    # the verdict, not the usage text that precedes it
    message = str(error.value) + stderr[stderr.rfind("error:"):] if "error:" in stderr else str(error.value) + stderr
    assert expected in message, message


def test_good_config_parses_without_running():
    cli = PolyformerCLI(args=["-c", str(CONFIG), "--model.init_args.encoder.heads=8"], run=False)
    assert cli.model.encoder_config.heads == 8 and cli.model.encoder_config.dim == 64


def test_scripts_start_the_cli_through_their_own_interpreter():
    """`.venv/bin/python scripts/bench_vision.py` works without an activated venv: no script runs `polyformer` by its
    command name (["polyformer", ...]); they run [sys.executable, "-m", "polyformer.cli", ...]."""
    by_name = [f"{script.name}:{node.lineno}" for script in sorted((ROOT / "scripts").glob("*.py"))
               for node in ast.walk(ast.parse(script.read_text()))
               if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant)
               and node.elts[0].value == "polyformer"]
    assert not by_name, by_name


def test_a_config_data_section_builds_its_data_module_with_typed_nested_arguments():
    """datamodule_from (what the benchmarks use): nested dataclass arguments arrive as dataclasses, as LightningCLI
    gives them, not as the dicts of the YAML."""
    from polyformer.cli import datamodule_from
    from polyformer.domains.speech.data import AudioConfig, SpeechLoaderConfig

    data = datamodule_from({"class_path": "polyformer.domains.speech.LibriSpeechDataModule",
                            "init_args": {"root": "corpus", "audio": {"max_duration": 3.0},
                                          "loader": {"num_workers": 0}}})
    assert data.audio == AudioConfig(max_duration=3.0) and data.loader == SpeechLoaderConfig(num_workers=0)
