"""Few-shot learning: MAML on sine-wave regression and prototypical networks on digits with held-out classes.

MAML (Finn et al. 2017) learns an initialisation theta from which one gradient step on K examples
of a new task already fits it: the meta-loss is L_query(theta - alpha grad L_support(theta)), and
its gradient differentiates through the inner gradient step (`jax.grad` of a function that calls
`jax.grad`: second-order MAML). Tasks are sines A sin(x - phase), A in [0.1, 5], phase in [0, pi],
x in [-5, 5], K = 10 points. Baselines on new tasks with the same inner steps: a random init
("scratch") and a net pre-trained on all tasks jointly ("pretrained", which learns the mean, ~0).

Prototypical networks (Snell et al. 2017) embed images with a CNN, average the K support embeddings
of each class into a prototype, and classify queries by (negative squared) distance to prototypes.
Trained on episodes from digits 0-4 only; tested on N-way K-shot episodes from the unseen 5-9,
against the same nearest-prototype rule on raw pixels.

Example:
    depthlab run theory/few_shot --workdir runs/fs --config.maml.meta_steps=10000
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models import CNN
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: 3000 MAML meta-steps, 1500 prototypical-network episodes (about a minute on CPU)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.maml = ml_collections.ConfigDict({
        "hidden": (40, 40), "k_shot": 10, "num_query": 10, "inner_lr": 0.01, "inner_steps": 1,
        "meta_batch": 25, "meta_steps": 3000, "eval_tasks": 200, "eval_points": 100,
        "eval_steps": (0, 1, 5, 10),
    })
    config.maml.optim = studies.optim_config("adam", 1e-3)
    config.proto = ml_collections.ConfigDict({
        "train_classes": (0, 1, 2, 3, 4), "test_classes": (5, 6, 7, 8, 9), "channels": (32, 32),
        "embedding_dim": 64, "train_way": 5, "train_shot": 5, "num_query": 5, "episodes": 1500,
        "eval_episodes": 300, "eval_settings": ((2, 1), (2, 5), (5, 1), (5, 5)),  # (N-way, K-shot)
    })
    config.proto.optim = studies.optim_config("adam", 1e-3)
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.maml.meta_steps = 70000  # the paper's setting
    c.proto.episodes = 10000


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(maml={"meta_steps": 20, "meta_batch": 5, "eval_tasks": 20, "eval_steps": (0, 1)},
                          proto={"episodes": 20, "eval_episodes": 20, "eval_settings": ((2, 1),)}),
}


# ---------------------------------------------------------------- MAML on sine waves

def sample_sine_tasks(rng: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Amplitudes [n] in [0.1, 5] and phases [n] in [0, pi]."""
    ka, kp = jax.random.split(rng)
    return jax.random.uniform(ka, (n,), minval=0.1, maxval=5.0), jax.random.uniform(kp, (n,), maxval=jnp.pi)


def sine_points(rng: jax.Array, amplitude, phase, k: int) -> tuple[jax.Array, jax.Array]:
    """k points of one task: x [k, 1] uniform on [-5, 5], y [k]."""
    x = jax.random.uniform(rng, (k, 1), minval=-5.0, maxval=5.0)
    return x, amplitude * jnp.sin(x[:, 0] - phase)


def mlp_init(rng: jax.Array, sizes: tuple[int, ...]) -> list:
    """LeCun-normal weights (Var 1/fan_in), zero biases. (He's 2/fan_in makes the first inner steps at
    lr 0.01 diverge on inputs as large as 5, and meta-training then never gets going.)"""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        rng, k = jax.random.split(rng)
        params.append({"w": jax.random.normal(k, (fan_in, fan_out)) * jnp.sqrt(1.0 / fan_in), "b": jnp.zeros(fan_out)})
    return params


def mlp_apply(params: list, x: jax.Array) -> jax.Array:
    """x [k, 1] -> [k]."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return (x @ params[-1]["w"] + params[-1]["b"])[:, 0]


def mse(params, x, y):
    return jnp.mean((mlp_apply(params, x) - y) ** 2)


def adapt(params, x, y, lr: float, steps: int):
    """`steps` plain gradient steps on (x, y): the inner loop. Differentiable (MAML differentiates it)."""
    for _ in range(steps):
        grads = jax.grad(mse)(params, x, y)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return params


def train_maml(config: ml_collections.ConfigDict, rng: jax.Array, first_order_pretrain: bool = False):
    """Meta-trains the MAML init (or, with `first_order_pretrain`, a joint regression net: no inner step)."""
    c = config.maml
    tx = studies.make_tx(c.optim, c.meta_steps)
    params = mlp_init(jax.random.fold_in(rng, 0), (1, *c.hidden, 1))

    def task_loss(params, key):
        ka, ks, kq = jax.random.split(key, 3)
        amplitude, phase = sample_sine_tasks(ka, 1)
        xs, ys = sine_points(ks, amplitude[0], phase[0], c.k_shot)
        xq, yq = sine_points(kq, amplitude[0], phase[0], c.num_query)
        if first_order_pretrain:
            return mse(params, jnp.concatenate([xs, xq]), jnp.concatenate([ys, yq]))
        return mse(adapt(params, xs, ys, c.inner_lr, c.inner_steps), xq, yq)

    def meta_loss(params, key):
        return jax.vmap(task_loss, (None, 0))(params, jax.random.split(key, c.meta_batch)).mean()

    def step(carry, t):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(meta_loss)(params, jax.random.fold_in(rng, t + 1))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(c.meta_steps))
    return params, losses


def adaptation_errors(config: ml_collections.ConfigDict, inits: dict, rng: jax.Array) -> dict:
    """MSE on new tasks after 0, 1, 5, ... inner steps from each init, mean over eval tasks -> {name: [steps]}."""
    c = config.maml
    amplitudes, phases = sample_sine_tasks(rng, c.eval_tasks)
    keys = jax.random.split(jax.random.fold_in(rng, 1), c.eval_tasks)
    grid = jnp.linspace(-5, 5, c.eval_points)[:, None]

    def one_task(params, amplitude, phase, key):
        xs, ys = sine_points(key, amplitude, phase, c.k_shot)
        yq = amplitude * jnp.sin(grid[:, 0] - phase)
        return jnp.stack([mse(adapt(params, xs, ys, c.inner_lr, s), grid, yq) for s in c.eval_steps])

    return {name: np.asarray(jax.jit(jax.vmap(one_task, (None, 0, 0, 0)))(p, amplitudes, phases, keys).mean(0))
            for name, p in inits.items()}


# ---------------------------------------------------------------- prototypical networks on digits

def digits_by_class() -> np.ndarray:
    """All 1,797 digits grouped by class, truncated to the rarest class's count -> [10, n, 8, 8, 1]."""
    data = studies.load_digits()
    x = np.concatenate([data["x_train"], data["x_test"]])
    y = np.concatenate([data["y_train"], data["y_test"]])
    n = min(np.sum(y == c) for c in range(10))
    return np.stack([x[y == c][:n] for c in range(10)])


def sample_episode(rng: jax.Array, images: jax.Array, classes: jax.Array, way: int, shot: int, query: int):
    """support [way, shot, ...], query [way, query, ...] images from `way` random classes of `classes`."""
    kc, ki = jax.random.split(rng)
    chosen = jax.random.permutation(kc, classes)[:way]
    idx = jax.vmap(lambda k: jax.random.permutation(k, images.shape[1])[: shot + query])(jax.random.split(ki, way))
    picked = images[chosen[:, None], idx]  # [way, shot + query, 8, 8, 1]
    return picked[:, :shot], picked[:, shot:]


def proto_logits(embed, support: jax.Array, query: jax.Array) -> jax.Array:
    """Negative squared distances of each query to each class prototype -> [way * query, way]."""
    way, shot = support.shape[:2]
    prototypes = embed(support.reshape(way * shot, *support.shape[2:])).reshape(way, shot, -1).mean(1)
    q = embed(query.reshape(-1, *query.shape[2:]))
    return -jnp.sum((q[:, None, :] - prototypes[None]) ** 2, -1)


def train_protonet(config: ml_collections.ConfigDict, images: jax.Array, rng: jax.Array):
    p = config.proto
    model = CNN(channels=tuple(p.channels), dense=(), num_classes=p.embedding_dim)
    tx = studies.make_tx(p.optim, p.episodes)
    params = model.init(jax.random.fold_in(rng, 0), images[0, :2], train=False)["params"]
    train_classes = jnp.asarray(p.train_classes)
    labels = jnp.repeat(jnp.arange(p.train_way), p.num_query)

    def loss_fn(params, key):
        support, query = sample_episode(key, images, train_classes, p.train_way, p.train_shot, p.num_query)
        logits = proto_logits(lambda x: model.apply({"params": params}, x), support, query)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(carry, t):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(rng, t + 1))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(p.episodes))
    return (lambda x: model.apply({"params": params}, x)), losses


def episode_accuracy(embed, images, classes, way, shot, query, rng, episodes) -> float:
    labels = jnp.repeat(jnp.arange(way), query)

    def one(key):
        support, q = sample_episode(key, images, classes, way, shot, query)
        return jnp.mean(jnp.argmax(proto_logits(embed, support, q), -1) == labels)

    return float(jax.jit(jax.vmap(one))(jax.random.split(rng, episodes)).mean())


# ---------------------------------------------------------------- the study

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """MAML vs pretrained vs scratch on new sine tasks; protonet vs raw pixels on unseen digit classes."""
    p = config.proto
    if set(p.train_classes) & set(p.test_classes):
        raise ValueError(f"proto.train_classes {p.train_classes} and test_classes {p.test_classes} overlap; "
                         "held-out classes must be unseen")
    if max(w for w, _ in p.eval_settings) > len(p.test_classes) or p.train_way > len(p.train_classes):
        raise ValueError(f"N-way must not exceed the number of classes available (train {len(p.train_classes)}, "
                         f"test {len(p.test_classes)}); got train_way={p.train_way}, eval {p.eval_settings}")
    rng = jax.random.key(config.seed)
    maml_params, maml_losses = jax.jit(lambda r: train_maml(config, r))(jax.random.fold_in(rng, 1))
    pre_params, _ = jax.jit(lambda r: train_maml(config, r, first_order_pretrain=True))(jax.random.fold_in(rng, 2))
    scratch = mlp_init(jax.random.fold_in(rng, 3), (1, *config.maml.hidden, 1))
    inits = {"maml": maml_params, "pretrained": pre_params, "scratch": scratch}
    errors = adaptation_errors(config, inits, jax.random.fold_in(rng, 4))
    maml_rows = [{"init": name, **{f"MSE after {s} steps": float(e[i]) for i, s in enumerate(config.maml.eval_steps)}}
                 for name, e in errors.items()]

    images = jnp.asarray(digits_by_class())
    embed, proto_losses = train_protonet(config, images, jax.random.fold_in(rng, 5))
    pixels = lambda x: x.reshape(x.shape[0], -1)
    test_classes = jnp.asarray(p.test_classes)
    proto_rows = []
    for way, shot in studies.progress(p.eval_settings, "few_shot"):
        key = jax.random.fold_in(rng, 1000 + 10 * way + shot)
        proto_rows.append({
            "setting": f"{way}-way {shot}-shot", "protonet (unseen classes)":
                episode_accuracy(embed, images, test_classes, way, shot, p.num_query, key, p.eval_episodes),
            "raw-pixel prototypes": episode_accuracy(pixels, images, test_classes, way, shot, p.num_query, key,
                                                     p.eval_episodes),
            "chance": 1.0 / way})
    one_step = config.maml.eval_steps.index(1) if 1 in config.maml.eval_steps else -1
    summary = {"maml_mse_1_step": float(errors["maml"][one_step]), "scratch_mse_1_step": float(errors["scratch"][one_step]),
               "pretrained_mse_1_step": float(errors["pretrained"][one_step]),
               **{f"protonet_{r['setting'].replace(' ', '_')}": r["protonet (unseen classes)"] for r in proto_rows},
               "maml_rows": maml_rows, "proto_rows": proto_rows}
    studies.write_results(workdir, summary, {
        f"MAML sine regression: MSE on {config.maml.eval_tasks} new tasks ({config.maml.k_shot} shots, "
        f"inner lr {config.maml.inner_lr:g})": maml_rows,
        f"prototypical networks: accuracy on digits {tuple(p.test_classes)} (trained on {tuple(p.train_classes)}), "
        f"{p.eval_episodes} episodes": proto_rows,
    }, config)
    plot(config, inits, np.asarray(maml_losses), np.asarray(proto_losses), workdir, jax.random.fold_in(rng, 6))
    return summary


def plot(config, inits: dict, maml_losses, proto_losses, workdir: str, rng) -> None:
    c = config.maml
    fig, axes = studies.new_figure(1, 3, (4.0, 3.2))
    amplitude, phase = 3.0, 1.0
    xs, ys = sine_points(rng, amplitude, phase, c.k_shot)
    grid = jnp.linspace(-5, 5, 200)[:, None]
    for ax, name in zip(axes[0, :2], ("maml", "scratch")):
        ax.plot(grid[:, 0], amplitude * jnp.sin(grid[:, 0] - phase), "k-", lw=2, label="task")
        ax.plot(xs[:, 0], ys, "k^", label=f"{c.k_shot} shots")
        for s in (0, 1, 10):
            ax.plot(grid[:, 0], mlp_apply(adapt(inits[name], xs, ys, c.inner_lr, s), grid), lw=1, label=f"{s} steps")
        ax.set_title(f"{name} init, adapted", fontsize=9)
        ax.legend(fontsize=6)
    ax = axes[0, 2]
    ax.semilogy(np.convolve(maml_losses, np.ones(50) / 50, "valid"), label="MAML meta-loss")
    ax.semilogy(np.convolve(proto_losses, np.ones(50) / 50, "valid"), label="protonet episode loss")
    ax.set_xlabel("meta-step / episode")
    ax.legend(fontsize=7)
    studies.save_figure(fig, workdir, "few_shot.png")
