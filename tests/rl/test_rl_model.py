"""Decision Transformer: KV-cached acting equals a full causal forward; shapes, losses and masks behave."""

from __future__ import annotations

import pytest
import torch

from polyformer.domains.rl.evaluate import DTPolicy
from polyformer.domains.rl.model import BehaviourCloning, DecisionTransformer
from polyformer.transformer import TransformerConfig


def tiny_dt(discrete: bool, context: int = 4, depth: int = 2) -> DecisionTransformer:
    torch.manual_seed(0)
    encoder = TransformerConfig(dim=32, depth=depth, heads=2, activation="relu")
    model = DecisionTransformer(5, 3, discrete=discrete, encoder=encoder, context=context, max_ep_len=64)
    model.normalizer.set(torch.randn(5), torch.rand(5) + 0.5, 10.0)
    return model.eval()


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("cache", [True, False])
def test_rl_acting_equals_full_forward(discrete: bool, cache: bool):
    """Acting step by step (KV cache, or recomputing its reach) gives the actions of one causal forward over the
    whole episode, also after the window (3·context tokens) has rolled over several times."""
    model = tiny_dt(discrete)
    b, steps = 3, 25  # 25 steps = 75 tokens, the window is 12 tokens
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(b, steps, 5, generator=generator)
    rewards = torch.rand(b, steps, generator=generator)
    targets = torch.tensor([5.0, 10.0, 20.0])
    policy = DTPolicy(model, targets, cache=cache)
    outputs, actions = [], []
    for t in range(steps):
        if cache:
            timestep = torch.full((b,), t)
            outputs.append(model.step(policy.cache, policy.returns_to_go, states[:, t], timestep,
                                      policy.previous_action))
            policy.previous_action = outputs[-1].argmax(-1) if discrete else outputs[-1]
            policy.t += 1
            actions.append(policy.previous_action)
        else:
            actions.append(policy.act(states[:, t]))
            outputs.append(None)
        policy.observe(rewards[:, t])
    actions = torch.stack(actions, dim=1)
    returns_to_go = targets[:, None] - torch.cat((torch.zeros(b, 1), rewards[:, :-1].cumsum(1)), dim=1)
    with torch.no_grad():
        full = model(returns_to_go, states, actions, torch.arange(steps).expand(b, steps))
    if cache:
        torch.testing.assert_close(torch.stack(outputs, dim=1), full, atol=1e-5, rtol=0)
    expected = full.argmax(-1) if discrete else full
    torch.testing.assert_close(actions.to(expected.dtype), expected, atol=1e-5, rtol=0)


def test_rl_cache_and_recompute_policies_agree():
    """The benchmark's two acting modes take the same actions (the speed comparison compares like with like)."""
    model = tiny_dt(False, context=3, depth=3)
    states = torch.randn(2, 30, 5, generator=torch.Generator().manual_seed(2))
    cached, recomputed = DTPolicy(model, torch.tensor([3.0, 7.0])), \
        DTPolicy(model, torch.tensor([3.0, 7.0]), cache=False)
    for t in range(30):
        torch.testing.assert_close(cached.act(states[:, t]), recomputed.act(states[:, t]), atol=1e-5, rtol=0)
        for policy in (cached, recomputed):
            policy.observe(torch.full((2,), 0.3))


def test_rl_forward_ignores_padding_and_future():
    """The action at step t depends on neither later steps nor padding; padded steps do not change real ones."""
    model = tiny_dt(False)
    g = torch.Generator().manual_seed(3)
    rtg, states, actions = torch.rand(1, 6, generator=g), torch.randn(1, 6, 5, generator=g), \
        torch.rand(1, 6, 3, generator=g)
    timesteps = torch.arange(6)[None]
    with torch.no_grad():
        base = model(rtg, states, actions, timesteps)
        changed = actions.clone()
        changed[:, 3:] = 9.0  # a_3 onwards: the outputs at s_0..s_3 must not move
        after = model(rtg, states, changed, timesteps)
        padding = torch.tensor([[False] * 4 + [True] * 2])
        padded = model(rtg, states, actions, timesteps, padding)
    torch.testing.assert_close(after[:, :4], base[:, :4])
    assert not torch.allclose(after[:, 4:], base[:, 4:])
    torch.testing.assert_close(padded[:, :4], base[:, :4])


def test_rl_bad_shapes_and_timesteps_name_the_input():
    model = tiny_dt(False)
    with pytest.raises(ValueError, match=r"states must be \(b, k, 5\), found \(1, 2, 4\)"):
        model(torch.zeros(1, 2), torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, max_ep_len=64\)"):
        model(torch.zeros(1, 2), torch.zeros(1, 2, 5), torch.zeros(1, 2, 3), torch.full((1, 2), 64))


def test_rl_bc_outputs_bounded_actions_and_logits():
    bc = BehaviourCloning(5, 3, discrete=False, hidden=16)
    assert bc(torch.randn(7, 5) * 100).abs().max() <= 1.0
    assert BehaviourCloning(5, 3, discrete=True, hidden=16)(torch.randn(2, 4, 5)).shape == (2, 4, 3)


@pytest.mark.parametrize("discrete", [True, False])
def test_acting_step_with_tensor_cache_equals_step_with_kv_cache(discrete):
    """The exportable acting step (cache as fixed-size tensors, a masked action slot at t = 0) gives the actions
    of DecisionTransformer.step, past the attention window."""
    from polyformer.domains.rl.model import ActingStep

    torch.manual_seed(0)
    state_dim, action_dim = (4, 2) if discrete else (17, 6)
    dt = DecisionTransformer(state_dim, action_dim, discrete=discrete, context=4, max_ep_len=100,
                             encoder=TransformerConfig(dim=32, depth=3, heads=2, activation="relu")).eval()
    step = ActingStep(dt)
    cache, (keys, values, valid) = dt.new_cache(), step.new_cache(3)
    previous = None
    with torch.no_grad():
        for t in range(15):  # 15 steps: 45 tokens, past the 12-token window
            returns, state, timestep = torch.randn(3) * 10, torch.randn(3, state_dim), torch.full((3,), t)
            expected = dt.step(cache, returns, state, timestep, previous)
            slot = previous if previous is not None else \
                (torch.zeros(3, dtype=torch.long) if discrete else torch.zeros(3, action_dim))
            action, keys, values, valid = step(keys, values, valid, returns, state, timestep, slot)
            torch.testing.assert_close(action, expected, atol=1e-5, rtol=1e-5)
            previous = torch.randint(0, action_dim, (3,)) if discrete else torch.rand(3, action_dim) * 2 - 1
    assert valid.all()
