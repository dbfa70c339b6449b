"""Lightning tasks: the Decision Transformer and its behaviour-cloning baseline, trained offline, evaluated online.

Both read their environment's spaces from gymnasium at construction, take the dataset's state statistics and
reward scale from the data module when fitting (stored as buffers, so a checkpoint acts on its own), and run
gymnasium rollouts when fitting ends if `evaluation` is set: a table on stdout and eval.json in the run's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import torch
import torch.nn.functional as F
from torch import Tensor

from polyformer.domains.rl.data import OfflineRLDataModule, space_dims
from polyformer.domains.rl.evaluate import RolloutConfig, evaluate_bc, evaluate_dt, format_rows
from polyformer.deploy import Exportable
from polyformer.domains.rl.model import (ActingStep, BehaviourCloning, BehaviourCloningConfig, DecisionTransformer,
                                         DecisionTransformerConfig)
from polyformer.finetune import FinetuneConfig
from polyformer.training import OptimizerConfig, PolyformerTask
from polyformer.transformer import TransformerConfig


def action_loss(output: Tensor, actions: Tensor, real: Tensor, discrete: bool) -> Tensor:
    """Cross-entropy (discrete) or mean squared error (continuous) over the real (non-padding) steps."""
    if discrete:
        return F.cross_entropy(output[real], actions[real].long())
    return F.mse_loss(output[real], actions[real])


class OfflineRLTask(PolyformerTask):
    """What the DT and BC tasks share: environment spaces, dataset statistics, end-of-fit rollouts."""

    def __init__(self, env_id: str, evaluation: RolloutConfig | None, optimizer: OptimizerConfig | None,
                 init_from: str | None, finetune: FinetuneConfig | None):
        super().__init__(optimizer, init_from=init_from, finetune=finetune)
        self.env_id, self.evaluation = env_id, evaluation
        env = gym.make(env_id)
        self.state_dim, _ = space_dims(env.observation_space, "observation_space", f"environment {env_id}")
        self.action_dim, self.discrete = space_dims(env.action_space, "action_space", f"environment {env_id}")
        self.max_episode_steps = env.spec.max_episode_steps if env.spec is not None else None
        env.close()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.datamodule
        if stage != "fit" or not isinstance(datamodule, OfflineRLDataModule):
            return
        data = datamodule.data
        if data.env_id != self.env_id or (data.state_dim, data.action_dim, data.discrete) != \
                (self.state_dim, self.action_dim, self.discrete):
            raise ValueError(f"dataset {data.name} records {data.env_id} (state {data.state_dim}, action "
                             f"{data.action_dim}, discrete={data.discrete}) but the task acts in {self.env_id} "
                             f"(state {self.state_dim}, action {self.action_dim}, discrete={self.discrete})")
        stats = datamodule.stats
        self.model.normalizer.set(stats.state_mean, stats.state_std, stats.return_scale)

    def rollouts(self, config: RolloutConfig) -> list[dict]:
        raise NotImplementedError

    def on_fit_end(self) -> None:
        if self.evaluation is None or not self.trainer.is_global_zero:
            return
        self.report(self.rollouts(self.evaluation))

    def report(self, rows: list[dict]) -> None:
        """The rollouts' table on stdout and eval.json in the run's folder."""
        print(format_rows(f"{type(self).__name__} on {self.env_id}", rows))
        if self.trainer.log_dir is not None:
            Path(self.trainer.log_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.trainer.log_dir) / "eval.json", "w") as f:
                json.dump(rows, f, indent=1)

    # `polyformer test -c <config> --ckpt_path <ckpt>` evaluates by acting: the rollouts are its test data, and
    # `--model.init_args.evaluation.*` (targets, episodes, seed, sample) set them, not the checkpoint
    inference_fields = ("evaluation",)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        """Rollouts of `evaluation` (the data module's test loader is one placeholder batch): return mean and std per
        target, as test/<name> or, with several targets, test/target_<R>/<name>; the table and eval.json as after a
        fit."""
        rows = self.rollouts(self.evaluation or RolloutConfig())
        for row in rows:
            prefix = "test" if len(rows) == 1 else f"test/target_{row['target']:g}"
            for name in ("return_mean", "return_std", "normalized_mean", "length_mean"):
                if name in row:
                    self.log(f"{prefix}/{name}", row[name], batch_size=1)
        if self.trainer.is_global_zero:
            self.report(rows)


class DecisionTransformerTask(OfflineRLTask):
    """Decision Transformer: loss on the actions only (cross-entropy or MSE), as in the paper."""

    renamed_hparams = {"context": "model.context", "max_ep_len": "model.max_ep_len", "encoder": "model.encoder"}

    def __init__(
        self,
        env_id: str = "CartPole-v1",
        model: DecisionTransformerConfig | None = None,
        evaluation: RolloutConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        init_from: str | None = None,
        finetune: FinetuneConfig | None = None,
        context: int | None = None,
        max_ep_len: int | None = None,
        encoder: TransformerConfig | None = None,
    ):
        """context, max_ep_len, encoder: the flat form of `model` (releases up to 0.1.0), read with a deprecation
        message."""
        super().__init__(env_id, evaluation, optimizer, init_from, finetune)
        c = self.model_config = self.model_argument(model, DecisionTransformerConfig, context=context,
                                                    max_ep_len=max_ep_len, encoder=encoder)
        if self.max_episode_steps is not None and c.max_ep_len < self.max_episode_steps:
            raise ValueError(f"model.max_ep_len={c.max_ep_len} is shorter than {env_id}'s {self.max_episode_steps} "
                             f"steps")
        self.model = DecisionTransformer(self.state_dim, self.action_dim, discrete=self.discrete,
                                         encoder=c.encoder, context=c.context, max_ep_len=c.max_ep_len)

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        output = self.model(batch["returns_to_go"], batch["states"], batch["actions"], batch["timesteps"],
                            batch["padding_mask"])
        real = ~batch["padding_mask"]
        loss = action_loss(output, batch["actions"], real, self.discrete)
        if self.discrete:
            on_epoch = stage != "train"
            accuracy = (output.argmax(-1) == batch["actions"])[real].float().mean()
            self.log(f"{stage}/action_acc", accuracy, on_epoch=on_epoch, batch_size=real.shape[0])
        return loss

    def rollouts(self, config: RolloutConfig) -> list[dict]:
        return evaluate_dt(self.model, self.env_id, config)

    def exportable(self) -> Exportable:
        """The acting step with its KV cache in and out (model.ActingStep): an exported agent acts in O(1) per step.
        Example inputs of length n come with the cache of n steps already acted (random returns, states, actions)."""
        step = ActingStep(self.model).eval()

        def example(batch: int, steps: int) -> tuple[Tensor, ...]:
            keys, values, valid = step.new_cache(batch)
            previous = self.random_actions(batch)
            for t in range(steps + 1):
                inputs = (keys, values, valid, torch.randn(batch) * 100, torch.randn(batch, self.state_dim),
                          torch.full((batch,), t), previous)
                if t == steps:
                    return inputs
                with torch.no_grad():
                    _, keys, values, valid = step(*inputs)
                previous = self.random_actions(batch)

        action = "(batch,) action index" if self.discrete else f"(batch, {self.action_dim})"
        cache = "keys, values (depth, batch, heads, 3·context, head width), valid (batch, 3·context)"
        return Exportable(
            step, ["keys", "values", "valid", "returns_to_go", "state", "timestep", "previous_action"],
            ["action", "new_keys", "new_values", "new_valid"], example, lengths=(0, 5, 40),
            dynamic_axes={"keys": {1: "batch"}, "values": {1: "batch"}},
            description=f"{cache}, returns_to_go (batch,), state (batch, {self.state_dim}), timestep (batch,), "
                        f"previous_action {action} → action output (batch, {self.action_dim}) and the new cache")

    def random_actions(self, batch: int) -> Tensor:
        if self.discrete:
            return torch.randint(0, self.action_dim, (batch,))
        return torch.rand(batch, self.action_dim) * 2 - 1


class BCTask(OfflineRLTask):
    """Behaviour cloning: the MLP imitates every action of the same segments the DT trains on."""

    renamed_hparams = {"hidden": "model.hidden", "depth": "model.depth", "dropout": "model.dropout"}

    def __init__(
        self,
        env_id: str = "CartPole-v1",
        model: BehaviourCloningConfig | None = None,
        evaluation: RolloutConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        init_from: str | None = None,
        finetune: FinetuneConfig | None = None,
        hidden: int | None = None,
        depth: int | None = None,
        dropout: float | None = None,
    ):
        """hidden, depth, dropout: the flat form of `model` (releases up to 0.1.0), read with a deprecation message."""
        super().__init__(env_id, evaluation, optimizer, init_from, finetune)
        c = self.model_config = self.model_argument(model, BehaviourCloningConfig, hidden=hidden, depth=depth,
                                                    dropout=dropout)
        self.model = BehaviourCloning(self.state_dim, self.action_dim, discrete=self.discrete, hidden=c.hidden,
                                      depth=c.depth, dropout=c.dropout)

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        real = ~batch["padding_mask"]
        return action_loss(self.model(batch["states"]), batch["actions"], real, self.discrete)

    def rollouts(self, config: RolloutConfig) -> list[dict]:
        return evaluate_bc(self.model, self.env_id, config)

