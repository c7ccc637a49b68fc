"""make_optimizer: every optimizer/schedule by name, penalties, masks, accumulation equivalence."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from depthlab.models import MLP
from depthlab.train import TrainState, decay_mask, default_optim_config, losses, make_optimizer, make_schedule
from depthlab.train.optim import OPTIMIZERS, SCHEDULES
from depthlab.train.step import make_train_step


def _config(**kw):
    c = default_optim_config()
    c.update(kw)
    return c


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_minimises_a_quadratic(name):
    lr = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.5, "adafactor": 0.1, "lion": 0.05}.get(name, 0.05)
    tx = make_optimizer(_config(name=name, learning_rate=lr))
    params = {"w": jnp.array([[3.0, -2.0], [1.0, 4.0]])}
    loss = lambda p: jnp.sum(p["w"] ** 2)
    start = loss(params)

    @jax.jit
    def run(params):
        def body(_, carry):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state
        return jax.lax.fori_loop(0, 100, body, (params, tx.init(params)))[0]

    assert loss(run(params)) < 0.2 * start, name


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match="optim.name='adamm': expected one of sgd, momentum"):
        make_optimizer(_config(name="adamm"))
    with pytest.raises(ValueError, match="optim.schedule='cosin': expected one of constant"):
        make_optimizer(_config(schedule="cosin"))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules(schedule):
    c = _config(learning_rate=1.0, schedule=schedule, warmup_steps=10, decay_steps=100,
                step_boundaries=(50,), step_factor=0.1)
    lr = make_schedule(c)
    assert float(lr(100)) <= float(lr(10)) + 1e-6
    if schedule in ("warmup_cosine", "warmup_linear", "constant"):
        assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < 1e-6
    if schedule == "step":
        assert float(lr(49)) == 1.0 and abs(float(lr(51)) - 0.1) < 1e-6


def test_decay_mask_skips_biases_and_norm_scales():
    model = nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.Dense(2)])
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    mask = decay_mask(params)
    assert mask["layers_0"]["kernel"] and not mask["layers_0"]["bias"]
    assert not mask["layers_1"]["scale"] and not mask["layers_1"]["bias"]


def test_weight_decay_is_decoupled_and_masked():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(_config(name="adamw", learning_rate=0.1, weight_decay=0.5))
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5, rtol=1e-6)   # -lr * wd * w
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)


def test_l1_and_l2_penalties_add_to_the_gradient():
    params = {"dense": {"kernel": jnp.array([[2.0, -3.0]]), "bias": jnp.array([1.0])}}
    zero = jax.tree.map(jnp.zeros_like, params)
    sgd = lambda **kw: make_optimizer(_config(name="sgd", learning_rate=1.0, **kw))
    tx = sgd(l1=0.1)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], [[-0.1, 0.1]])
    np.testing.assert_allclose(updates["dense"]["bias"], [0.0])
    tx = sgd(l2=0.1)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], [[-0.2, 0.3]], rtol=1e-6)


def test_clipping_bounds_the_update():
    params = {"w": jnp.zeros((3,))}
    tx = make_optimizer(_config(name="sgd", learning_rate=1.0, clip_norm=1.0))
    updates, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)


def _mlp_state(optim):
    model = MLP(features=(16, 4))
    x = jax.random.normal(jax.random.key(1), (32, 6, 1))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 4)
    params = model.init(jax.random.key(0), x)["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(optim), rng=jax.random.key(3))
    loss_fn = lambda logits, batch: (losses.softmax_cross_entropy(logits, batch["labels"]), {})
    return state, make_train_step(model, loss_fn), x, y


def test_gradient_accumulation_equals_one_big_batch_step():
    k = 4
    big_state, step, x, y = _mlp_state(_config(name="adam", learning_rate=1e-2))
    acc_state, _, _, _ = _mlp_state(_config(name="adam", learning_rate=1e-2, accumulate_steps=k))
    big_state, _ = jax.jit(step)(big_state, {"inputs": x, "labels": y})
    micro = jax.jit(step)
    for i in range(k):
        sl = slice(i * 8, (i + 1) * 8)
        before = acc_state.params
        acc_state, _ = micro(acc_state, {"inputs": x[sl], "labels": y[sl]})
        if i < k - 1:  # parameters only move on the k-th micro-batch
            chex.assert_trees_all_equal(before, acc_state.params)
    chex.assert_trees_all_close(acc_state.params, big_state.params, atol=1e-6, rtol=1e-5)


def test_ema_tracks_parameters():
    state, step, x, y = _mlp_state(_config(name="sgd", learning_rate=0.5))
    ema_state = TrainState.create(apply_fn=state.apply_fn, params=state.params, tx=state.tx,
                                  rng=state.rng, ema_decay=0.9)
    new, _ = jax.jit(step)(ema_state, {"inputs": x, "labels": y})
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema_state.params, new.params)
    chex.assert_trees_all_close(new.ema_params, expected, rtol=1e-6)
    assert new.eval_params() is new.ema_params


def _torch_rmsprop(params, grads, lr, alpha, eps, momentum=0.0, centered=False):
    """torch.optim.RMSprop's update rule, written out from its documentation (numpy, float64)."""
    p, v, g_avg, buf = np.array(params, np.float64), 0.0, 0.0, 0.0
    for g in grads:
        v = alpha * v + (1 - alpha) * g ** 2
        denom_sq = v
        if centered:
            g_avg = alpha * g_avg + (1 - alpha) * g
            denom_sq = v - g_avg ** 2
        step = g / (np.sqrt(denom_sq) + eps)       # eps outside the square root
        if momentum > 0:
            buf = momentum * buf + step
            step = buf
        p = p - lr * step
    return p


def _run_optax(tx, params, grads):
    p, state = jnp.asarray(params, jnp.float32), tx.init(jnp.asarray(params, jnp.float32))
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, updates)
    return np.asarray(p)


@pytest.mark.parametrize("momentum,centered", [(None, False), (0.9, False), (0.5, True)])
def test_rmsprop_pytorch_convention_matches_torch_rule(momentum, centered):
    rng = np.random.default_rng(0)
    params = rng.normal(size=(5,))
    grads = [1e-3 * rng.normal(size=(5,)) for _ in range(6)]   # small grads: v ~ eps, where the rules differ
    kw = dict(name="rmsprop", learning_rate=0.01, rmsprop_decay=0.99, eps=1e-6, momentum=momentum,
              rmsprop_centered=centered)
    want = _torch_rmsprop(params, grads, 0.01, 0.99, 1e-6, momentum or 0.0, centered)
    got = _run_optax(make_optimizer(_config(rmsprop_eps_in_sqrt=False, **kw)), params, grads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    default = _run_optax(make_optimizer(_config(**kw)), params, grads)   # Optax: eps inside the sqrt
    assert np.max(np.abs(default - want)) > 1e-3


def test_rmsprop_default_is_unchanged():
    """The default rmsprop is Optax's: eps inside the square root, no momentum (first step by hand)."""
    g = np.array([1e-3, -2.0])
    got = _run_optax(make_optimizer(_config(name="rmsprop", learning_rate=0.1)), np.zeros(2), [g])
    np.testing.assert_allclose(got, -0.1 * g / np.sqrt(0.1 * g ** 2 + 1e-8), rtol=1e-5)


def test_rmsprop_momentum_is_passed():
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(3,)) for _ in range(3)]
    plain = _run_optax(make_optimizer(_config(name="rmsprop")), np.zeros(3), grads)
    heavy = _run_optax(make_optimizer(_config(name="rmsprop", momentum=0.9)), np.zeros(3), grads)
    assert np.max(np.abs(plain - heavy)) > 1e-3


def test_momentum_default_is_point_nine_for_sgd_momentum():
    grads = [np.ones(1)] * 2
    got = _run_optax(make_optimizer(_config(name="momentum", learning_rate=1.0)), np.zeros(1), grads)
    np.testing.assert_allclose(got, [-(1 + 1.9)], rtol=1e-6)   # buf: 1, then 0.9 * 1 + 1


@pytest.mark.parametrize("name,key,value,users", [
    ("sgd", "momentum", 0.5, "momentum, nesterov, rmsprop"),
    ("adam", "momentum", 0.9, "momentum, nesterov, rmsprop"),
    ("sgd", "b1", 0.5, "adam, adamw, lamb, lion"),
    ("lion", "eps", 1e-5, "rmsprop, adagrad, adam, adamw, lamb"),
    ("adam", "rmsprop_decay", 0.99, "rmsprop"),
    ("adamw", "rmsprop_eps_in_sqrt", False, "rmsprop"),
    ("momentum", "rmsprop_centered", True, "rmsprop"),
])
def test_a_key_the_optimizer_ignores_is_an_error(name, key, value, users):
    with pytest.raises(ValueError, match=f"optim.{key}={value!r} has no effect on optimizer '{name}'; "
                                         f"it is read by {users}"):
        make_optimizer(_config(name=name, **{key: value}))
    make_optimizer(_config(name=name, **{key: default_optim_config()[key]}))   # the default is fine


def _tree():
    return {"stem": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
            "Block_0": {"Conv_0": {"kernel": jnp.full((3, 3), 2.0)}},
            "head": {"kernel": jnp.full((3, 2), -1.0), "bias": jnp.zeros(2)}}


def _steps(tx, params, n):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    state = tx.init(params)
    for _ in range(n):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_frozen_mask_globs_name_parameters_or_modules_and_bang_unfreezes():
    from depthlab.train.optim import frozen_mask
    params = _tree()
    assert frozen_mask(params, "Block_*") == {"stem": {"kernel": False, "bias": False},
                                              "Block_0": {"Conv_0": {"kernel": True}},
                                              "head": {"kernel": False, "bias": False}}
    assert frozen_mask(params, "*,!head") == {"stem": {"kernel": True, "bias": True},
                                              "Block_0": {"Conv_0": {"kernel": True}},
                                              "head": {"kernel": False, "bias": False}}
    assert frozen_mask(params, "*/bias") == {"stem": {"kernel": False, "bias": True}, "Block_0": {"Conv_0": {
        "kernel": False}}, "head": {"kernel": False, "bias": True}}
    with pytest.raises(ValueError, match="pattern 'backbone/\\*' matches no parameter; paths look like Block_0/"):
        frozen_mask(params, "backbone/*")
    with pytest.raises(ValueError, match="has an empty pattern"):
        make_optimizer(_config(freeze="stem,,head"))


@pytest.mark.parametrize("name", ["adamw", "momentum"])
def test_frozen_parameters_stay_bit_identical_and_the_rest_train_as_without_freezing(name):
    params = _tree()
    config = dict(name=name, learning_rate=0.1, weight_decay=0.1, clip_norm=10.0)
    frozen = _steps(make_optimizer(_config(freeze="*,!head", **config)), params, 5)
    plain = _steps(make_optimizer(_config(**config)), params, 5)
    for part in ("stem", "Block_0"):
        chex.assert_trees_all_equal(frozen[part], params[part])         # bit-identical: no update, no decay
    assert not np.allclose(frozen["head"]["kernel"], params["head"]["kernel"])
    # The head alone is clipped by its own norm, which is below 10 here: the same updates as unfrozen training.
    chex.assert_trees_all_close(frozen["head"], plain["head"], rtol=1e-6)


def test_freeze_steps_freezes_for_the_first_k_updates_then_trains():
    params = _tree()
    tx = make_optimizer(_config(name="sgd", learning_rate=0.1, freeze="Block_0", freeze_steps=3))
    chex.assert_trees_all_equal(_steps(tx, params, 3)["Block_0"], params["Block_0"])
    after = _steps(tx, params, 5)["Block_0"]["Conv_0"]["kernel"]
    np.testing.assert_allclose(after, 2.0 - 2 * 0.1 * 0.5)                 # the 2 updates after the 3 frozen ones
    with pytest.raises(ValueError, match="optim.freeze_steps=3 has no effect without optim.freeze"):
        make_optimizer(_config(freeze_steps=3))
    with pytest.raises(ValueError, match="optim.freeze_steps=-1: expected an integer >= 0"):
        make_optimizer(_config(freeze="head", freeze_steps=-1))


def test_freezing_is_off_by_default():
    assert default_optim_config().freeze == "" and default_optim_config().freeze_steps == 0
    params = _tree()
    chex.assert_trees_all_equal(_steps(make_optimizer(_config(name="sgd")), params, 2),
                                _steps(optax.sgd(1e-3), params, 2))


@pytest.mark.parametrize("name,extra,inject", [
    ("adamw", {"schedule": "warmup_cosine", "warmup_steps": 2, "decay_steps": 8, "weight_decay": 0.1,
               "clip_norm": 1.0}, "learning_rate,weight_decay,clip_norm,b1,b2,eps"),
    ("momentum", {"schedule": "linear", "decay_steps": 6, "end_learning_rate": 1e-4, "momentum": 0.8, "l1": 1e-3,
                  "l2": 1e-2, "accumulate_steps": 2}, "learning_rate,end_learning_rate,momentum,l1,l2"),
    ("rmsprop", {"momentum": 0.5, "freeze": "b"}, "learning_rate,rmsprop_decay,eps,momentum"),
])
def test_injected_scalars_train_as_the_plain_chain_and_strip_to_its_state(name, extra, inject):
    # optim.inject holds the scalars in the optimizer state (optax.inject_hyperparams): the same updates, and the
    # state without the injection is the plain chain's, leaf for leaf (a together member's checkpoint layout)
    from depthlab.train.optim import without_injected

    plain = default_optim_config()
    plain.update({"name": name, **extra})
    injected = ml_collections.ConfigDict(plain.to_dict())
    injected.inject = inject
    a, b = make_optimizer(plain), make_optimizer(injected)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
    sa, sb = a.init(params), b.init(params)
    assert sorted(sb.hyperparams) == sorted(inject.split(","))
    pa = pb = params
    for step in range(6):
        grads = jax.tree.map(lambda p: jnp.cos(p * (step + 1)), pa)
        ua, sa = a.update(grads, sa, pa)
        ub, sb = b.update(grads, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    chex.assert_trees_all_close(pb, pa, rtol=1e-6, atol=1e-7)
    stripped = without_injected(sb)
    assert jax.tree.structure(stripped) == jax.tree.structure(sa)
    chex.assert_trees_all_close(stripped, sa, rtol=1e-6, atol=1e-7)


def test_inject_names_only_scalars_the_chain_computes_with():
    config = default_optim_config()
    config.inject = "warmup_steps"
    with pytest.raises(ValueError, match="'warmup_steps' cannot be held in the optimizer state; injectable"):
        make_optimizer(config)
    config.inject = "learning_rate,weight_decay"     # weight_decay 0 leaves decay out of the chain
    with pytest.raises(ValueError, match="optim.weight_decay=0.0 leaves that part out of the chain"):
        make_optimizer(config)
