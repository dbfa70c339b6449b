"""The tasks through the polyformer CLI: a short fit, rollouts at its end, a checkpoint that acts on its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from polyformer.cli import PolyformerCLI
from polyformer.domains.rl.cartpole import collect_cartpole
from polyformer.domains.rl.evaluate import RolloutConfig, d4rl_normalized
from polyformer.training import load_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    import minari
    from minari.data_collector import EpisodeBuffer

    from polyformer.domains.rl.cartpole import minari_root

    root = tmp_path_factory.mktemp("minari")
    with minari_root(root):
        minari.create_dataset_from_buffers("test/cartpole/tiny-v0", [EpisodeBuffer(id=i, **b) for i, b in
                                                                    enumerate(collect_cartpole(12, seed=4))],
                                           env="CartPole-v1", eval_env="CartPole-v1", algorithm_name="test")
    return root


def fit(config: str, tiny_root: Path, run_root: Path, extra: list[str]) -> PolyformerCLI:
    return PolyformerCLI(args=[
        "fit", "-c", str(ROOT / config), "--run.root", str(run_root), "--data.init_args.root", str(tiny_root),
        "--data.init_args.dataset", "test/cartpole/tiny-v0", "--data.init_args.val_fraction", "0.2",
        "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_model_summary", "false", "--model.init_args.evaluation.episodes", "2", *extra])


def test_rl_dt_fit_evaluates_and_reloads(tiny_root, tmp_path):
    cli = fit("configs/rl/dt_cartpole.yaml", tiny_root, tmp_path,
              ["--model.init_args.model.encoder.dim", "16", "--model.init_args.evaluation.targets", "[50, 500]"])
    log_dir = Path(cli.trainer.log_dir)
    rows = json.loads((log_dir / "eval.json").read_text())
    assert [row["target"] for row in rows] == [50, 500]
    assert all(len(row["returns"]) == 2 and 8 <= row["return_mean"] <= 500 for row in rows)
    assert "train/loss" in (log_dir / "metrics.csv").read_text()

    task = load_task(str(log_dir / "checkpoints" / "last.ckpt")).eval()
    stats = cli.datamodule.stats
    torch.testing.assert_close(task.model.normalizer.state_mean, stats.state_mean)
    torch.testing.assert_close(task.model.normalizer.state_std, stats.state_std)
    assert float(task.model.normalizer.return_scale) == 100.0
    states = torch.randn(2, 5, 4)
    inputs = (torch.rand(2, 5), states, torch.randint(2, (2, 5)), torch.arange(5).expand(2, 5))
    with torch.no_grad():
        torch.testing.assert_close(task.model(*inputs), cli.model.eval().model(*inputs))
    again = task.rollouts(RolloutConfig(targets=[50, 500], episodes=2, sample=True))
    assert [row["returns"] for row in again] == [row["returns"] for row in rows]  # seeded: the same episodes


def test_rl_bc_fit_and_reload(tiny_root, tmp_path):
    cli = fit("configs/rl/bc_cartpole.yaml", tiny_root, tmp_path, ["--model.init_args.model.hidden", "16"])
    rows = json.loads((Path(cli.trainer.log_dir) / "eval.json").read_text())
    assert rows[0]["target"] is None and len(rows[0]["returns"]) == 2
    task = load_task(str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"))
    assert type(task).__name__ == "BCTask"
    torch.testing.assert_close(task.model.normalizer.state_mean, cli.datamodule.stats.state_mean)


def test_rl_task_refuses_data_of_another_environment(tiny_root, tmp_path):
    with pytest.raises(ValueError, match=r"test/cartpole/tiny-v0: observation_space .* does not match"):
        fit("configs/rl/dt_cartpole.yaml", tiny_root, tmp_path, ["--data.init_args.env_id", "Acrobot-v1"])
    with pytest.raises(ValueError, match=r"records CartPole-v1 .* but the task acts in MountainCar-v0"):
        fit("configs/rl/dt_cartpole.yaml", tiny_root, tmp_path, ["--model.init_args.env_id", "MountainCar-v0"])


def test_rl_d4rl_normalisation():
    """D4RL's halfcheetah references (random −280.18, expert 12135.0): 0 and 100 at those returns."""
    np.testing.assert_allclose(d4rl_normalized("HalfCheetah-v5", np.array([-280.178953, 12135.0])), [0, 100])
    assert d4rl_normalized("CartPole-v1", np.array([1.0])) is None


@pytest.mark.parametrize("name", ["medium", "medium_replay"])
def test_rl_halfcheetah_configs_and_cpu_schedule_layer(name, tmp_path):
    """The paper's configs parse and build; the CPU schedule file changes only the schedule, not the model."""
    pytest.importorskip("mujoco", reason="HalfCheetah-v5 needs gymnasium[mujoco] (the rl extra)")
    config = ["-c", str(ROOT / f"configs/rl/dt_halfcheetah_{name}.yaml")]
    common = [f"--run.root={tmp_path}", "--trainer.accelerator=cpu"]
    paper = PolyformerCLI(args=[*config, *common], run=False)
    cpu = PolyformerCLI(args=[*config, "-c", str(ROOT / "configs/rl/halfcheetah_cpu_schedule.yaml"), *common],
                        run=False)
    for cli in (paper, cpu):
        assert cli.model.model.context == 20 and cli.model.model_config.encoder.dim == 128
        assert cli.model.evaluation.targets == [6000, 12000]
    assert (paper.trainer.max_steps, paper.model.optimizer_config.lr, paper.datamodule.batch_size) == (100_000, 1e-4, 64)
    assert (cpu.trainer.max_steps, cpu.model.optimizer_config.lr, cpu.datamodule.batch_size) == (10_000, 1e-3, 32)
    assert cpu.model.model_config.encoder.dropout == 0.0 and paper.model.model_config.encoder.dropout == 0.1
    assert Path(cpu.trainer.logger.log_dir).parent.name == f"dt_halfcheetah_{name}"  # named after the first file


def test_the_old_flat_architecture_arguments_are_read_with_a_deprecation_message():
    """Releases up to 0.1.0 took context / max_ep_len / encoder (DT) and hidden / depth / dropout (BC) flat; the
    committed weights/rl/dt_cartpole.ckpt records them so."""
    from polyformer.domains.rl.model import BehaviourCloningConfig, DecisionTransformerConfig
    from polyformer.domains.rl.task import BCTask, DecisionTransformerTask
    from polyformer.transformer import TransformerConfig

    encoder = TransformerConfig(dim=16, depth=1, heads=1)
    with pytest.warns(DeprecationWarning, match="context, max_ep_len, encoder are deprecated .* write model.context"):
        task = DecisionTransformerTask(context=4, max_ep_len=500, encoder=encoder)
    assert task.model_config == DecisionTransformerConfig(context=4, max_ep_len=500, encoder=encoder)
    assert task.hparams["model"] == task.model_config and not {"context", "encoder"} & set(task.hparams)
    with pytest.warns(DeprecationWarning, match="hidden are deprecated"):
        assert BCTask(hidden=8).model_config == BehaviourCloningConfig(hidden=8)
    with pytest.raises(ValueError, match="context are the old, flat form of `model`: set model.context, found both"):
        DecisionTransformerTask(model=DecisionTransformerConfig(), context=4)


def test_polyformer_test_acts_with_a_committed_checkpoint_and_the_evaluation_the_command_line_gives(tiny_root,
                                                                                                     tmp_path):
    """`polyformer test -c <config> --ckpt_path <ckpt>` runs the rollouts: the config's and the command line's
    evaluation (an inference field), the checkpoint's architecture (recorded under the old flat names) and weights."""
    cli = PolyformerCLI(args=[
        "test", "-c", str(ROOT / "configs/rl/dt_cartpole.yaml"),
        "--ckpt_path", str(ROOT / "weights/rl/dt_cartpole.ckpt"), "--run.root", str(tmp_path),
        "--data.init_args.root", str(tiny_root),
        "--data.init_args.dataset", "test/cartpole/tiny-v0", "--trainer.enable_progress_bar", "false",
        "--model.init_args.evaluation.targets", "[500]", "--model.init_args.evaluation.episodes", "2",
        "--model.init_args.evaluation.sample", "false"])
    metrics = cli.trainer.callback_metrics
    assert set(metrics) >= {"test/return_mean", "test/return_std", "test/length_mean"}
    assert float(metrics["test/return_mean"]) == 500.0  # the committed DT balances for the whole episode at R = 500
    assert json.loads((Path(cli.trainer.log_dir) / "eval.json").read_text())[0]["episodes"] == 2
