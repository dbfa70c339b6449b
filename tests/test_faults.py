"""Faults that must lose nothing: SIGKILL inside a checkpoint write, NaN losses and weights, unreadable checkpoints
and checkpoints of another architecture, and a rank that raises in a 2-process DDP run (CPU, gloo)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyformer.checkpoint import CheckpointError, load_checkpoint, recover_folder, replace_folder, write_atomically
from polyformer.toy import SortingTask
from polyformer.transformer import TransformerConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "core" / "sort_tiny.yaml"
CLI = [sys.executable, "-m", "polyformer.cli"]
# one thread per process (see test_cli.py); the fault-injection callbacks come from tests/helpers
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent / "helpers")}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# 4 optimizer steps an epoch, 3 epochs: checkpoints after steps 4, 8 and 12
SMALL = ["--data.init_args.train_size=256", "--data.init_args.val_size=64", "--data.init_args.test_size=64",
         "--trainer.max_epochs=3"]


def command(subcommand: str, run_root: Path, *extra: str) -> list[str]:
    return [*CLI, subcommand, "-c", str(CONFIG), f"--run.root={run_root}", *QUIET, *SMALL, *extra]


def callback_config(path: Path, class_name: str, **init_args) -> str:
    args = "".join(f"\n        {key}: {value}" for key, value in init_args.items())
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: fault_injection.{class_name}\n      init_args:{args}\n")
    return str(path)


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_one_line_failure(result: subprocess.CompletedProcess, *expected: str) -> None:
    """The command failed with no traceback and one `polyformer:` line holding every expected phrase."""
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("polyformer:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for phrase in expected:
        assert phrase in lines[0], lines[0]


def checkpoint_step(path: Path) -> int:
    return load_checkpoint(path)["global_step"]


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(value).all() for value in load_checkpoint(path)["state_dict"].values())


# ---- atomic checkpoints -----------------------------------------------------------------------------------------
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_checkpoint_and_resume_works(tmp_path):
    marker = tmp_path / "stalled"
    stall = callback_config(tmp_path / "stall.yaml", "StallInsideSave", step=8, nth=2, marker=marker)  # last.ckpt
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command("fit", tmp_path, "-c", stall), cwd=ROOT, env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), (tmp_path / "stderr.txt").read_text()[-3000:]
            checkpoints = tmp_path / "core" / "sort_tiny" / "version_0" / "checkpoints"
            # the kill lands inside the write of last.ckpt, whose temporary file is open beside it
            assert (checkpoints / ".last.ckpt.tmp").exists(), sorted(p.name for p in checkpoints.iterdir())
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert checkpoint_step(checkpoints / "last.ckpt") == 4  # the previous one, whole
    SortingTask.load_from_checkpoint(checkpoints / "last.ckpt")

    resumed = run(command("fit", tmp_path, "--ckpt_path=last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_step(tmp_path / "core" / "sort_tiny" / "version_1" / "checkpoints" / "last.ckpt") == 12


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")

    def half_then_fail(file) -> None:
        file.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    write_atomically(target, lambda file: file.write(b"new"))
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_sharded_checkpoint_folder_is_replaced_whole(tmp_path):
    """replace_folder (how ShardedStrategy puts a finished `.<name>.partial` folder in place): the old shards go, the
    new ones come, nothing of either is mixed, and a stale `.old` of a killed replacement is cleared."""
    target = tmp_path / "last.ckpt"
    for name, folder in (("old", target), ("new", tmp_path / ".last.ckpt.partial")):
        folder.mkdir()
        (folder / "__0_0.distcp").write_text(name)
        (folder / ("stale" if name == "old" else "meta.pt")).write_text(name)
    (tmp_path / ".last.ckpt.old").mkdir()  # as a replacement killed between its two renames leaves it
    replace_folder(tmp_path / ".last.ckpt.partial", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in target.iterdir()) == ["__0_0.distcp", "meta.pt"]
    assert (target / "__0_0.distcp").read_text() == "new"


def test_a_checkpoint_left_between_the_two_renames_is_put_back(tmp_path):
    """Killed after the old folder became `.last.ckpt.old` and before the new one took its name: the next lookup
    (the CLI's --ckpt_path, `last`, the strategy's load) finds the old checkpoint whole under its own name again."""
    old = tmp_path / ".last.ckpt.old"
    old.mkdir()
    (old / "__0_0.distcp").write_text("old")
    with pytest.warns(UserWarning, match="put back from .last.ckpt.old"):
        assert recover_folder(tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (tmp_path / "last.ckpt" / "__0_0.distcp").read_text() == "old"
    assert not recover_folder(tmp_path / "last.ckpt")  # nothing left to put back
    # `--ckpt_path last` looks for it the same way
    from polyformer.cli import newest_with

    killed = tmp_path / "run" / "version_0" / "checkpoints" / ".last.ckpt.old"
    killed.mkdir(parents=True)
    (killed / ".metadata").write_bytes(b"")
    with pytest.warns(UserWarning, match="put back"):
        assert newest_with(tmp_path / "run", "checkpoints/last.ckpt") == killed.with_name("last.ckpt")


# ---- NaN and inf ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("when, expected", [
    # NaN weights before step 6's batch (epoch 1, batch 2): the loss is NaN, training stops before the update
    ("start", ("training loss nan at global step 6 (epoch 1, batch 2)",)),
    # NaN weights after step 8's update, with a finite loss: the checkpoint of step 8 is refused
    ("end", ("refusing to write a checkpoint at global step 8", "model.embed.weight")),
])
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, when, expected):
    poison = callback_config(tmp_path / "nan.yaml", "NaNWeightsAt", step=6 if when == "start" else 8, when=when)
    result = run(command("fit", tmp_path, "-c", poison))
    assert_one_line_failure(result, *expected)
    last = tmp_path / "core" / "sort_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 4 and all_finite(last)


# ---- unreadable checkpoints and other architectures -------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A run root holding core/sort_tiny/version_0/checkpoints/last.ckpt of a 1-epoch fit."""
    root = tmp_path_factory.mktemp("fitted")
    result = run(command("fit", root, "--trainer.max_epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def truncated_copy(fitted: Path, tmp_path: Path, size: int = 2000) -> Path:
    last = fitted / "core" / "sort_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(last.read_bytes()[:size])
    return cut


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_truncated_checkpoint_ends_in_one_line(fitted, tmp_path, subcommand):
    cut = truncated_copy(fitted, tmp_path)
    result = run(command(subcommand, tmp_path, f"--ckpt_path={cut}"))
    assert_one_line_failure(result, f"checkpoint {cut} is truncated or corrupted", "2,000 bytes")


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_checkpoint_of_another_architecture_ends_in_one_line(fitted, subcommand):
    # `last` is resolved after the config is read, so the command line's architecture stands against the checkpoint's
    result = run(command(subcommand, fitted, "--ckpt_path=last", "--model.init_args.encoder.dim=32",
                         "--model.init_args.encoder.depth=3"))
    assert_one_line_failure(result, "does not fit SortingTask", "missing keys model.encoder.blocks.2.",
                            "shapes differ for model.embed.weight (checkpoint (10, 64) vs model (10, 32))")


def test_load_from_checkpoint_names_the_file_and_what_is_wrong(fitted, tmp_path):
    last = fitted / "core" / "sort_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"^checkpoint .*cut.ckpt is truncated or corrupted: its 2,000 bytes"):
        SortingTask.load_from_checkpoint(truncated_copy(fitted, tmp_path))
    flipped = tmp_path / "flipped.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: torch.load alone would read it without complaint
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped.ckpt is truncated or corrupted: .*Bad CRC-32 for file"):
        SortingTask.load_from_checkpoint(flipped)
    wider = TransformerConfig(dim=32, depth=2, heads=4, position="learned", max_len=64)
    with pytest.raises(CheckpointError) as error:
        SortingTask.load_from_checkpoint(last, encoder=wider)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"checkpoint {last} does not fit SortingTask: shapes differ")
    assert "model.embed.weight (checkpoint (10, 64) vs model (10, 32))" in message


def test_legacy_format_still_loads(tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"legacy.ckpt is neither a torch.save zip archive nor a readable"):
        load_checkpoint(path)


# ---- a rank that raises -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_raises_ends_every_rank_and_rank_0_shows_it(tmp_path, rank):
    raiser = callback_config(tmp_path / "raise.yaml", "RaiseOnRank", rank=rank, step=2)
    start = time.monotonic()
    result = run([*CLI, "fit", "-c", str(CONFIG), "-c", raiser, f"--run.root={tmp_path}", *QUIET,
                  "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                  "--trainer.max_epochs=1", "--data.init_args.train_size=512", "--data.init_args.val_size=64"])
    # returned: every process holding the output pipes has ended, none waited out a timeout
    assert time.monotonic() - start < 50
    assert result.returncode != 0, result.stderr[-3000:]
    # no rank died of another one's disappearance (gloo's "Connection closed by peer" would hide the cause)
    assert "Connection closed" not in result.stderr, result.stderr[-3000:]
    if rank == 0:
        assert result.stderr.rstrip().endswith("RuntimeError: injected fault on rank 0 at step 2"), \
            result.stderr[-3000:]
    else:
        assert result.stderr.rstrip().splitlines()[-1] == \
            "polyformer: rank 1 failed: RuntimeError: injected fault on rank 1 at step 2", result.stderr[-3000:]
