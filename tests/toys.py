"""A tiny hand-written experiment for the engine's tests: a state of one weight vector, a step in
microseconds, and switches for the faults the tests inject."""
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthlab.train import Experiment, default_train_config


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    w: jax.Array


def toy_experiment(nan_at=None, batches=None, steps=20, size=2, blow_up_at=None, score=None, random_init=False):
    """(experiment, config): w moves towards 1/x by gradient descent on batches of x.

    nan_at: the loss (and w) become NaN at that step. blow_up_at: w becomes inf at that step while the
    step's loss stays finite. size: w's length (another size is another model). score(step): an eval metric
    `eval/score` from the host-side evaluation. random_init: incompressible weights (disk-size tests)."""
    def train_step(state, batch):
        x = batch["x"][:, :1]
        loss = jnp.mean((x * state.w - 1.0) ** 2)
        if nan_at is not None:
            loss = jnp.where(state.step + 1 == nan_at, jnp.nan, loss)
        w = state.w - 0.1 * jax.grad(lambda w: jnp.mean((x * w - 1.0) ** 2))(state.w)
        w = jnp.where(jnp.isfinite(loss), w, jnp.nan)
        if blow_up_at is not None:
            w = jnp.where(state.step + 1 == blow_up_at, jnp.inf, w)
        return ToyState(state.step + 1, w), {"loss": loss}

    def default_batches(start):
        for i in range(start, 10**9):
            yield {"x": np.full((8, 2), 1.0 + (i % 3), np.float32)}

    def init(rng):
        w = jax.random.normal(rng, (size,)) if random_init else jnp.zeros((size,))
        return ToyState(jnp.zeros((), jnp.int32), w)

    config = ml_collections.ConfigDict({"seed": 0, "train": default_train_config()})
    config.train.update({"steps": steps, "log_every": 100, "eval_every": 0, "checkpoint_every": 5,
                         "progress": False, "async_checkpoint": False, "tensorboard": False})
    evaluate = (lambda state: {"score": score(int(state.step))}) if score else None
    experiment = Experiment(init=init, train_step=train_step, train_batches=batches or default_batches,
                            evaluate=evaluate)
    return experiment, config
