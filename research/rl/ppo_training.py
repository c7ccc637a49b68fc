"""Proximal Policy Optimisation (Schulman et al. 2017) in the PureJaxRL style: everything is one jit.

    init(rng) -> PPOState                       networks, optimizer, environments, normalisers
    update(PPOState) -> (PPOState, metrics)     one iteration: rollout of num_steps x num_envs
                                                transitions (lax.scan), GAE, update_epochs passes of
                                                num_minibatches minibatches (nested lax.scans)
    train(rng) = lax.scan(update, init(rng), length=config.train.steps)

so `jax.jit(jax.vmap(make_train(config)))(jax.random.split(rng, 8))` trains 8 agents at once, and the
engine's `fit` drives `update` as its train_step (one fit step = one PPO iteration).

Details that matter (Huang et al. 2022, "The 37 implementation details of PPO"):
  * time-limit truncation is not termination: a truncated step bootstraps from V(final observation);
  * optional running normalisation of observations and of rewards (by the std of the discounted return);
  * per-minibatch advantage normalisation, clipped value loss, entropy bonus, global-norm clipping,
    Adam(eps=1e-5) with a linearly annealed learning rate.

Example:
    >>> config = depthlab.research.rl.ppo_cartpole.get_config()
    >>> train = jax.jit(jax.vmap(make_train(config)))
    >>> state, metrics = train(jax.random.split(jax.random.key(0), 4))   # metrics["episode_return"]: [4, steps]
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthlab.models.rl import ActorCritic
from depthlab.research.rl.environments import JaxEnv, make_env
from depthlab.train import losses, make_optimizer, make_schedule
from depthlab.train.optim import with_run_length
from depthlab.train.state import TrainState


# ---------------------------------------------------------------------------------------------------
# Running statistics (observation and return normalisation)


@flax.struct.dataclass
class RunningStats:
    """Mean and variance of a stream of vectors, merged batch by batch (Chan et al. parallel update)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, shape: tuple[int, ...]) -> "RunningStats":
        return cls(jnp.zeros(shape), jnp.ones(shape), jnp.asarray(1e-4))

    def update(self, batch: jax.Array) -> "RunningStats":
        """batch: [n, *shape]."""
        batch_mean, batch_var, n = batch.mean(0), batch.var(0), batch.shape[0]
        delta, total = batch_mean - self.mean, self.count + n
        mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        return RunningStats(mean, m2 / total, total)

    def normalize(self, x: jax.Array, clip: float = 10.0) -> jax.Array:
        return jnp.clip((x - self.mean) / jnp.sqrt(self.var + 1e-8), -clip, clip)


# ---------------------------------------------------------------------------------------------------
# Policy distributions: categorical (discrete) and diagonal Gaussian (continuous)


def log_prob_and_entropy(head: Any, action: jax.Array, discrete: bool) -> tuple[jax.Array, jax.Array]:
    """log pi(action) [batch] and entropy [batch] of the policy head from `ActorCritic`."""
    if discrete:
        logp_all = jax.nn.log_softmax(head)
        logp = jnp.take_along_axis(logp_all, action[:, None].astype(jnp.int32), axis=1)[:, 0]
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
        return logp, entropy
    mean, log_std = head
    z = (action - mean) / jnp.exp(log_std)
    logp = (-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    entropy = (log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e)).sum(-1)
    return logp, entropy


def sample_action(key: jax.Array, head: Any, discrete: bool) -> jax.Array:
    """Samples a [batch] int32 (discrete) or [batch, action_dim] float (Gaussian) action."""
    if discrete:
        return jax.random.categorical(key, head).astype(jnp.int32)
    mean, log_std = head
    return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)


def greedy_action(head: Any, discrete: bool) -> jax.Array:
    """The mode of the policy: argmax of the logits, or the Gaussian mean."""
    return jnp.argmax(head, -1).astype(jnp.int32) if discrete else head[0]


# ---------------------------------------------------------------------------------------------------
# Generalised advantage estimation


def compute_gae(rewards: jax.Array, values: jax.Array, next_values: jax.Array, terminated: jax.Array,
                done: jax.Array, gamma: float, gae_lambda: float) -> tuple[jax.Array, jax.Array]:
    """GAE(gamma, lambda) advantages and value targets, scanning backwards over time.

    All inputs are [time, num_envs]. `next_values[t]` is V of the observation reached at step t (the
    final observation of an episode when it ended there). The bootstrap is cut only by `terminated`;
    the recursion is cut by `done` (terminated or truncated) because the next step of the array
    belongs to a new episode:
        delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}
    Returns (advantages, targets = advantages + values), both [time, num_envs].
    """
    terminated, done = terminated.astype(jnp.float32), done.astype(jnp.float32)
    deltas = rewards + gamma * (1.0 - terminated) * next_values - values

    def backward(next_advantage, inputs):
        delta, d = inputs
        advantage = delta + gamma * gae_lambda * (1.0 - d) * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(values[0]), (deltas, done), reverse=True)
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------------
# PPO state and the update iteration


@flax.struct.dataclass
class PPOState:
    """Everything one PPO agent carries between iterations (a pytree: vmap it over seeds).

    step counts PPO iterations (what `fit` counts); `agent.step` counts optimizer steps.
    """

    step: jax.Array
    agent: TrainState
    env_state: Any
    obs: jax.Array                 # [num_envs, obs_dim] raw observations to act on
    rng: jax.Array
    obs_stats: RunningStats
    return_stats: RunningStats     # statistics of the discounted return (reward normalisation)
    discounted_return: jax.Array   # [num_envs] running discounted return per environment
    episode_return: jax.Array      # [num_envs] undiscounted return of the episode in progress
    episode_length: jax.Array      # [num_envs]
    last_return: jax.Array         # [num_envs] return of each env's last finished episode
    last_length: jax.Array         # [num_envs]


def num_updates(config: ml_collections.ConfigDict) -> int:
    """PPO iterations of a run: config.train.steps (one fit step = one iteration)."""
    return int(config.train.steps)


def make_network(config: ml_collections.ConfigDict, env: JaxEnv) -> ActorCritic:
    m = config.model
    return ActorCritic(action_dim=env.num_actions if env.discrete else env.action_dim, discrete=env.discrete,
                       hidden=tuple(m.hidden), activation=m.activation, shared_torso=m.shared_torso,
                       log_std_init=m.log_std_init)


def ppo_optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.optim with decay_steps defaulting to all minibatch steps of the run."""
    return with_run_length(config.optim, num_updates(config) * config.ppo.update_epochs * config.ppo.num_minibatches)


def make_ppo_optimizer(config: ml_collections.ConfigDict):
    """The engine's optimizer; a "linear" schedule anneals to 0 over all minibatch steps of the run."""
    return make_optimizer(ppo_optim_config(config))


def check_ppo_config(config: ml_collections.ConfigDict) -> None:
    p = config.ppo
    batch = p.num_envs * p.num_steps
    if batch % p.num_minibatches:
        raise ValueError(f"ppo.num_envs * ppo.num_steps = {batch} must be divisible by ppo.num_minibatches = "
                         f"{p.num_minibatches}; change one of them")
    if num_updates(config) < 1:
        raise ValueError(f"train.steps = {config.train.steps} PPO iterations; expected >= 1")


def make_ppo(config: ml_collections.ConfigDict, env: JaxEnv | None = None
             ) -> tuple[Callable[[jax.Array], PPOState], Callable[[PPOState], tuple[PPOState, dict]]]:
    """(init, update) for one agent; both pure and jittable. See the module docstring."""
    check_ppo_config(config)
    env = env or make_env(config.env.name, **config.env.kwargs.to_dict())
    p = config.ppo
    network = make_network(config, env)
    tx = make_ppo_optimizer(config)
    schedule = make_schedule(ppo_optim_config(config))     # the optimizer's learning rate, for the metrics
    vreset, vstep = jax.vmap(env.reset), jax.vmap(env.step)
    batch_size = p.num_envs * p.num_steps

    def init(rng: jax.Array) -> PPOState:
        rng, net_key, env_key, agent_key = jax.random.split(rng, 4)
        params = network.init(net_key, jnp.zeros((1,) + env.obs_shape))["params"]
        agent = TrainState.create(apply_fn=network.apply, params=params, tx=tx, rng=agent_key)
        obs, env_state = vreset(jax.random.split(env_key, p.num_envs))
        zeros = jnp.zeros((p.num_envs,))
        return PPOState(step=jnp.zeros((), jnp.int32), agent=agent, env_state=env_state, obs=obs, rng=rng,
                        obs_stats=RunningStats.create(env.obs_shape), return_stats=RunningStats.create(()),
                        discounted_return=zeros, episode_return=zeros, episode_length=zeros,
                        last_return=zeros, last_length=zeros)

    def policy(params, obs_stats, obs):
        if p.normalize_obs:
            obs = obs_stats.normalize(obs)
        return network.apply({"params": params}, obs)

    def rollout(state: PPOState):
        def env_step(carry, _):
            s, rng = carry
            rng, act_key, step_key = jax.random.split(rng, 3)
            head, value = policy(s.agent.params, s.obs_stats, s.obs)
            action = sample_action(act_key, head, env.discrete)
            logp, _ = log_prob_and_entropy(head, action, env.discrete)
            env_action = action if env.discrete else jnp.clip(action, env.action_low, env.action_high)
            t = vstep(jax.random.split(step_key, p.num_envs), s.env_state, env_action)
            done = t.terminated | t.truncated
            episode_return, episode_length = s.episode_return + t.reward, s.episode_length + 1
            discounted = s.discounted_return * p.gamma + t.reward
            s = s.replace(
                env_state=t.state, obs=t.obs,
                discounted_return=jnp.where(done, 0.0, discounted),
                episode_return=jnp.where(done, 0.0, episode_return),
                episode_length=jnp.where(done, 0.0, episode_length),
                last_return=jnp.where(done, episode_return, s.last_return),
                last_length=jnp.where(done, episode_length, s.last_length))
            record = dict(obs=carry[0].obs, action=action, logp=logp, value=value, reward=t.reward,
                          terminated=t.terminated, done=done, final_obs=t.final_obs, discounted=discounted)
            return (s, rng), record

        (state, rng), traj = jax.lax.scan(env_step, (state, state.rng), None, length=p.num_steps)
        return state.replace(rng=rng), traj

    def loss_fn(params, obs_stats, mb):
        head, value = policy(params, obs_stats, mb["obs"])
        logp, entropy = log_prob_and_entropy(head, mb["action"], env.discrete)
        adv = mb["advantage"]
        if p.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy_loss = losses.ppo_policy_loss(logp, mb["logp"], adv, p.clip_eps)
        value_loss = losses.clipped_value_loss(value, mb["value"], mb["target"], p.clip_eps if p.clip_value else None)
        entropy = entropy.mean()
        log_ratio = logp - mb["logp"]          # for the diagnostics below (the loss computes its own ratio)
        ratio = jnp.exp(log_ratio)
        loss = policy_loss + p.vf_coef * value_loss - p.ent_coef * entropy
        metrics = dict(loss=loss, policy_loss=policy_loss, value_loss=value_loss, entropy=entropy,
                       approx_kl=((ratio - 1) - log_ratio).mean(),
                       clip_fraction=(jnp.abs(ratio - 1) > p.clip_eps).mean())
        return loss, metrics

    def update(state: PPOState) -> tuple[PPOState, dict]:
        obs_stats, return_stats = state.obs_stats, state.return_stats
        state, traj = rollout(state)
        # Values of the observations each step reached (final ones at episode ends): one batched pass.
        _, next_values = policy(state.agent.params, obs_stats, traj["final_obs"].reshape(-1, *env.obs_shape))
        next_values = next_values.reshape(p.num_steps, p.num_envs)
        rewards = traj["reward"]
        if p.normalize_reward:
            rewards = rewards / jnp.sqrt(return_stats.var + 1e-8)
        advantages, targets = compute_gae(rewards, traj["value"], next_values, traj["terminated"], traj["done"],
                                          p.gamma, p.gae_lambda)
        data = dict(obs=traj["obs"], action=traj["action"], logp=traj["logp"], value=traj["value"],
                    advantage=advantages, target=targets)
        data = jax.tree.map(lambda x: x.reshape((batch_size,) + x.shape[2:]), data)

        def minibatch_step(agent, mb):
            grads, metrics = jax.grad(loss_fn, has_aux=True)(agent.params, obs_stats, mb)
            return agent.apply_gradients(grads), metrics

        def epoch(carry, _):
            agent, rng = carry
            rng, perm_key = jax.random.split(rng)
            perm = jax.random.permutation(perm_key, batch_size)
            batches = jax.tree.map(lambda x: x[perm].reshape((p.num_minibatches, -1) + x.shape[1:]), data)
            agent, metrics = jax.lax.scan(minibatch_step, agent, batches)
            return (agent, rng), metrics

        rng, epoch_key = jax.random.split(state.rng)
        (agent, _), metrics = jax.lax.scan(epoch, (state.agent, epoch_key), None, length=p.update_epochs)
        metrics = jax.tree.map(jnp.mean, metrics)
        # Normalisers advance after the update, so rollout, GAE and loss all saw the same statistics.
        if p.normalize_obs:
            obs_stats = obs_stats.update(traj["obs"].reshape(-1, *env.obs_shape))
        if p.normalize_reward:
            return_stats = return_stats.update(traj["discounted"].reshape(-1))
        state = state.replace(step=state.step + 1, agent=agent, rng=rng, obs_stats=obs_stats,
                              return_stats=return_stats)
        metrics.update(episode_return=state.last_return.mean(), episode_length=state.last_length.mean(),
                       learning_rate=jnp.asarray(schedule(agent.step), jnp.float32), env_steps=(state.step * batch_size
                                                                                ).astype(jnp.float32))
        return state, metrics

    return init, update


def make_train(config: ml_collections.ConfigDict, env: JaxEnv | None = None
               ) -> Callable[[jax.Array], tuple[PPOState, dict]]:
    """A pure train(rng) -> (final PPOState, metrics {name: [train.steps]}) running the whole training.

    Example:
        >>> states, metrics = jax.jit(jax.vmap(make_train(config)))(jax.random.split(jax.random.key(0), 4))
    """
    init, update = make_ppo(config, env)

    def train(rng: jax.Array):
        return jax.lax.scan(lambda s, _: update(s), init(rng), None, length=num_updates(config))

    return train


# ---------------------------------------------------------------------------------------------------
# Evaluation


def make_evaluate(config: ml_collections.ConfigDict, env: JaxEnv | None = None, num_envs: int | None = None,
                  greedy: bool = True) -> Callable[[PPOState, jax.Array], dict]:
    """evaluate(state, rng) -> {"return": mean, "return_std", "length"} over one episode in each of
    `num_envs` (default config.ppo.eval_envs) fresh environments, acting greedily by default. Pure."""
    env = env or make_env(config.env.name, **config.env.kwargs.to_dict())
    network = make_network(config, env)
    n = num_envs or config.ppo.eval_envs
    horizon = env.max_episode_steps or 1000
    vreset, vstep = jax.vmap(env.reset), jax.vmap(env.step)

    def evaluate(state: PPOState, rng: jax.Array) -> dict:
        reset_key, rng = jax.random.split(rng)
        obs, env_state = vreset(jax.random.split(reset_key, n))

        def step(carry, _):
            obs, env_state, total, length, alive, rng = carry
            rng, act_key, step_key = jax.random.split(rng, 3)
            x = state.obs_stats.normalize(obs) if config.ppo.normalize_obs else obs
            head, _ = network.apply({"params": state.agent.params}, x)
            action = greedy_action(head, env.discrete) if greedy else sample_action(act_key, head, env.discrete)
            if not env.discrete:
                action = jnp.clip(action, env.action_low, env.action_high)
            t = vstep(jax.random.split(step_key, n), env_state, action)
            total, length = total + alive * t.reward, length + alive
            alive = alive * (1.0 - (t.terminated | t.truncated))
            return (t.obs, t.state, total, length, alive, rng), None

        zeros = jnp.zeros((n,))
        carry = (obs, env_state, zeros, zeros, jnp.ones((n,)), rng)
        (_, _, total, length, _, _), _ = jax.lax.scan(step, carry, None, length=horizon)
        return {"return": total.mean(), "return_std": total.std(), "length": length.mean()}

    return evaluate


def steps_per_update(config: ml_collections.ConfigDict) -> int:
    return int(config.ppo.num_envs * config.ppo.num_steps)


def describe(config: ml_collections.ConfigDict) -> str:
    """One line: environment, env steps of the run, batch layout."""
    total = num_updates(config) * steps_per_update(config)
    return (f"PPO on {config.env.name}: {num_updates(config)} iterations x {config.ppo.num_envs} envs x "
            f"{config.ppo.num_steps} steps = {total:,} env steps ({np.round(total / 1e6, 3)}M)")
