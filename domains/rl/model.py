"""Decision Transformer (Chen et al. 2021, https://arxiv.org/abs/2106.01345) on the core's causal encoder, and the
behaviour-cloning MLP it is compared with.

A trajectory becomes interleaved tokens (R_1, s_1, a_1, R_2, s_2, a_2, ...): R_t the return-to-go (the reward still
to collect from step t on), s_t the state, a_t the action, each embedded by its own linear map (an embedding table
for discrete actions) plus a learned embedding of the episode timestep t. The action a_t is read from the output at
the state token s_t, which the causal mask keeps from seeing a_t itself.

Departure from the paper: attention sees the last `context` steps (3·context tokens) through the core's sliding
window instead of a context re-cut at every step. Acting then appends three tokens per environment step to a KV
cache (`DecisionTransformer.new_cache`, `step`), and the action equals a full causal forward over the whole episode
so far. Training samples segments of the episodes (see data.py); a segment longer than `context` steps trains
the model on the same rolling window it acts with.

Shapes: b batch, k steps, n = 3k tokens, d model width, s state width, a action width (or number of actions).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from polyformer.layers import init_linear_weights
from polyformer.transformer import KVCache, TransformerConfig, TransformerEncoder

TOKENS_PER_STEP = 3  # return-to-go, state, action


class Normalizer(nn.Module):
    """Dataset statistics saved with the model: state mean and std, and the scale that divides returns."""

    def __init__(self, state_dim: int):
        super().__init__()
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))
        self.register_buffer("return_scale", torch.ones(()))

    def set(self, state_mean: Tensor, state_std: Tensor, return_scale: float) -> None:
        if state_mean.shape != self.state_mean.shape or state_std.shape != self.state_std.shape:
            raise ValueError(f"state statistics must have shape {tuple(self.state_mean.shape)}, found mean "
                             f"{tuple(state_mean.shape)} and std {tuple(state_std.shape)}")
        if return_scale <= 0:
            raise ValueError(f"return_scale must be positive, found {return_scale}")
        self.state_mean.copy_(state_mean)
        self.state_std.copy_(state_std)
        self.return_scale.fill_(return_scale)

    def states(self, states: Tensor) -> Tensor:
        return (states - self.state_mean) / self.state_std

    def returns(self, returns: Tensor) -> Tensor:
        return returns / self.return_scale


def _dt_encoder() -> TransformerConfig:
    return TransformerConfig(dim=128, depth=3, heads=1, activation="relu")


@dataclass
class DecisionTransformerConfig:
    """The DT's architecture: K steps of context, the timestep table, the core encoder (causal and window are set
    from K by the model)."""

    context: int = 20  # K: steps of attention window
    max_ep_len: int = 1000  # size of the timestep embedding table
    encoder: TransformerConfig = field(default_factory=_dt_encoder)


@dataclass
class BehaviourCloningConfig:
    """The BC baseline's MLP: `depth` hidden layers of `hidden` units, ReLU, dropout."""

    hidden: int = 256
    depth: int = 2
    dropout: float = 0.1


class DecisionTransformer(nn.Module):
    """(R, s, a) tokens → causal encoder → action at every state token."""

    export_axes = {i: {0: "batch", 1: "steps"} for i in range(4)}  # polyformer.deploy: R, s, a, t

    def __init__(self, state_dim: int, action_dim: int, *, discrete: bool, encoder: TransformerConfig,
                 context: int = 20, max_ep_len: int = 1000):
        super().__init__()
        if context < 1 or max_ep_len < 1:
            raise ValueError(f"context and max_ep_len must be positive, found {context} and {max_ep_len}")
        d = encoder.dim
        self.state_dim, self.action_dim, self.discrete = state_dim, action_dim, discrete
        self.context, self.max_ep_len = context, max_ep_len
        self.normalizer = Normalizer(state_dim)
        self.embed_timestep = nn.Embedding(max_ep_len, d)
        self.embed_return = nn.Linear(1, d)
        self.embed_state = nn.Linear(state_dim, d)
        self.embed_action = nn.Embedding(action_dim, d) if discrete else nn.Linear(action_dim, d)
        self.embed_ln = nn.LayerNorm(d)
        # GPT-2, and so the DT, drops the MLP's output, not its hidden layer
        self.encoder = TransformerEncoder(replace(encoder, causal=True, window=TOKENS_PER_STEP * context,
                                                  ffn_hidden_dropout=False))
        self.head = nn.Linear(d, action_dim)
        for module in (self.embed_return, self.embed_state, self.embed_action, self.head):
            module.apply(init_linear_weights)

    @property
    def receptive_steps(self) -> int:
        """Steps back that an action can depend on: depth windows of 3·context − 1 tokens, plus the current step."""
        return len(self.encoder.blocks) * self.context + 1

    def _timestep(self, timesteps: Tensor) -> Tensor:
        low, high = (int(t) for t in torch.aminmax(timesteps))  # one reduction, read once
        if high >= self.max_ep_len or low < 0:
            raise ValueError(f"timesteps must lie in [0, max_ep_len={self.max_ep_len}), found [{low}, {high}]")
        return self.embed_timestep(timesteps)

    def _embed_action(self, actions: Tensor) -> Tensor:
        return self.embed_action(actions.long() if self.discrete else actions)

    def _embed_return_and_state(self, returns_to_go: Tensor, states: Tensor, time: Tensor) -> tuple[Tensor, Tensor]:
        """R and s tokens, each plus its timestep's embedding: returns_to_go (...), states (... s) → (... d) twice."""
        r = self.embed_return(self.normalizer.returns(returns_to_go)[..., None]) + time
        return r, self.embed_state(self.normalizer.states(states)) + time

    def embed(self, returns_to_go: Tensor, states: Tensor, actions: Tensor, timesteps: Tensor) -> Tensor:
        """returns_to_go (b k), states (b k s), actions (b k a) or (b k) indices, timesteps (b k) → (b 3k d)."""
        time = self._timestep(timesteps)
        r, s = self._embed_return_and_state(returns_to_go, states, time)
        a = self._embed_action(actions) + time
        tokens = rearrange(torch.stack((r, s, a), dim=2), "b k three d -> b (k three) d")
        return self.embed_ln(tokens)

    def forward(self, returns_to_go: Tensor, states: Tensor, actions: Tensor, timesteps: Tensor,
                padding_mask: Tensor | None = None) -> Tensor:
        """Action outputs (b k a): tanh'd actions when continuous, logits when discrete. padding_mask (b k) is True
        at padded steps (torch.nn's convention)."""
        b, k = states.shape[:2]
        if states.shape[-1] != self.state_dim:
            raise ValueError(f"states must be (b, k, {self.state_dim}), found {tuple(states.shape)}")
        for name, tensor in (("returns_to_go", returns_to_go), ("timesteps", timesteps)):
            if tensor.shape != (b, k):
                raise ValueError(f"{name} must be (b, k) = ({b}, {k}), found {tuple(tensor.shape)}")
        token_padding = None
        if padding_mask is not None:
            token_padding = padding_mask.repeat_interleave(TOKENS_PER_STEP, dim=1)  # (b 3k)
        # outputs only at the state tokens: the last block computes its queries and feed-forward there alone
        hidden = self.encoder(self.embed(returns_to_go, states, actions, timesteps), key_padding_mask=token_padding,
                              query_index=slice(1, None, TOKENS_PER_STEP))  # (b k d)
        return self.action_output(hidden)

    def action_output(self, hidden: Tensor) -> Tensor:
        out = self.head(hidden)
        return out if self.discrete else torch.tanh(out)

    # ---- acting with the KV cache -------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return self.encoder.new_cache()

    def step(self, cache: KVCache, returns_to_go: Tensor, state: Tensor, timestep: Tensor,
             previous_action: Tensor | None = None) -> Tensor:
        """One environment step: appends (a_{t-1}), R_t, s_t to the cache; returns the action output (b a).

        returns_to_go (b), state (b s), timestep (b) of step t; previous_action (b a) or (b) of step t − 1,
        None at t = 0.
        """
        time = self._timestep(timestep)
        tokens = list(self._embed_return_and_state(returns_to_go, state, time))
        if previous_action is not None:  # a_{t-1} at step t − 1, inside the range just checked
            tokens.insert(0, self._embed_action(previous_action) + self.embed_timestep((timestep - 1).clamp(min=0)))
        hidden = self.encoder(self.embed_ln(torch.stack(tokens, dim=1)), cache=cache, query_index=slice(-1, None))
        return self.action_output(hidden[:, 0])  # at s_t, the newest token


class ActingStep(nn.Module):
    """One environment step of a DecisionTransformer with its KV cache as tensors in and out: what an exported agent
    runs, O(1) per step (torch.export / ONNX; see polyformer.deploy).

    The cache holds the last 3·context tokens (the attention window): keys, values (depth b h 3K e) and valid
    (b 3K), from `new_cache(batch)`. Every step appends three tokens, (a_{t-1}, R_t, s_t); at t = 0 the action
    token is marked not real and nothing attends to it, so the action equals DecisionTransformer.step's.
    Unlike step(), timesteps are clamped to the embedding table in the graph instead of checked.
    """

    def __init__(self, model: DecisionTransformer):
        super().__init__()
        self.model = model

    def new_cache(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.encoder.new_fixed_cache(batch, device=self.model.head.weight.device)

    def forward(self, keys: Tensor, values: Tensor, valid: Tensor, returns_to_go: Tensor, state: Tensor,
                timestep: Tensor, previous_action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """returns_to_go (b), state (b s), timestep (b) of step t; previous_action (b a) or (b) of t − 1 (not read
        at t = 0) → action output (b a) and the cache advanced by one step."""
        dt = self.model
        time = dt.embed_timestep(timestep.clamp(0, dt.max_ep_len - 1))
        previous_time = dt.embed_timestep((timestep - 1).clamp(0, dt.max_ep_len - 1))
        r, s = dt._embed_return_and_state(returns_to_go, state, time)
        a = dt._embed_action(previous_action) + previous_time
        tokens = dt.embed_ln(torch.stack((a, r, s), dim=1))  # (b 3 d)
        real = torch.stack((timestep > 0, torch.ones_like(timestep, dtype=torch.bool),
                            torch.ones_like(timestep, dtype=torch.bool)), dim=1)  # (b 3)
        hidden, keys, values, valid = dt.encoder.forward_fixed_cache(tokens, keys, values, valid, real)
        return dt.action_output(hidden[:, -1]), keys, values, valid  # the action is read at s_t


class BehaviourCloning(nn.Module):
    """MLP from the normalised state to the action (tanh'd) or action logits: the baseline of the DT paper."""

    def __init__(self, state_dim: int, action_dim: int, *, discrete: bool, hidden: int = 256, depth: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ValueError(f"BC depth and hidden must be positive, found depth={depth}, hidden={hidden}")
        self.state_dim, self.action_dim, self.discrete = state_dim, action_dim, discrete
        self.normalizer = Normalizer(state_dim)
        layers: list[nn.Module] = []
        width = state_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, action_dim)

    def forward(self, states: Tensor) -> Tensor:
        """states (... s) → actions (... a), tanh'd when continuous, logits when discrete."""
        out = self.head(self.mlp(self.normalizer.states(states)))
        return out if self.discrete else torch.tanh(out)
