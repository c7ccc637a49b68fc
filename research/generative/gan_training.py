"""GAN training pieces shared by gan_mnist and gan_ring: a two-network state and one jitted step.

    GANState(step, generator: TrainState, discriminator: TrainState, rng)
    train_step(state, batch):   1. discriminator update on real batch["inputs"] vs G(z) (G frozen)
                                2. generator update against the *updated* discriminator
                                (non-saturating loss; optional R1 penalty on real data)

Each network keeps its own Optax optimizer and optimizer state inside its TrainState, so the two
optimizers live in one pytree that `fit` jits, checkpoints and resumes like any other state.
The generator may keep an EMA of its weights (generator.ema_params), used for sampling.

Example:
    >>> state = create_gan_state(key, gen, disc, latent_dim=64, data_example=x[:2], g_tx=..., d_tx=...)
    >>> step = make_gan_train_step(gen, disc, latent_dim=64, r1_gamma=1.0)
    >>> state, metrics = jax.jit(step)(state, {"inputs": real})     # metrics: d_loss, g_loss, ...
    >>> images = generate(gen, state, key, 64, latent_dim=64)
"""
from __future__ import annotations

from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from depthlab.research.generative.losses import r1_penalty
from depthlab.train import losses
from depthlab.train.state import TrainState
from depthlab.train.step import apply_model


@flax.struct.dataclass
class GANState:
    """Both networks' TrainStates (params, optimizer state, BatchNorm/spectral-norm stats) and a key."""

    step: jax.Array
    generator: TrainState
    discriminator: TrainState
    rng: jax.Array


def _split_variables(variables) -> tuple[dict, dict]:
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def create_gan_state(rng: jax.Array, generator: nn.Module, discriminator: nn.Module, latent_dim: int,
                     data_example: jax.Array, g_tx: optax.GradientTransformation,
                     d_tx: optax.GradientTransformation, ema_decay: float = 0.0) -> GANState:
    """Initialises both networks. data_example: a real batch (only its shape is used)."""
    g_key, d_key, state_key = jax.random.split(rng, 3)
    z = jnp.zeros((data_example.shape[0], latent_dim), jnp.float32)
    g_params, g_state = _split_variables(generator.init(g_key, z, train=False))
    d_params, d_state = _split_variables(discriminator.init(d_key, jnp.asarray(data_example), train=False))
    return GANState(
        step=jnp.zeros((), jnp.int32),
        generator=TrainState.create(apply_fn=generator.apply, params=g_params, tx=g_tx, rng=g_key,
                                    model_state=g_state, ema_decay=ema_decay),
        discriminator=TrainState.create(apply_fn=discriminator.apply, params=d_params, tx=d_tx, rng=d_key,
                                        model_state=d_state),
        rng=state_key,
    )


def _apply(model: nn.Module, params, model_state: dict, x: jax.Array, train: bool):
    """model(x) -> (output, new model_state); mutable collections update only in training."""
    return apply_model(model, params, model_state, [x], train)


def make_gan_train_step(generator: nn.Module, discriminator: nn.Module, latent_dim: int,
                        r1_gamma: float = 0.0) -> Callable[[GANState, dict], tuple[GANState, dict]]:
    """Pure `train_step(state, batch) -> (state, metrics)` updating D then G (jit is applied by fit)."""

    def train_step(state: GANState, batch: dict) -> tuple[GANState, dict]:
        real = batch["inputs"]
        n = real.shape[0]
        d_key, g_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        gen, disc = state.generator, state.discriminator

        # 1. Discriminator: one forward pass over [real; fake] so spectral-norm stats update once.
        fake, g_model_state = _apply(generator, gen.params, gen.model_state,
                                     jax.random.normal(d_key, (n, latent_dim)), train=True)
        fake = jax.lax.stop_gradient(fake)

        def d_loss_fn(d_params):
            logits, d_model_state = _apply(discriminator, d_params, disc.model_state,
                                           jnp.concatenate([real, fake]), train=True)
            real_logits, fake_logits = logits[:n], logits[n:]
            loss = losses.gan_discriminator_loss(real_logits, fake_logits)
            r1 = jnp.zeros(())
            if r1_gamma > 0:
                r1 = r1_penalty(lambda x: _apply(discriminator, d_params, d_model_state, x, False)[0], real)
                loss = loss + 0.5 * r1_gamma * r1
            metrics = {"r1": r1, "d_real": jnp.mean(nn.sigmoid(real_logits)),
                       "d_fake": jnp.mean(nn.sigmoid(fake_logits))}
            return loss, (d_model_state, metrics)

        (d_loss, (d_model_state, d_metrics)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc.params)
        disc = disc.apply_gradients(d_grads, model_state=d_model_state)

        # 2. Generator, against the discriminator just updated.
        z = jax.random.normal(g_key, (n, latent_dim))

        def g_loss_fn(g_params):
            fake, new_g_state = _apply(generator, g_params, g_model_state, z, train=True)
            logits, _ = _apply(discriminator, disc.params, disc.model_state, fake, train=False)
            return losses.gan_generator_loss(logits), new_g_state

        (g_loss, g_model_state), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(gen.params)
        gen = gen.apply_gradients(g_grads, model_state=g_model_state)

        metrics = {"d_loss": d_loss, "g_loss": g_loss, "loss": d_loss + g_loss,
                   "d_grad_norm": optax.tree.norm(d_grads), "g_grad_norm": optax.tree.norm(g_grads),
                   **d_metrics}
        return state.replace(step=state.step + 1, generator=gen, discriminator=disc), metrics

    return train_step


def generate(generator: nn.Module, state: GANState, key: jax.Array, num_samples: int, latent_dim: int,
             use_ema: bool = True) -> jax.Array:
    """num_samples samples from G (EMA weights when kept and use_ema), BatchNorm in inference mode."""
    gen = state.generator
    params = gen.eval_params() if use_ema else gen.params
    z = jax.random.normal(key, (num_samples, latent_dim))
    return _apply(generator, params, gen.model_state, z, train=False)[0]


# --- The Experiment shared by gan_ring and gan_mnist --------------------------------------------

def gan_experiment(config, data_example, train_batches, evaluate=None, finish=None):
    """depthlab.train.Experiment for config.model.{generator, discriminator, latent_dim}, config.optim
    (generator; its ema_decay keeps an EMA of G), config.d_optim (discriminator) and config.gan.r1_gamma.

    `train_batches(start_step)` yields {"inputs": real}; `evaluate` and `finish` are the Experiment's. A
    caller that samples builds its own generator with `build_model(config.model.generator)`: Flax modules
    are descriptions, so it is the same network and reads the same params.
    """
    from depthlab.research.experiment import build_model, resolved_optim
    from depthlab.train import Experiment, make_optimizer

    generator = build_model(config.model.generator)
    discriminator = build_model(config.model.discriminator)
    latent_dim = int(config.model.latent_dim)
    # Both optimizers are built once: TrainState's static fields must be the same objects every init.
    g_tx = make_optimizer(resolved_optim(config))
    d_config = config.copy_and_resolve_references()
    with d_config.unlocked():
        d_config.optim = config.d_optim
    d_tx = make_optimizer(resolved_optim(d_config))
    return Experiment(
        init=lambda rng: create_gan_state(rng, generator, discriminator, latent_dim, data_example, g_tx, d_tx,
                                          ema_decay=float(config.optim.ema_decay)),
        train_step=make_gan_train_step(generator, discriminator, latent_dim, float(config.gan.r1_gamma)),
        train_batches=train_batches,
        evaluate=evaluate,
        finish=finish,
    )
