"""Networks for reinforcement learning: PPO actor-critics and the AlphaZero policy-value net.

    ActorCritic:      obs [batch, obs_dim] -> (policy head, value [batch])
        discrete head:   logits [batch, num_actions]
        gaussian head:   (mean [batch, action_dim], log_std [batch, action_dim])
        torso:           shared (one MLP feeds both heads) or separate (an actor MLP and a critic MLP)
    PolicyValueNet:   board [batch, height, width, planes] -> (logits [batch, num_actions], value [batch])
        conv stem -> residual blocks (conv-BN-relu-conv-BN + skip) -> policy and value heads

Initialisation follows the PPO implementation details (Engstrom et al. 2020, Huang et al. 2022):
orthogonal hidden layers with gain sqrt(2), the policy output with gain 0.01 (an almost uniform
initial policy) and the value output with gain 1.

Example:
    >>> net = ActorCritic(action_dim=2, discrete=True)
    >>> params = net.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> logits, value = net.apply(params, jnp.zeros((8, 4)))      # [8, 2], [8]
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from depthlab.models.registry import register_model

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu, "elu": nn.elu}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def _dense(features: int, gain: float, dtype: Any = jnp.float32) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(gain), bias_init=nn.initializers.zeros,
                    dtype=dtype)


class _Torso(nn.Module):
    """Dense layers with orthogonal(sqrt 2) init: [batch, in] -> [batch, hidden[-1]]."""

    hidden: Sequence[int]
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = _activation(self.activation)
        for width in self.hidden:
            x = act(_dense(width, np.sqrt(2.0), self.dtype)(x))
        return x


@register_model("actor_critic")
class ActorCritic(nn.Module):
    """PPO actor-critic for vector observations.

    Attributes:
      action_dim: number of discrete actions, or the size of a continuous action vector.
      discrete: True -> categorical logits; False -> diagonal Gaussian (mean, log_std).
      hidden: widths of the torso layers (each torso when separate).
      activation: tanh (the PPO default), relu, gelu, silu or elu.
      shared_torso: one torso feeding both heads instead of separate actor and critic torsos.
      log_std_init: initial log standard deviation of the Gaussian head (a state-independent
        parameter, which is what PPO on MuJoCo-style tasks uses).
      dtype: compute dtype (params stay float32; logits, means and values come back float32).

    Returns from __call__(obs [batch, obs_dim]):
      discrete: (logits [batch, action_dim], value [batch])
      gaussian: ((mean [batch, action_dim], log_std [batch, action_dim]), value [batch])
    """

    action_dim: int
    discrete: bool = True
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"
    shared_torso: bool = False
    log_std_init: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs: jax.Array):
        chex.assert_rank(obs, 2)
        obs = obs.astype(jnp.float32)
        torso = lambda name: _Torso(self.hidden, self.activation, self.dtype, name=name)  # noqa: E731
        if self.shared_torso:
            actor_features = critic_features = torso("torso")(obs)
        else:
            actor_features = torso("actor_torso")(obs)
            critic_features = torso("critic_torso")(obs)
        value = _dense(1, 1.0, self.dtype)(critic_features)[:, 0].astype(jnp.float32)
        head = _dense(self.action_dim, 0.01, self.dtype)(actor_features).astype(jnp.float32)
        if self.discrete:
            return head, value
        log_std = self.param("log_std", nn.initializers.constant(self.log_std_init), (self.action_dim,))
        return (head, jnp.broadcast_to(log_std, head.shape)), value


class _ResidualBlock(nn.Module):
    """conv3x3-BN-relu-conv3x3-BN + identity, relu: [b, h, w, c] -> [b, h, w, c]."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)  # noqa: E731
        conv = lambda: nn.Conv(self.channels, (3, 3), use_bias=False, dtype=self.dtype)  # noqa: E731
        y = nn.relu(norm()(conv()(x)))
        y = norm()(conv()(y))
        return nn.relu(x + y)


@register_model("alphazero")
class PolicyValueNet(nn.Module):
    """AlphaZero policy-value network for board games (Silver et al. 2017), scaled by config.

    Attributes:
      num_actions: size of the policy output (9 for tic-tac-toe, 82 for 9x9 go).
      channels: width of the residual torso.
      num_blocks: number of residual blocks.
      value_hidden: width of the value head's hidden layer.
      dtype: compute dtype (params and BatchNorm statistics stay float32; outputs come back float32).

    __call__(board [batch, height, width, planes], train) -> (logits [batch, num_actions],
    value [batch] in (-1, 1), from the point of view of the player to move). BatchNorm statistics
    live in the `batch_stats` collection (pass mutable=["batch_stats"] when train=True).
    """

    num_actions: int
    channels: int = 64
    num_blocks: int = 4
    value_hidden: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, board: jax.Array, train: bool = False):
        chex.assert_rank(board, 4)
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)  # noqa: E731
        conv = lambda features, size: nn.Conv(features, size, use_bias=False, dtype=self.dtype)  # noqa: E731
        dense = lambda features: nn.Dense(features, dtype=self.dtype)  # noqa: E731
        x = board.astype(jnp.float32)
        x = nn.relu(norm()(conv(self.channels, (3, 3))(x)))
        for _ in range(self.num_blocks):
            x = _ResidualBlock(self.channels, self.dtype)(x, train)
        # Policy head: 1x1 conv to 2 planes, then a dense layer over the flattened board.
        p = nn.relu(norm()(conv(2, (1, 1))(x)))
        logits = dense(self.num_actions)(p.reshape((p.shape[0], -1))).astype(jnp.float32)
        # Value head: 1x1 conv to 1 plane, dense hidden layer, tanh scalar.
        v = nn.relu(norm()(conv(1, (1, 1))(x)))
        v = nn.relu(dense(self.value_hidden)(v.reshape((v.shape[0], -1))))
        value = jnp.tanh(dense(1)(v).astype(jnp.float32))[:, 0]
        return logits, value
