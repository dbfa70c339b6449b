"""Offline RL data under bad input, tried systematically (hypothesis): one defect in a good episode (NaN or inf,
wrong shapes, length 0 or 1, impossible discrete actions, values beyond float32, non-numbers), checked episode by
episode, and end to end through Minari datasets written in tmp_path. Every case ends in a ValueError naming the
dataset, the episode and the field; docs/reliability.md lists the cases and what each gives."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyformer.domains.rl.cartpole import collect_cartpole
from polyformer.domains.rl.cartpole import minari_root
from polyformer.domains.rl.data import OfflineRLDataModule, episodes_from_minari, load_offline_data

# deterministic runs of a stated size: the counts in docs/reliability.md are these max_examples
BAD_INPUT = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELDS = ["observations", "actions", "rewards"]
DEFECTS = ["nan", "inf", "beyond_float32", "extra_row", "missing_row", "wrong_width", "extra_axis", "length_0",
           "length_1", "fractional_action", "action_out_of_range", "not_numbers"]


Dims = tuple[int, int, bool]  # state_dim, action_dim, discrete


@st.composite
def dims(draw, discrete: bool | None = None) -> Dims:
    return draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.booleans()) if discrete is None else discrete


@st.composite
def good_episode(draw, shape: Dims) -> dict[str, np.ndarray]:
    """observations (T + 1, s), actions (T, a) or (T,) action numbers, rewards (T,)."""
    (state_dim, action_dim, discrete), steps = shape, draw(st.integers(2, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return {"observations": rng.normal(size=(steps + 1, state_dim)),
            "actions": rng.integers(0, action_dim, steps) if discrete else rng.uniform(-1, 1, (steps, action_dim)),
            "rewards": rng.normal(size=steps)}


@st.composite
def episode_with_one_defect(draw, defect: str, shape: Dims) -> tuple[dict, str]:
    """A good episode but for one defect, and what the message must say about it."""
    fields = draw(good_episode(shape))
    action_dim = shape[1]
    field = "actions" if defect in ("length_0", "length_1", "fractional_action", "action_out_of_range") else \
        draw(st.sampled_from(FIELDS))
    values = np.array(fields[field], dtype=np.float64)
    index = tuple(draw(st.integers(0, n - 1)) for n in values.shape)
    says = f"field '{field}'"
    if defect in ("nan", "inf", "beyond_float32"):
        values[index] = {"nan": np.nan, "inf": draw(st.sampled_from([np.inf, -np.inf])),
                         "beyond_float32": draw(st.floats(3.5e38, 1e308)) * draw(st.sampled_from([1, -1]))}[defect]
    elif defect in ("extra_row", "missing_row"):  # e.g. observations without the final one, an action too many
        values = np.concatenate([values, values[:1]]) if defect == "extra_row" else values[:-1]
        says = "fields disagree on the number of steps: expected 'observations' one row longer than 'actions'"
    elif defect == "wrong_width":
        values = values.reshape(len(values), -1)
        values = np.concatenate([values, values[:, :1]], axis=1)
    elif defect == "extra_axis":
        values = values[..., None]
    elif defect in ("length_0", "length_1"):
        steps = int(defect[-1])
        fields["observations"], fields["rewards"] = fields["observations"][: steps + 1], fields["rewards"][:steps]
        values = values[:steps]
    elif defect == "fractional_action":
        values[index] += draw(st.floats(0.01, 0.99))
    elif defect == "action_out_of_range":
        values[index] = draw(st.sampled_from([-1, action_dim, action_dim + 7, -1000]))
    if defect == "not_numbers":
        fields[field] = draw(st.sampled_from([np.full(values.shape, "x", dtype=object), [None] * len(values),
                                              np.array(["1.0"] + ["a"] * (len(values) - 1))]))
    else:
        fields[field] = values
    return fields, says


@pytest.mark.parametrize("defect", DEFECTS)
@settings(max_examples=25, **BAD_INPUT)
@given(data=st.data())
def test_one_defect_in_an_episode_is_an_error_naming_dataset_episode_and_field(defect, data):
    shape = data.draw(dims(True if defect in ("fractional_action", "action_out_of_range") else None))
    episodes = [SimpleNamespace(**data.draw(good_episode(shape))) for _ in range(data.draw(st.integers(0, 3)))]
    fields, says = data.draw(episode_with_one_defect(defect, shape))
    episodes.append(SimpleNamespace(**fields))
    with pytest.raises(ValueError) as error:
        episodes_from_minari("test/bad-v0", episodes, *shape)
    assert f"dataset test/bad-v0, episode {len(episodes) - 1}: {says}" in str(error.value), str(error.value)


@settings(max_examples=50, **BAD_INPUT)
@given(data=st.data())
def test_a_good_episode_is_kept_whole(data):
    shape = data.draw(dims())
    fields = data.draw(good_episode(shape))
    (kept,) = episodes_from_minari("test/good-v0", [SimpleNamespace(**fields)], *shape)
    np.testing.assert_allclose(kept.states, fields["observations"][:-1], rtol=1e-6)
    np.testing.assert_array_equal(kept.actions, fields["actions"].astype(kept.actions.dtype))
    np.testing.assert_allclose(kept.rewards, fields["rewards"], rtol=1e-6)
    assert kept.actions.dtype == (np.int64 if shape[2] else np.float32)


def write_cartpole(root: Path, name: str, buffers) -> None:
    import minari
    from minari.data_collector import EpisodeBuffer

    with minari_root(root):
        minari.create_dataset_from_buffers(name, [EpisodeBuffer(id=i, **b) for i, b in enumerate(buffers)],
                                           env="CartPole-v1", eval_env="CartPole-v1", algorithm_name="test")


MINARI_DEFECTS = {"nan": "observations", "inf": "rewards", "action_out_of_range": "actions",
                  "fractional_action": "actions"}


@pytest.mark.parametrize("defect", sorted(MINARI_DEFECTS))
@settings(max_examples=5, **BAD_INPUT)
@given(data=st.data())
def test_a_bad_minari_dataset_is_an_error_naming_dataset_episode_and_field(tmp_path, defect, data):
    buffers = collect_cartpole(3, seed=data.draw(st.integers(0, 100)))
    victim = data.draw(st.integers(0, 2))
    field = MINARI_DEFECTS[defect]
    values = np.asarray(buffers[victim][field], dtype=np.float64)
    step = data.draw(st.integers(0, len(values) - 1))
    if defect == "nan":
        values[step, data.draw(st.integers(0, 3))] = np.nan
    elif defect == "inf":
        values[step] = np.inf
    elif defect == "action_out_of_range":
        values[step] = data.draw(st.sampled_from([2, 5, -1]))
    else:
        values[step] = 0.5
    buffers[victim][field] = values
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    write_cartpole(root, "test/cartpole/bad-v0", buffers)
    with pytest.raises(ValueError, match=f"dataset test/cartpole/bad-v0, episode {victim}: field '{field}'"):
        load_offline_data("test/cartpole/bad-v0", root=root)


def test_holding_out_every_episode_is_an_error_naming_val_fraction(tmp_path):
    write_cartpole(tmp_path, "test/cartpole/two-v0", collect_cartpole(2, seed=1))
    data = OfflineRLDataModule("test/cartpole/two-v0", root=str(tmp_path), val_fraction=0.9)
    with pytest.raises(ValueError, match=r"test/cartpole/two-v0: val_fraction=0.9 holds out all 2 episodes"):
        data.setup("fit")
