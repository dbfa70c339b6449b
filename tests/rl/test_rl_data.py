"""Offline data: segments, return-to-go, padding, the CartPole mix, the shared HalfCheetah data and bad input."""

from __future__ import annotations

import os
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from polyformer.data import shared_data_dir
from polyformer.domains.rl.cartpole import collect_cartpole, controller
from polyformer.domains.rl.data import (Episode, OfflineRLDataModule, SegmentDataset, best_episodes,
                                        load_offline_data, minari_root)
from polyformer.domains.rl.evaluate import d4rl_normalized

MINARI_ROOT = Path(os.environ.get("POLYFORMER_MINARI_PATH", shared_data_dir() / "rl" / "minari"))
MEDIUM = "polyformer/halfcheetah/medium-v0"
needs_halfcheetah = pytest.mark.skipif(not (MINARI_ROOT / MEDIUM / "data").exists(),
                                       reason=f"shared Minari data not found under {MINARI_ROOT} "
                                              f"(set POLYFORMER_MINARI_PATH)")


def test_rl_segments_returns_to_go_and_padding():
    episodes = [Episode(np.arange(8, dtype=np.float32).reshape(4, 2), np.arange(4), np.array([1, 2, 3, 4.0])),
                Episode(np.zeros((2, 2), np.float32), np.zeros(2, np.int64), np.array([5, 6.0]))]
    data = SegmentDataset(episodes, segment=3)
    assert len(data) == 6  # one sample per step: episodes are drawn ∝ their length
    first = data[0]
    assert first["returns_to_go"].tolist() == [10, 9, 7]
    assert first["timesteps"].tolist() == [0, 1, 2] and not first["padding_mask"].any()
    tail = data[3]  # starts at the last step of episode 0: one real step, two padded
    assert tail["returns_to_go"].tolist() == [4, 0, 0]
    assert tail["padding_mask"].tolist() == [False, True, True]
    assert tail["states"][0].tolist() == [6, 7] and tail["states"][1:].abs().sum() == 0
    assert data[5]["returns_to_go"][0] == 6 and data[5]["timesteps"].tolist() == [1, 1, 1]


def test_rl_best_episodes_keep_the_top_share_of_steps():
    def episode(steps: int, reward: float) -> Episode:
        return Episode(np.zeros((steps, 2), np.float32), np.zeros(steps, np.int64), np.full(steps, reward))

    low, high, mid = episode(10, 0.0), episode(10, 1.0), episode(20, 0.5)
    assert best_episodes([low, high, mid], 0.25) == [high]  # 10 of 40 steps
    assert best_episodes([low, high, mid], 0.5) == [high, mid]  # 10 < 20 steps, so the next episode joins
    assert best_episodes([low, high, mid], 0.01) == [high]  # never empty
    assert best_episodes([low, high, mid], 1.0) == [high, mid, low]
    with pytest.raises(ValueError, match="top_fraction must be in"):
        OfflineRLDataModule(top_fraction=0.0)


def test_rl_cartpole_mix_is_below_the_maximum():
    """The controller alone balances for 500 steps; the default mix averages well below that (≤ 250)."""
    env = gym.make("CartPole-v1")
    observation, _ = env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        observation, reward, terminated, truncated, _ = env.step(controller(observation))
        total, done = total + reward, terminated or truncated
    assert total == 500
    returns = np.array([b["rewards"].sum() for b in collect_cartpole(60, seed=1)])
    assert returns.max() == 500 and returns.min() < 50 and returns.mean() <= 250


def write_cartpole(root: Path, name: str, buffers) -> None:
    import minari
    from minari.data_collector import EpisodeBuffer

    with minari_root(root):
        minari.create_dataset_from_buffers(name, [EpisodeBuffer(id=i, **b) for i, b in enumerate(buffers)],
                                           env="CartPole-v1", eval_env="CartPole-v1", algorithm_name="test")


@pytest.mark.parametrize("defect, message", [
    ("nan_observation", r"episode 1: field 'observations' holds NaN"),
    ("nan_reward", r"episode 1: field 'rewards' holds NaN"),
    ("one_step", r"episode 1: field 'actions' has 1 step"),
])
def test_rl_bad_episodes_name_dataset_and_field(tmp_path, defect, message):
    buffers = collect_cartpole(3, seed=2)
    if defect == "nan_observation":
        buffers[1]["observations"][3, 2] = np.nan
    elif defect == "nan_reward":
        buffers[1]["rewards"][2] = np.nan
    else:
        buffers[1] = {key: value[:2] if key == "observations" else value[:1] for key, value in buffers[1].items()}
        buffers[1]["truncations"][:] = True
    write_cartpole(tmp_path, "test/cartpole/bad-v0", buffers)
    with pytest.raises(ValueError, match=f"dataset test/cartpole/bad-v0, {message}"):
        load_offline_data("test/cartpole/bad-v0", root=tmp_path)


def test_rl_dataset_env_mismatch_names_the_field(tmp_path):
    write_cartpole(tmp_path, "test/cartpole/ok-v0", collect_cartpole(2, seed=3))
    data = load_offline_data("test/cartpole/ok-v0", root=tmp_path)
    assert data.discrete and (data.state_dim, data.action_dim) == (4, 2) and data.env_id == "CartPole-v1"
    with pytest.raises(ValueError, match=r"dataset test/cartpole/ok-v0: observation_space .* does not match"):
        load_offline_data("test/cartpole/ok-v0", "Acrobot-v1", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="test/cartpole/missing-v0 is not under the Minari root"):
        load_offline_data("test/cartpole/missing-v0", root=tmp_path)


def test_rl_failed_lookup_creates_nothing(tmp_path):
    root = tmp_path / "minari" / "datasets"  # Minari's own lookup would create this folder and its parent
    with pytest.raises(FileNotFoundError, match=re.escape(f"no folder {root / 'test/cartpole/missing-v0/data'}")):
        load_offline_data("test/cartpole/missing-v0", root=root)
    assert list(tmp_path.iterdir()) == []


@needs_halfcheetah
def test_rl_halfcheetah_medium_matches_its_readme():
    """100 episodes of 1,000 steps, return 4,759.7 on average, D4RL-normalised 40.6 (Minari agrees)."""
    import minari

    data = load_offline_data(MEDIUM, root=MINARI_ROOT)
    assert (len(data.episodes), data.steps, data.state_dim, data.action_dim) == (100, 100_000, 17, 6)
    assert not data.discrete and data.env_id == "HalfCheetah-v5"
    assert data.returns.mean() == pytest.approx(4759.7, abs=0.1)
    normalized = d4rl_normalized("HalfCheetah-v5", data.returns).mean()
    assert normalized == pytest.approx(40.6, abs=0.05)
    with minari_root(MINARI_ROOT):
        dataset = minari.load_dataset(MEDIUM)
    assert 100 * minari.get_normalized_score(dataset, data.returns).mean() == pytest.approx(normalized, abs=1e-4)
    sample = SegmentDataset(data.episodes, 20)[999]  # the last step of episode 0
    assert sample["padding_mask"].sum() == 19 and sample["returns_to_go"][0] == pytest.approx(
        float(data.episodes[0].rewards[-1]))
    assert torch.is_floating_point(sample["actions"]) and sample["actions"].shape == (20, 6)
