"""Offline trajectories from Minari datasets: loading with checks, return-to-go, and segments of K steps.

Every training sample is a segment of `segment` steps starting at a uniformly drawn step of the whole dataset,
which is the DT paper's sampling (an episode ∝ its length, then a uniform start). A segment that runs past its
episode's end is padded on the right and flagged in `padding_mask` (True at padding).

Datasets are read with `minari.load_dataset` from a MINARI_DATASETS_PATH-style root. Nothing is downloaded unless
`download=True`: then a dataset missing from the root comes from Minari's remote (its `MINARI_REMOTE`), or, when
`url` is given, from an archive of the dataset's folder there (checked against `checksum`, unpacked under the root). The root defaults to $POLYFORMER_MINARI_PATH, else <shared data>/rl/minari; the built-in
CartPole dataset (cartpole.py) is generated on first use under <project>/data/minari.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polyformer.domains.rl.cartpole import CARTPOLE_DATASET, ensure_cartpole_dataset, minari_root
from polyformer.data import PROJECT_ROOT, fetch_and_extract, make_loader, shared_data_dir


def default_minari_root() -> Path:
    """$POLYFORMER_MINARI_PATH, else <shared data>/rl/minari (the HalfCheetah-v5 datasets)."""
    if "POLYFORMER_MINARI_PATH" in os.environ:
        return Path(os.environ["POLYFORMER_MINARI_PATH"])
    return shared_data_dir() / "rl" / "minari"


def local_minari_root() -> Path:
    """Where the project writes the datasets it generates itself (git-ignored)."""
    return PROJECT_ROOT / "data" / "minari"


@dataclass
class Episode:
    """One trajectory: states (T s), actions (T a) float or (T) int, rewards (T); T >= 2."""

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def returns_to_go(self) -> np.ndarray:
        """R_t = Σ_{t' >= t} r_t' (undiscounted, as in the DT paper)."""
        return np.cumsum(self.rewards[::-1])[::-1].copy()


@dataclass
class OfflineData:
    """Episodes of one dataset, with what the model needs to know about them."""

    name: str
    env_id: str
    episodes: list[Episode]
    discrete: bool
    state_dim: int
    action_dim: int  # action width, or the number of discrete actions
    ref_min_score: float | None = None
    ref_max_score: float | None = None

    @property
    def returns(self) -> np.ndarray:
        return np.array([float(e.rewards.sum()) for e in self.episodes])

    @property
    def steps(self) -> int:
        return sum(len(e) for e in self.episodes)


def space_dims(space: gym.Space, what: str, source: str) -> tuple[int, bool]:
    """(width or number of actions, discrete?) of a Box or Discrete space."""
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n), True
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return int(space.shape[0]), False
    raise ValueError(f"{source}: {what} must be a 1-D Box or a Discrete space, found {space}")


def check_spaces(name: str, observation_space: gym.Space, action_space: gym.Space,
                 env: gym.Env) -> list[tuple[int, bool]]:
    """A dataset must record the observation and action spaces of the environment it is evaluated in; returns the
    space_dims of its observations and actions."""
    dims = []
    for field, data_space, env_space in (("observation_space", observation_space, env.observation_space),
                                         ("action_space", action_space, env.action_space)):
        data_dims = space_dims(data_space, field, f"dataset {name}")
        env_dims = space_dims(env_space, field, f"environment {env.spec.id if env.spec else env}")
        if data_dims != env_dims:
            raise ValueError(f"dataset {name}: {field} {data_space} does not match the environment's {env_space}")
        dims.append(data_dims)
    return dims


def checked_episode(name: str, index: int, raw, state_dim: int, action_dim: int, discrete: bool) -> Episode:
    """A Minari episode (observations (T + 1, s), actions (T, a) or (T,), rewards (T,)) as an Episode; refuses what
    a model cannot learn from, naming the dataset, the episode and the field."""
    where = f"dataset {name}, episode {index}"
    fields = {}
    for field in ("observations", "actions", "rewards"):
        try:
            fields[field] = np.asarray(getattr(raw, field), dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: field '{field}' must hold numbers ({error})") from None
    actions = fields["actions"]
    rows = {field: len(values) if values.ndim else 0 for field, values in fields.items()}
    steps = rows["actions"]
    if steps < 2:
        raise ValueError(f"{where}: field 'actions' has {steps} step(s); episodes need at least 2")
    if rows["observations"] != steps + 1 or rows["rewards"] != steps:
        raise ValueError(f"{where}: fields disagree on the number of steps: expected 'observations' one row longer "
                         f"than 'actions' and 'rewards' as long, found {rows}")
    shapes = {"observations": (steps + 1, state_dim), "actions": (steps,) if discrete else (steps, action_dim),
              "rewards": (steps,)}
    for field, shape in shapes.items():
        if fields[field].shape != shape:
            raise ValueError(f"{where}: field '{field}' must have shape {shape} for {steps} steps, found "
                             f"{fields[field].shape}")
    for field, values in fields.items():
        with np.errstate(over="ignore"):
            finite = np.isfinite(values.astype(np.float32))  # a value beyond float32's range would become inf
        if not finite.all():
            bad = np.argwhere(~finite)[0].tolist()
            raise ValueError(f"{where}: field '{field}' holds NaN, inf or a value beyond float32 (first at index "
                             f"{bad}: {values[tuple(bad)]})")
    if discrete:
        wrong = (actions != np.round(actions)) | (actions < 0) | (actions >= action_dim)
        if wrong.any():
            step = int(np.flatnonzero(wrong)[0])
            raise ValueError(f"{where}: field 'actions' must hold action numbers 0..{action_dim - 1}, found "
                             f"{actions[step]} at step {step}")
    return Episode(states=fields["observations"][:steps].astype(np.float32),  # the final observation is dropped
                   actions=actions.astype(np.int64) if discrete else actions.astype(np.float32),
                   rewards=fields["rewards"].astype(np.float32))


def episodes_from_minari(name: str, raw_episodes, state_dim: int, action_dim: int, discrete: bool) -> list[Episode]:
    episodes = [checked_episode(name, index, raw, state_dim, action_dim, discrete)
                for index, raw in enumerate(raw_episodes)]
    if not episodes:
        raise ValueError(f"dataset {name}: holds no episodes")
    return episodes


def download_archive(dataset: str, root: Path, url: str, checksum: str | None) -> None:
    """Fetches an archive holding <dataset>/data/... (a Minari root's folder of the dataset) and unpacks it in root."""
    if checksum is None:
        raise ValueError(f"dataset {dataset}: url {url} given without a checksum ('<kind>:<hex>'); an archive is "
                         f"only unpacked once its checksum matches")
    fetch_and_extract(url, checksum, root)
    if not (root / dataset / "data").is_dir():
        raise ValueError(f"{url}: unpacked under {root}, but it holds no {dataset}/data/ folder")


def load_offline_data(dataset: str, env_id: str | None = None, *, root: str | Path | None = None,
                      download: bool = False, url: str | None = None, checksum: str | None = None) -> OfflineData:
    """Loads and checks a Minari dataset; env_id defaults to the environment the dataset records."""
    import minari


    if dataset == CARTPOLE_DATASET:
        root = Path(root) if root is not None else local_minari_root()
        ensure_cartpole_dataset(root)
    root = Path(root) if root is not None else default_minari_root()
    folder = root / dataset / "data"
    if download and url is not None and not folder.is_dir():
        download_archive(dataset, root, url, checksum)
    if not download and not folder.is_dir():
        # checked before Minari looks: its lookup creates the root folder (and its parents) even when it finds nothing
        raise FileNotFoundError(f"dataset {dataset} is not under the Minari root {root} (set "
                                f"POLYFORMER_MINARI_PATH or the data module's root, or download: true to fetch it "
                                f"from Minari's remote or from url): no folder {folder}")
    with minari_root(root):
        try:
            data = minari.load_dataset(dataset, download=download)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"dataset {dataset} is not under the Minari root {root} (set "
                                    f"POLYFORMER_MINARI_PATH or the data module's root): {error}") from None
    recorded_env = data.spec.env_spec.id if data.spec.env_spec is not None else None
    env_id = env_id or recorded_env
    if env_id is None:
        raise ValueError(f"dataset {dataset} records no environment; pass env_id")
    env = gym.make(env_id)
    try:
        (state_dim, _), (action_dim, discrete) = check_spaces(dataset, data.observation_space, data.action_space, env)
    finally:
        env.close()
    metadata = data.storage.metadata
    return OfflineData(
        name=dataset, env_id=env_id,
        episodes=episodes_from_minari(dataset, data.iterate_episodes(), state_dim, action_dim, discrete),
        discrete=discrete, state_dim=state_dim, action_dim=action_dim,
        ref_min_score=metadata.get("ref_min_score"), ref_max_score=metadata.get("ref_max_score"),
    )


class SegmentDataset(Dataset):
    """Item i: the segment of `segment` steps starting at the i-th step of the concatenated episodes."""

    def __init__(self, episodes: list[Episode], segment: int):
        if segment < 1:
            raise ValueError(f"segment must be at least 1 step, found {segment}")
        self.episodes, self.segment = episodes, segment
        self.rtg = [e.returns_to_go for e in episodes]
        lengths = np.array([len(e) for e in episodes])
        self.episode_of = np.repeat(np.arange(len(episodes)), lengths)
        self.start_of = np.concatenate([np.arange(n) for n in lengths])

    def __len__(self) -> int:
        return len(self.episode_of)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        episode = self.episodes[self.episode_of[index]]
        start = int(self.start_of[index])
        stop = min(start + self.segment, len(episode))
        real, pad = stop - start, self.segment - (stop - start)

        def padded(values: np.ndarray) -> Tensor:
            values = values[start:stop]
            return torch.from_numpy(np.concatenate((values, np.zeros((pad,) + values.shape[1:], values.dtype))))

        return {
            "states": padded(episode.states),  # (k s)
            "actions": padded(episode.actions),  # (k a) or (k)
            "returns_to_go": padded(self.rtg[self.episode_of[index]]),  # (k)
            "timesteps": torch.arange(start, start + self.segment).clamp(max=len(episode) - 1),  # (k)
            "padding_mask": torch.arange(self.segment) >= real,  # (k) True at padding
        }


def best_episodes(episodes: list[Episode], fraction: float) -> list[Episode]:
    """The highest-return episodes, best first, until they hold `fraction` of all steps (at least one episode)."""
    ranked = sorted(episodes, key=lambda e: float(e.rewards.sum()), reverse=True)
    wanted, kept, steps = fraction * sum(len(e) for e in episodes), [], 0
    for episode in ranked:
        if kept and steps >= wanted:
            break
        kept.append(episode)
        steps += len(episode)
    return kept


@dataclass
class DataStats:
    """What a model stores about its training data."""

    state_mean: Tensor
    state_std: Tensor
    return_scale: float


class OfflineRLDataModule(L.LightningDataModule):
    """Segments of a Minari dataset's episodes; a seeded fraction of whole episodes held out for validation."""

    def __init__(
        self,
        dataset: str = "polyformer/cartpole/mixed-v0",  # a Minari id; this one is generated on first use
        env_id: str | None = None,  # default: the environment the dataset records
        root: str | None = None,  # a MINARI_DATASETS_PATH root; see default_minari_root()
        segment: int = 20,  # steps per training sample (K)
        reward_scale: float = 1000.0,  # returns-to-go are divided by it before embedding
        batch_size: int = 64,
        val_fraction: float = 0.0,  # whole episodes held out for a validation loss
        num_workers: int = 0,
        seed: int = 0,  # which episodes are held out
        download: bool = False,  # fetch a dataset that is not under root: from url if given, else Minari's remote
        url: str | None = None,  # an archive (tar.gz, zip) holding <dataset>/data/..., e.g. a mirror
        checksum: str | None = None,  # the archive's "<kind>:<hex>" (polyformer.data.fetch)
        top_fraction: float = 1.0,  # the DT paper's %BC: train on the best episodes holding this share of the steps
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), found {val_fraction}")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], found {top_fraction}")
        if reward_scale <= 0:
            raise ValueError(f"reward_scale must be positive, found {reward_scale}")
        if segment < 1:
            raise ValueError(f"segment must be at least 1 step, found {segment}")
        self.dataset, self.env_id, self.root, self.download = dataset, env_id, root, download
        self.url, self.checksum = url, checksum
        self.segment, self.reward_scale, self.batch_size = segment, reward_scale, batch_size
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.top_fraction = top_fraction
        self.data: OfflineData | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = load_offline_data(self.dataset, self.env_id, root=self.root, download=self.download,
                                      url=self.url, checksum=self.checksum)
        order = np.random.default_rng(self.seed).permutation(len(self.data.episodes))
        n_val = int(round(self.val_fraction * len(order)))
        self.val_episodes = [self.data.episodes[i] for i in sorted(order[:n_val])]
        self.train_episodes = [self.data.episodes[i] for i in sorted(order[n_val:])]
        if not self.train_episodes:
            raise ValueError(f"dataset {self.dataset}: val_fraction={self.val_fraction} holds out all "
                             f"{len(order)} episodes; none is left to train on")
        if self.top_fraction < 1.0:
            self.train_episodes = best_episodes(self.train_episodes, self.top_fraction)
        states = np.concatenate([e.states for e in self.train_episodes])
        self.stats = DataStats(state_mean=torch.from_numpy(states.mean(0)),
                               state_std=torch.from_numpy(states.std(0) + 1e-6), return_scale=self.reward_scale)

    def train_dataloader(self):
        return make_loader(SegmentDataset(self.train_episodes, self.segment), batch_size=self.batch_size,
                           shuffle=True, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self):
        if not self.val_episodes:
            return []
        return make_loader(SegmentDataset(self.val_episodes, self.segment), batch_size=self.batch_size,
                           shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self):
        """Offline RL is tested in its environment, not on data: one placeholder batch, on which the task runs its
        rollouts (OfflineRLTask.test_step)."""
        return make_loader([0], batch_size=1)
