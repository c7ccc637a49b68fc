"""PPO: GAE against a NumPy loop, truncation bootstrapping, vmap over seeds, the env adapter, learning."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gymnax")

from depthlab.research.rl import ppo_brax, ppo_cartpole, ppo_pendulum  # noqa: E402
from depthlab.research.datasets import require  # noqa: E402
from depthlab.research.rl.environments import JaxEnv, Transition, make_env  # noqa: E402
from depthlab.research.rl.ppo_training import (RunningStats, compute_gae, log_prob_and_entropy, make_evaluate,  # noqa: E402
                                       make_train)


def _numpy_gae(rewards, values, next_values, terminated, done, gamma, lam):
    """The textbook loop, one environment and one step at a time."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            delta = rewards[t, n] + gamma * (1 - terminated[t, n]) * next_values[t, n] - values[t, n]
            running = delta + gamma * lam * (1 - done[t, n]) * running
            adv[t, n] = running
    return adv, adv + values


def test_gae_matches_numpy_loop():
    rng = np.random.default_rng(0)
    T, N = 17, 3
    rewards, values, next_values = rng.normal(size=(3, T, N))
    terminated = rng.random((T, N)) < 0.15
    truncated = (rng.random((T, N)) < 0.15) & ~terminated
    done = terminated | truncated
    adv, targets = compute_gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(next_values),
                               jnp.asarray(terminated), jnp.asarray(done), 0.97, 0.9)
    ref_adv, ref_targets = _numpy_gae(rewards, values, next_values, terminated, done, 0.97, 0.9)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, ref_targets, rtol=1e-5, atol=1e-5)


def test_gae_bootstraps_on_truncation_not_termination():
    # One step each: a truncated step keeps gamma * V(final obs), a terminated one drops it.
    ones = jnp.ones((1, 2))
    next_values = jnp.full((1, 2), 10.0)
    adv, _ = compute_gae(ones, jnp.zeros((1, 2)), next_values, jnp.array([[False, True]]), jnp.array([[True, True]]),
                         0.9, 0.95)
    np.testing.assert_allclose(adv, [[1.0 + 0.9 * 10.0, 1.0]])


def _constant_env(episode_length: int) -> JaxEnv:
    """Reward 1 every step, the same observation, episodes cut by a time limit only (never terminated)."""

    def reset(key):
        return jnp.ones(2), jnp.zeros((), jnp.int32)

    def step(key, time, action):
        time = time + 1
        truncated = time >= episode_length
        return Transition(jnp.ones(2), jnp.where(truncated, 0, time), jnp.float32(1.0), jnp.bool_(False), truncated,
                          jnp.ones(2))

    return JaxEnv("constant", (2,), reset, step, num_actions=2, max_episode_steps=episode_length)


def _tiny(config, steps=3, num_envs=2, num_steps=8):
    config.unlock()
    config.train.steps = steps
    config.ppo.num_envs, config.ppo.num_steps, config.ppo.num_minibatches, config.ppo.update_epochs = (
        num_envs, num_steps, 2, 2)
    config.model.hidden = (8, 8)
    return config


def test_truncation_bootstrap_learns_infinite_horizon_value():
    # With time-limit episodes of 5 steps and gamma 0.9 the true value of the (time-less) observation
    # is 1 / (1 - 0.9) = 10. Treating truncation as termination would give ~2.6 (the mean of the
    # truncated discounted sums 4.1, 3.4, 2.7, 1.9, 1).
    config = _tiny(ppo_cartpole.get_config(), steps=60, num_envs=4, num_steps=16)
    config.ppo.gamma, config.ppo.gae_lambda, config.ppo.clip_value = 0.9, 0.95, False
    config.optim.learning_rate, config.optim.schedule = 3e-2, "constant"
    env = _constant_env(5)
    state, metrics = jax.jit(make_train(config, env))(jax.random.key(0))
    _, value = state.agent.apply_fn({"params": state.agent.params}, jnp.ones((1, 2)))
    assert abs(float(value[0]) - 10.0) < 1.0, float(value[0])
    np.testing.assert_allclose(metrics["episode_length"][-1], 5.0)


def test_vmap_over_seeds_equals_separate_runs():
    config = _tiny(ppo_cartpole.get_config())
    train = make_train(config)
    keys = jax.random.split(jax.random.key(3), 4)
    batched_state, batched_metrics = jax.jit(jax.vmap(train))(keys)
    single = jax.jit(train)
    for i in range(4):
        state, metrics = single(keys[i])
        for a, b in zip(jax.tree.leaves(state.agent.params), jax.tree.leaves(batched_state.agent.params)):
            np.testing.assert_allclose(a, b[i], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(metrics["loss"], batched_metrics["loss"][i], rtol=2e-4, atol=2e-5)
    # Different seeds really are different agents.
    kernel = jax.tree.leaves(batched_state.agent.params)[0]
    assert not np.allclose(kernel[0], kernel[1])


def test_gymnax_adapter_reports_truncation_at_time_limit():
    env = make_env("gymnax/Pendulum-v1", max_steps_in_episode=7)
    assert not env.discrete and env.action_dim == 1 and env.action_low == -2.0

    def body(state, key):
        t = env.step(key, state, jnp.zeros(1))
        return t.state, (t.terminated, t.truncated, t.final_obs, t.obs)

    _, state = env.reset(jax.random.key(0))
    _, (terminated, truncated, final_obs, obs) = jax.lax.scan(body, state, jax.random.split(jax.random.key(1), 14))
    assert not terminated.any()
    np.testing.assert_array_equal(np.flatnonzero(truncated), [6, 13])
    # At a truncation the next observation is a fresh episode's, the final one is kept separately.
    assert not np.allclose(final_obs[6], obs[6])
    np.testing.assert_allclose(final_obs[:6], obs[:6])
    with pytest.raises(ValueError, match="valid"):
        make_env("gymnax/NoSuchEnv-v0")


def test_running_stats_and_gaussian_log_prob():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 2))
    stats = RunningStats.create((2,)).update(jnp.asarray(x[:200])).update(jnp.asarray(x[200:]))
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-3)
    np.testing.assert_allclose(stats.var, x.var(0), rtol=1e-3)
    mean, log_std, action = jnp.array([[0.5]]), jnp.array([[np.log(2.0)]]), jnp.array([[1.5]])
    logp, entropy = log_prob_and_entropy((mean, log_std), action, discrete=False)
    np.testing.assert_allclose(logp, [-0.5 * 0.25 - np.log(2.0) - 0.5 * np.log(2 * np.pi)], rtol=1e-5)
    np.testing.assert_allclose(entropy, [0.5 * np.log(2 * np.pi * np.e * 4.0)], rtol=1e-5)


def test_ppo_learns_cartpole():
    # 60k environment steps: far from the 500k default, but the greedy return must rise clearly
    # above the ~20 a random policy gets.
    config = ppo_cartpole.get_config()
    config.unlock()
    config.train.steps = 30
    config.ppo.num_envs, config.ppo.num_steps = 16, 128
    config.optim.learning_rate = 1e-3
    state, metrics = jax.jit(make_train(config))(jax.random.key(0))
    result = jax.jit(make_evaluate(config, num_envs=16))(state, jax.random.key(1))
    assert float(result["return"]) > 100, result
    assert metrics["episode_return"][-1] > 2 * metrics["episode_return"][2]


def test_missing_optional_package_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'depthlab\[rl\]'"):
        require("depthlab_no_such_package", "rl", "this test")


@pytest.mark.slow
@pytest.mark.parametrize("module,threshold", [(ppo_cartpole, 475.0), (ppo_pendulum, -250.0), (ppo_brax, 999.0)])
def test_default_configs_reach_target_over_seeds(module, threshold):
    if module is ppo_brax:
        pytest.importorskip("brax")
    config = module.get_config()
    states, _ = jax.jit(jax.vmap(make_train(config)))(jax.random.split(jax.random.key(0), 3))
    result = jax.jit(jax.vmap(make_evaluate(config, num_envs=50)))(states, jax.random.split(jax.random.key(1), 3))
    assert float(result["return"].mean()) >= threshold, result["return"]


def test_engine_ppo_losses_by_hand():
    """research/rl/ppo_training.py's loss is built from these (train/losses.py)."""
    from depthlab.train import losses
    logp, old = jnp.log(jnp.array([0.5, 0.9])), jnp.log(jnp.array([0.25, 1.0]))   # ratios 2.0 and 0.9
    adv = jnp.array([1.0, -1.0])
    # min(2 * 1, 1.2 * 1) = 1.2 and min(0.9 * -1, 0.9 * -1) = -0.9: loss = -(1.2 - 0.9) / 2
    np.testing.assert_allclose(losses.ppo_policy_loss(logp, old, adv, 0.2), -0.15, rtol=1e-5)
    v, v_old, ret = jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0]), jnp.array([2.0, 1.0])
    # clipped: v_clipped = [0.2, 0]: max(1, 3.24) and max(1, 1) -> 0.5 * mean = 1.06; unclipped: 0.5 * 1 = 0.5
    np.testing.assert_allclose(losses.clipped_value_loss(v, v_old, ret, 0.2), 1.06, rtol=1e-5)
    np.testing.assert_allclose(losses.clipped_value_loss(v, v_old, ret, None), 0.5, rtol=1e-5)
