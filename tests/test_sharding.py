"""Sharded and data-parallel training with real processes on CPU (gloo): `--trainer.strategy=fsdp` (FSDP2 through
polyformer.distributed) and `ddp` over two ranks end where one process ends over the same global batch; a 2-rank FSDP
run killed mid-epoch resumes from its sharded checkpoint and ends where an uninterrupted one ends; `polyformer
consolidate` makes one weights-only file of it; activation checkpointing changes no gradient; every domain's blocks are
units."""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from polyformer.checkpoint import (CheckpointError, is_sharded, load_checkpoint, load_sharded, sharded_ranks,
                                   task_class)
from polyformer.cli import PolyformerCLI, main
from polyformer.distributed import blocks_of, checkpoint_activations, compile_blocks
from polyformer.toy import SortingTask
from polyformer.transformer import TransformerBlock, TransformerConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "core" / "sort_tiny.yaml"
HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from subprocess_fit import polyformer_fit  # noqa: E402
# 8 optimizer steps of a global batch of 32, no dropout, no clipping (FSDP clips differently). Every run is
# distributed, the single process as a world of one: Lightning's DistributedSampler then deals the same permutation
# to all, so that step k's global batch is the same 32 samples (one process: 32; two ranks: 16 each, interleaved)
EQUAL_WORK = ["--trainer.max_epochs=1", "--data.init_args.train_size=256", "--data.init_args.val_size=64",
              "--trainer.gradient_clip_val=null", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.accelerator=cpu"]


def run_fit(folder: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """`polyformer fit` of the sorting task in its own process(es), runs under `folder`; every rank saves its final
    weights there (rank<N>.pt), and with `kill_at` every rank kills itself as that optimizer step begins."""
    return polyformer_fit(folder, [CONFIG], "rank_weights.SaveRankWeights", *EQUAL_WORK, *extra, kill_at=kill_at)


def fit_weights(tmp_path: Path, name: str, *extra: str) -> dict[str, torch.Tensor]:
    folder = tmp_path / name
    result = run_fit(folder, *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = sorted(folder.glob("rank*.pt"))
    states = [torch.load(path, weights_only=True) for path in ranks]
    for other in states[1:]:  # every rank ends with the same model
        for key in states[0]:
            torch.testing.assert_close(other[key], states[0][key], atol=0, rtol=0)
    return states[0]


def assert_same_weights(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], atol: float, name: str):
    assert run.keys() == reference.keys(), name
    for key in reference:
        torch.testing.assert_close(run[key], reference[key], atol=atol, rtol=0, msg=lambda m: f"{name} {key}: {m}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: one process over the global batch of 32."""
    weights = fit_weights(tmp_path_factory.mktemp("one"), "one", "--trainer.devices=1", "--trainer.strategy=ddp",
                          "--data.init_args.batch_size=32")
    start = SortingTask().state_dict()
    assert any(not torch.equal(weights[k], start[k]) for k in weights), "nothing was trained"
    return weights


@pytest.mark.timeout(1800)
def test_two_rank_fsdp_and_ddp_end_where_one_process_ends(one_process, tmp_path):
    ddp = fit_weights(tmp_path, "ddp", "--trainer.devices=2", "--trainer.strategy=ddp",
                      "--data.init_args.batch_size=16")
    fsdp = fit_weights(tmp_path, "fsdp", "--trainer.devices=2", "--trainer.strategy=fsdp",
                       "--data.init_args.batch_size=16")
    for name, run in (("ddp", ddp), ("fsdp", fsdp)):
        assert_same_weights(run, one_process, 1e-5, name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_nodes(folder: Path, *extra: str, callbacks: str = "") -> list[subprocess.CompletedProcess]:
    """Two torchrun "nodes" on 127.0.0.1, one process each, running `polyformer fit --trainer.num_nodes=2` (what a
    SLURM job of two nodes runs, docs/multinode.md); every rank saves its final weights in `folder`."""
    folder.mkdir(exist_ok=True)
    config = folder / "callbacks.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: rank_weights.SaveRankWeights\n      init_args:\n"
                      f"        folder: {folder}\n{callbacks}")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPERS)}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "polyformer.cli", "fit", "-c", str(CONFIG), "-c", str(config),
                               f"--run.root={folder}", *EQUAL_WORK, "--trainer.num_nodes=2", "--trainer.devices=1",
                               *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return results


@pytest.mark.timeout(900)
def test_two_torchrun_nodes_end_where_one_process_ends(one_process, tmp_path):
    folder = tmp_path / "nodes"
    for node, result in enumerate(torchrun_nodes(folder, "--trainer.strategy=ddp", "--data.init_args.batch_size=16")):
        assert result.returncode == 0, f"node {node}: {result.stderr[-4000:]}"
    ranks = sorted(p.name for p in folder.glob("rank*.pt"))
    assert ranks == ["rank0.pt", "rank1.pt"]
    for rank in ranks:
        assert_same_weights(torch.load(folder / rank, weights_only=True), one_process, 1e-5, f"nodes {rank}")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_failing_on_either_node_ends_both_nodes_and_shows_its_error(rank, tmp_path):
    raiser = ("    - class_path: fault_injection.RaiseOnRank\n      init_args:\n"
              f"        rank: {rank}\n        step: 2\n")
    start = time.monotonic()
    results = torchrun_nodes(tmp_path / "nodes", "--trainer.strategy=ddp", "--data.init_args.batch_size=16",
                             callbacks=raiser)
    assert time.monotonic() - start < 120  # no node waited out a collective's time-out
    assert all(result.returncode != 0 for result in results), [r.returncode for r in results]
    shown = results[rank].stderr
    assert f"RuntimeError: injected fault on rank {rank} at step 2" in shown, shown[-3000:]


FSDP_TWO_RANKS = ["--trainer.devices=2", "--trainer.strategy=fsdp", "--data.init_args.batch_size=16"]


@pytest.mark.timeout(1800)
def test_killed_fsdp_run_resumes_mid_epoch_from_its_sharded_checkpoint_and_ends_as_if_uninterrupted(tmp_path):
    two_epochs = [*FSDP_TWO_RANKS, "--trainer.max_epochs=2"]
    whole = fit_weights(tmp_path, "whole", *two_epochs)
    killed = tmp_path / "killed"
    # 8 steps an epoch: checkpoints every 2 steps, every rank killed as step 13 begins (mid-way through epoch 2)
    result = run_fit(killed, *two_epochs, "--checkpoint.every_n_train_steps=2", kill_at=13)
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    last = killed / "core" / "sort_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert is_sharded(last) and sharded_ranks(last) == 2
    assert load_sharded(last)["global_step"] == 12 and not list(killed.glob("rank*.pt"))
    resumed = fit_weights(tmp_path, "killed", *two_epochs, "--checkpoint.every_n_train_steps=2", "--ckpt_path=last")
    # the loader's position is in the checkpoint: the resumed run sees steps 13-16's batches of the second epoch's
    # order, not the epoch's first (dropout is off: its masks are drawn per epoch, so they would differ mid-epoch)
    assert_same_weights(resumed, whole, 1e-6, "resumed")

    # one weights-only file of the sharded checkpoint, which loads as any checkpoint does
    out = tmp_path / "whole.ckpt"
    consolidated = subprocess.run([sys.executable, "-m", "polyformer.cli", "consolidate",
                                   str(tmp_path / "whole" / "core" / "sort_tiny" / "version_0" / "checkpoints" /
                                       "last.ckpt"), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert consolidated.returncode == 0 and "(2 ranks)" in consolidated.stdout, consolidated.stderr[-4000:]
    task = task_class(load_checkpoint(out)).load_from_checkpoint(out)
    assert_same_weights({k: v for k, v in task.state_dict().items()}, whole, 0, "consolidated")


def test_sharded_checkpoint_bad_input_is_named(tmp_path):
    """A missing shard, another world size and another strategy end in one line saying what to do."""
    folder = tmp_path / "run"
    result = run_fit(folder, *FSDP_TWO_RANKS, "--trainer.max_steps=2")
    assert result.returncode == 0, result.stderr[-4000:]
    last = folder / "core" / "sort_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    resume = ["fit", "-c", str(CONFIG), f"--run.root={folder}", *EQUAL_WORK, f"--ckpt_path={last}"]
    for options, found in ((["--trainer.devices=1", "--trainer.strategy=fsdp"], "this run has 1 rank(s)"),
                           (["--trainer.devices=1"], "this run has 1 rank(s) under strategy SingleDeviceStrategy")):
        with pytest.raises(SystemExit, match=f"written by 2 ranks, {re.escape(found)}: resume with "
                                             f"--trainer.strategy=fsdp on 2 ranks, or `polyformer consolidate"):
            PolyformerCLI(args=[*resume, *options])
    with pytest.raises(CheckpointError, match="is a sharded checkpoint .*`polyformer consolidate"):
        load_checkpoint(last)
    broken = tmp_path / "broken.ckpt"
    shutil.copytree(last, broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"lacks __1_0.distcp of its 2 shard files"):
        sharded_ranks(broken)
    with pytest.raises(SystemExit, match=r"polyformer consolidate: .*lacks __1_0.distcp"):
        main(["consolidate", str(broken), str(tmp_path / "out.ckpt")])


def test_activation_checkpointing_changes_no_gradient():
    torch.manual_seed(0)
    plain = SortingTask(encoder=TransformerConfig(dim=32, depth=3, heads=4, position="learned", max_len=16))
    recomputed = SortingTask(encoder=TransformerConfig(dim=32, depth=3, heads=4, position="learned", max_len=16))
    recomputed.load_state_dict(plain.state_dict())
    assert checkpoint_activations(recomputed, ()) == 3
    tokens = torch.randint(10, (8, 12))
    batch = (tokens, tokens.sort(dim=1).values)
    for task in (plain, recomputed):
        task.step(batch, "val").backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


def test_blocks_are_the_outermost_units():
    task = SortingTask(encoder=TransformerConfig(dim=32, depth=3, heads=4, position="learned", max_len=16))
    blocks = blocks_of(task, ())
    assert len(blocks) == 3 and all(isinstance(b, TransformerBlock) for b in blocks)
    # a domain's block that holds core blocks is the unit; the core blocks inside it are not units of their own
    encoder = task.model.encoder
    assert blocks_of(task, (type(encoder),)) == [encoder]


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The children of every ModuleList of two or more modules of one class of our own (not torch.nn's): what a
    model repeats, and so what FSDP should gather and free one at a time."""
    found = []
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) >= 2 and len({type(m) for m in child}) == 1 \
                and not type(child[0]).__module__.startswith("torch.") and any(True for _ in child.parameters()):
            found.extend(child)
    return found


DOMAIN_CONFIGS = ["vision/vit_tiny_digits.yaml", "vision/swin_tiny_digits.yaml", "vision/detr_bccd.yaml",
                  "vision/detr_bccd.yaml+--model.init_args.model.backbone=swin", "vision/deformable_detr_bccd.yaml",
                  "speech/conformer_ctc_tiny_synthetic.yaml", "speech/bestrq_tiny_real.yaml",
                  "timeseries/patchtst_etth1_96.yaml", "rl/dt_cartpole.yaml",
                  "longrange/text.yaml", "longrange/text.yaml+longrange/mixers/s4d.yaml"]


@pytest.mark.parametrize("configs", DOMAIN_CONFIGS)
def test_every_domain_block_is_a_sharding_unit(configs, tmp_path):
    """Each repeated block of every domain's model is an FSDP / activation-checkpointing unit (or inside one): a
    domain whose blocks are not the core's names them in its task's `block_types`."""
    args = [a for c in configs.split("+") for a in ((c,) if c.startswith("--") else ("-c", str(ROOT / "configs" / c)))]
    task = PolyformerCLI(args=[*args, "--trainer.accelerator=cpu", f"--run.root={tmp_path}"], run=False).model
    units = blocks_of(task, task.block_types)
    covered = {id(m) for unit in units for m in unit.modules()}
    holders = {id(m) for unit in units for m in task.modules() if any(u is unit for u in m.modules())}
    # a repeated module is covered by being inside a unit, or by holding units (a Swin stage holds its blocks)
    missing = sorted({type(b).__name__ for b in repeated_blocks(task) if id(b) not in covered | holders})
    assert units and not missing, f"{type(task).__name__}: {missing} are not units (add them to block_types)"


def test_a_node_without_a_reachable_master_ends_in_one_line_not_a_hang(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "NODE_RANK": "1"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "polyformer.cli", "fit", "-c", str(CONFIG), f"--run.root={tmp_path}",
                             *EQUAL_WORK, "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp",
                             "--run.master_timeout=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - start < 120 and result.returncode != 0
    assert result.stderr.rstrip().splitlines()[-1].startswith(
        "polyformer: --trainer.num_nodes=2: node 1 found no master at 127.0.0.1:"), result.stderr[-3000:]
    assert "within 2 s" in result.stderr and "start node 0 first" in result.stderr


def test_compiled_blocks_compute_what_eager_blocks_compute():
    """`--compile true` (torch.compile of each block, inductor on CPU): the same loss and gradients (≤ 1e-5), and
    the core's block compiles as one graph (no graph breaks)."""
    torch.manual_seed(0)
    eager = SortingTask(encoder=TransformerConfig(dim=16, depth=2, heads=2, position="learned", max_len=16))
    compiled = copy.deepcopy(eager)
    explained = torch._dynamo.explain(eager.model.encoder.blocks[0])(torch.randn(4, 12, 16))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert compile_blocks(compiled, ()) == 2
    tokens = torch.randint(10, (4, 12))
    losses = [task.step((tokens, tokens.sort(dim=1).values), "val") for task in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for loss in losses:
        loss.backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_state_bytes_count_parameters_gradients_and_optimizer_moments():
    from polyformer.distributed import state_bytes

    layer = nn.Linear(10, 10)  # 110 fp32 parameters: 440 bytes
    optimizer = torch.optim.AdamW(layer.parameters())
    assert state_bytes(layer, [optimizer]) == {"parameters": 440, "gradients": 0, "optimizer": 0}
    layer(torch.randn(3, 10)).sum().backward()
    optimizer.step()  # AdamW's two moments per parameter; its scalar step counts are left out
    assert state_bytes(layer, [optimizer]) == {"parameters": 440, "gradients": 440, "optimizer": 880}
