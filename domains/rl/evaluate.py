"""Gymnasium rollouts of trained policies, conditioned on target returns, with D4RL-normalised scores.

The Decision Transformer is told a target return R_0; after each reward r_t the return-to-go it is conditioned on
becomes R_{t+1} = R_t − r_t (the DT paper's protocol). All episodes of all targets run as one batch, in lockstep:
episode i of every target resets with seed `seed + i`, so targets are compared on the same starts.

    polyformer test -c configs/rl/dt_cartpole.yaml --ckpt_path runs/rl/dt_cartpole/version_0/checkpoints/last.ckpt \
        --model.init_args.evaluation.targets='[50, 100, 200, 300, 400, 500]' --model.init_args.evaluation.episodes=20

(`OfflineRLTask.test_step`; the table on stdout, eval.json in the test run's folder, test/<target>/return_mean in its
metrics). `python -m polyformer.domains.rl.evaluate CKPT --targets ...` does the same without a config; it is
deprecated and goes in the next release.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from polyformer.domains.rl.model import BehaviourCloning, DecisionTransformer
from polyformer.training import eval_mode, load_task

# D4RL's reference returns (random policy, expert policy) from d4rl/infos.py (Fu et al. 2020,
# https://github.com/Farama-Foundation/D4RL/blob/master/d4rl/infos.py, REF_MIN_SCORE / REF_MAX_SCORE).
D4RL_REFERENCE = {
    "HalfCheetah": (-280.178953, 12135.0),
    "Hopper": (-20.272305, 3234.3),
    "Walker2d": (1.629008, 4592.3),
}


def d4rl_normalized(env_id: str, returns: np.ndarray) -> np.ndarray | None:
    """100 · (R − random) / (expert − random) for D4RL's MuJoCo tasks; None for other environments."""
    family = env_id.split("-")[0]
    if family not in D4RL_REFERENCE:
        return None
    low, high = D4RL_REFERENCE[family]
    return 100.0 * (np.asarray(returns, dtype=np.float64) - low) / (high - low)


@dataclass
class RolloutConfig:
    """How a trained policy is evaluated at the end of training (targets are fixed here, before evaluation)."""

    targets: list[float] = field(default_factory=lambda: [500.0])  # target returns R_0 (the DT only)
    episodes: int = 10  # episodes per target
    seed: int = 10_000  # episode i resets with seed + i; the generated datasets use seeds below 10,000
    sample: bool = False  # discrete actions: sample from the softmax (DT's Atari protocol) instead of argmax
    cache: bool = True  # DT acts with the KV cache (False: recompute the context every step; same actions)


def choose(output: Tensor, discrete: bool, sample: bool, generator: torch.Generator) -> Tensor:
    """Action from the model output: a categorical draw or argmax of logits, or the (tanh'd) continuous action."""
    if not discrete:
        return output
    if sample:
        return torch.multinomial(output.float().softmax(-1).cpu(), 1, generator=generator)[:, 0].to(output.device)
    return output.argmax(-1)


class DTPolicy:
    """Acts with a Decision Transformer for a batch of episodes, one target return per episode."""

    def __init__(self, model: DecisionTransformer, targets: Tensor, *, cache: bool = True, sample: bool = False,
                 seed: int = 0, recompute_steps: int | None = None):
        """recompute_steps (without the cache): steps of history each action recomputes; default the model's
        receptive field (the cache's actions exactly); `model.context` is the DT paper's re-cut context."""
        self.model, self.sample = model, sample
        self.recompute_steps = recompute_steps or model.receptive_steps
        if self.recompute_steps < 2:
            raise ValueError(f"recompute_steps must be at least 2, found {self.recompute_steps}")
        self.device = next(model.parameters()).device
        self.returns_to_go = targets.float().to(self.device)  # (b)
        self.cache = model.new_cache() if cache else None
        self.generator = torch.Generator().manual_seed(seed)
        self.t = 0
        self.previous_action: Tensor | None = None
        self.history: dict[str, list[Tensor]] = {"returns_to_go": [], "states": [], "actions": [], "timesteps": []}

    @torch.no_grad()
    def act(self, observation: Tensor) -> Tensor:
        """observation (b s) → action (b a) or (b)."""
        b = observation.shape[0]
        state = observation.float().to(self.device)
        timestep = torch.full((b,), min(self.t, self.model.max_ep_len - 1), device=self.device)
        if self.cache is not None:
            output = self.model.step(self.cache, self.returns_to_go, state, timestep, self.previous_action)
        else:
            output = self.recompute(state, timestep)
        action = choose(output, self.model.discrete, self.sample, self.generator)
        self.previous_action = action
        if self.cache is None:
            self.history["actions"].append(action)
        self.t += 1
        return action

    def recompute(self, state: Tensor, timestep: Tensor) -> Tensor:
        """A full forward over the last recompute_steps steps (by default those an action can depend on: exact,
        older steps are out of its reach)."""
        keep = self.recompute_steps
        for key, value in (("returns_to_go", self.returns_to_go), ("states", state), ("timesteps", timestep)):
            self.history[key] = (self.history[key] + [value])[-keep:]
        self.history["actions"] = self.history["actions"][-(keep - 1):]  # one fewer than states (keep >= 2)
        # the current action is unknown: a placeholder, which the causal mask hides from the state token before it
        placeholder = torch.zeros(state.shape[0], dtype=torch.long, device=self.device) if self.model.discrete \
            else state.new_zeros(state.shape[0], self.model.action_dim)
        actions = self.history["actions"] + [placeholder]
        return self.model(
            torch.stack(self.history["returns_to_go"], dim=1), torch.stack(self.history["states"], dim=1),
            torch.stack(actions, dim=1), torch.stack(self.history["timesteps"], dim=1),
        )[:, -1]

    def observe(self, reward: Tensor) -> None:
        self.returns_to_go = self.returns_to_go - reward.float().to(self.device)


class CacheTensorPolicy:
    """Acts with a DT acting step that takes and returns its KV cache as tensors (model.ActingStep, or the graph
    exported from it: `polyformer export`, polyformer.deploy.OnnxModel)."""

    def __init__(self, step: Callable, cache: tuple[Tensor, ...], targets: Tensor, *, discrete: bool,
                 action_dim: int, sample: bool = False, seed: int = 0):
        self.step, self.cache, self.discrete, self.sample = step, cache, discrete, sample
        self.returns_to_go = targets.float()
        b = len(targets)
        self.previous_action = torch.zeros(b, dtype=torch.long) if discrete else torch.zeros(b, action_dim)
        self.generator = torch.Generator().manual_seed(seed)
        self.t = 0

    @torch.no_grad()
    def act(self, observation: Tensor) -> Tensor:
        timestep = torch.full((observation.shape[0],), self.t, dtype=torch.long)
        output, *cache = self.step(*self.cache, self.returns_to_go, observation.float(), timestep,
                                   self.previous_action)
        self.cache = tuple(cache)
        action = choose(output, self.discrete, self.sample, self.generator)
        self.previous_action, self.t = action, self.t + 1
        return action

    def observe(self, reward: Tensor) -> None:
        self.returns_to_go = self.returns_to_go - reward.float()


class BCPolicy:
    """Acts with the behaviour-cloning MLP; ignores target returns."""

    def __init__(self, model: BehaviourCloning, *, sample: bool = False, seed: int = 0):
        self.model, self.sample = model, sample
        self.device = next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def act(self, observation: Tensor) -> Tensor:
        return choose(self.model(observation.float().to(self.device)), self.model.discrete, self.sample,
                      self.generator)

    def observe(self, reward: Tensor) -> None:
        pass


def run_episodes(policy, env_id: str, seeds: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Runs len(seeds) episodes in lockstep; returns their returns, lengths and the seconds per policy step."""
    envs = [gym.make(env_id) for _ in seeds]
    observations = np.stack([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)])
    returns, lengths = np.zeros(len(seeds)), np.zeros(len(seeds), dtype=np.int64)
    done = np.zeros(len(seeds), dtype=bool)
    acting, steps = 0.0, 0
    while not done.all():
        start = time.perf_counter()
        actions = policy.act(torch.from_numpy(observations)).cpu().numpy()
        acting, steps = acting + time.perf_counter() - start, steps + 1
        rewards = np.zeros(len(seeds))
        for i, env in enumerate(envs):
            if done[i]:
                continue  # a finished episode keeps feeding its last observation; its actions are ignored
            observations[i], rewards[i], terminated, truncated, _ = env.step(actions[i])
            returns[i] += rewards[i]
            lengths[i] += 1
            done[i] = terminated or truncated
        policy.observe(torch.from_numpy(rewards))
    for env in envs:
        env.close()
    return returns, lengths, acting / max(1, steps)


def summarize(env_id: str, target: float | None, returns: np.ndarray, lengths: np.ndarray) -> dict:
    row = {"target": target, "episodes": len(returns), "return_mean": float(returns.mean()),
           "return_std": float(returns.std()), "length_mean": float(lengths.mean()), "returns": returns.tolist()}
    normalized = d4rl_normalized(env_id, returns)
    if normalized is not None:
        row["normalized_mean"], row["normalized_std"] = float(normalized.mean()), float(normalized.std())
    return row


def evaluate_dt(model: DecisionTransformer, env_id: str, config: RolloutConfig) -> list[dict]:
    """One row per target: mean ± std return (and D4RL-normalised score) over config.episodes episodes."""
    targets = torch.tensor(config.targets, dtype=torch.float32).repeat_interleave(config.episodes)
    seeds = [config.seed + i for i in range(config.episodes)] * len(config.targets)
    with eval_mode(model):
        policy = DTPolicy(model, targets, cache=config.cache, sample=config.sample, seed=config.seed)
        returns, lengths, seconds = run_episodes(policy, env_id, seeds)
    return rows_per_target(env_id, config, returns, lengths, seconds)


def rows_per_target(env_id: str, config: RolloutConfig, returns: np.ndarray, lengths: np.ndarray,
                    seconds: float) -> list[dict]:
    """One summary row per target of episodes run target after target, config.episodes each."""
    rows = []
    for i, target in enumerate(config.targets):
        part = slice(i * config.episodes, (i + 1) * config.episodes)
        rows.append(summarize(env_id, target, returns[part], lengths[part]) | {"seconds_per_step": seconds})
    return rows


def evaluate_acting_step(step: Callable, cache: Callable[[int], tuple[Tensor, ...]], env_id: str, *, discrete: bool,
                         action_dim: int, config: RolloutConfig) -> list[dict]:
    """evaluate_dt's rows for an acting step with the cache as tensors; cache(batch) makes an empty one."""
    targets = torch.tensor(config.targets, dtype=torch.float32).repeat_interleave(config.episodes)
    seeds = [config.seed + i for i in range(config.episodes)] * len(config.targets)
    policy = CacheTensorPolicy(step, cache(len(targets)), targets, discrete=discrete, action_dim=action_dim,
                               sample=config.sample, seed=config.seed)
    return rows_per_target(env_id, config, *run_episodes(policy, env_id, seeds))


def evaluate_bc(model: BehaviourCloning, env_id: str, config: RolloutConfig) -> list[dict]:
    with eval_mode(model):
        returns, lengths, seconds = run_episodes(BCPolicy(model, sample=config.sample, seed=config.seed), env_id,
                                                 [config.seed + i for i in range(config.episodes)])
    return [summarize(env_id, None, returns, lengths) | {"seconds_per_step": seconds}]


def format_rows(name: str, rows: list[dict]) -> str:
    lines = [f"{name}: target | return mean ± std | D4RL-normalised | mean length"]
    for row in rows:
        target = "-" if row["target"] is None else f"{row['target']:g}"
        normalized = f"{row['normalized_mean']:.1f} ± {row['normalized_std']:.1f}" if "normalized_mean" in row \
            else "-"
        lines.append(f"  {target:>8} | {row['return_mean']:9.1f} ± {row['return_std']:7.1f} | {normalized:>12} | "
                     f"{row['length_mean']:.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Deprecated (one more release): `polyformer test -c <config> --ckpt_path <ckpt>
    --model.init_args.evaluation.targets=[...]` evaluates a checkpoint the way every domain is tested."""
    warnings.warn("python -m polyformer.domains.rl.evaluate is deprecated and will be removed: run `polyformer test -c "
                  "<config> --ckpt_path <ckpt>` (--model.init_args.evaluation.targets / episodes / seed / sample)",
                  DeprecationWarning, stacklevel=2)
    parser = argparse.ArgumentParser(description="Evaluate a DT or BC checkpoint in its gymnasium environment.")
    parser.add_argument("checkpoint")
    parser.add_argument("--targets", type=float, nargs="+", help="target returns (default: the task's config)")
    parser.add_argument("--episodes", type=int, help="episodes per target (default: the task's config)")
    parser.add_argument("--seed", type=int, help="first episode seed (default: the task's config)")
    parser.add_argument("--sample", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    task = load_task(args.checkpoint)
    config = task.evaluation or RolloutConfig()
    for key in ("targets", "episodes", "seed", "sample"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    rows = task.rollouts(config)
    print(format_rows(f"{type(task).__name__} on {task.env_id}", rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
