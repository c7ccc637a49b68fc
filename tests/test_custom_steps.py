"""fit drives experiments that bring their own step: a GAN-shaped two-network step with two Optax
optimizers in one state, and an RL-shaped step that makes its own data inside the jitted function."""
import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models import MLP
from depthlab.train import Experiment, default_train_config, fit, losses


def _config(steps):
    config = ml_collections.ConfigDict({"seed": 0, "train": default_train_config()})
    config.train.update({"steps": steps, "log_every": 10, "eval_every": 0, "checkpoint_every": 10,
                         "progress": False, "async_checkpoint": False})
    return config


@flax.struct.dataclass
class GANState:
    step: jax.Array
    g_params: dict
    d_params: dict
    g_opt: optax.OptState
    d_opt: optax.OptState
    rng: jax.Array


def _gan_experiment():
    gen, disc = MLP(features=(16, 2)), MLP(features=(16, 1))
    g_tx, d_tx = optax.adam(1e-3), optax.adam(1e-3)

    def init(rng):
        g_rng, d_rng, rng = jax.random.split(rng, 3)
        g = gen.init(g_rng, jnp.ones((1, 4, 1)))["params"]
        d = disc.init(d_rng, jnp.ones((1, 2, 1)))["params"]
        return GANState(jnp.zeros((), jnp.int32), g, d, g_tx.init(g), d_tx.init(d), rng)

    def train_step(state, batch):
        z = jax.random.normal(jax.random.fold_in(state.rng, state.step), (batch["x"].shape[0], 4, 1))
        fake = gen.apply({"params": state.g_params}, z)[..., None]
        real = batch["x"][..., None]

        def d_loss(d):
            return losses.gan_discriminator_loss(disc.apply({"params": d}, real), disc.apply({"params": d}, fake))

        dl, dg = jax.value_and_grad(d_loss)(state.d_params)
        du, d_opt = d_tx.update(dg, state.d_opt, state.d_params)
        d_params = optax.apply_updates(state.d_params, du)

        def g_loss(g):
            return losses.gan_generator_loss(disc.apply({"params": d_params}, gen.apply({"params": g}, z)[..., None]))

        gl, gg = jax.value_and_grad(g_loss)(state.g_params)
        gu, g_opt = g_tx.update(gg, state.g_opt, state.g_params)
        g_params = optax.apply_updates(state.g_params, gu)
        return state.replace(step=state.step + 1, g_params=g_params, d_params=d_params, g_opt=g_opt,
                             d_opt=d_opt), {"loss": dl + gl, "d_loss": dl, "g_loss": gl}

    def batches(start):
        for i in range(start, 10**9):
            yield {"x": np.random.default_rng(i).normal(3.0, 0.1, (32, 2)).astype(np.float32)}

    return Experiment(init=init, train_step=train_step, train_batches=batches)


def test_gan_shaped_step_updates_both_networks_and_resumes(tmp_path):
    experiment = _gan_experiment()
    init = experiment.init(jax.random.key(0))
    short = fit(experiment, _config(20), tmp_path)
    for name in ("g_params", "d_params"):
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), getattr(init, name), getattr(short.state, name))
        assert max(jax.tree.leaves(diff)) > 0, f"{name} did not change"
    resumed = fit(experiment, _config(40), tmp_path)            # resumes from step 20
    straight = fit(experiment, _config(40), tmp_path / "straight")
    chex.assert_trees_all_equal(resumed.state.g_params, straight.state.g_params)
    chex.assert_trees_all_equal(resumed.state.d_opt, straight.state.d_opt)


@flax.struct.dataclass
class AgentState:
    step: jax.Array
    logits: jax.Array       # a softmax policy over 2 arms
    opt_state: optax.OptState
    rng: jax.Array


def test_rl_shaped_step_collects_its_own_data(tmp_path):
    """REINFORCE on a 2-armed bandit: the step samples 64 pulls inside jit (no data iterator)."""
    tx = optax.sgd(0.5)
    means = jnp.array([0.2, 0.8])

    def init(rng):
        logits = jnp.zeros(2)
        return AgentState(jnp.zeros((), jnp.int32), logits, tx.init(logits), rng)

    def train_step(state, batch):
        assert batch is None
        key = jax.random.fold_in(state.rng, state.step)
        arms = jax.random.categorical(key, state.logits, shape=(64,))
        rewards = jax.random.bernoulli(jax.random.fold_in(key, 1), means[arms]).astype(jnp.float32)

        def loss(logits):
            logp = jax.nn.log_softmax(logits)[arms]
            return -jnp.mean(logp * (rewards - rewards.mean()))

        grads = jax.grad(loss)(state.logits)
        updates, opt_state = tx.update(grads, state.opt_state)
        logits = optax.apply_updates(state.logits, updates)
        return state.replace(step=state.step + 1, logits=logits, opt_state=opt_state), {"return": rewards.mean()}

    result = fit(Experiment(init=init, train_step=train_step, train_batches=None), _config(60), tmp_path)
    assert float(jax.nn.softmax(result.state.logits)[1]) > 0.9
    assert result.metrics["return"] > 0.7
