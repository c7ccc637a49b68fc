"""AlphaZero (Silver et al. 2017) with Gumbel MuZero search (Danihelka et al. 2022) on pgx board games.

One iteration (= one `fit` step), all inside one jit:
  1. self-play: `selfplay_games` games in parallel, every move chosen by mctx's Gumbel MuZero
     search over the true game rules (pgx `step` is the recurrent function) guided by the network;
  2. targets: the search's improved policy (softmax of prior logits + completed Q-values) and the
     game outcome from the mover's point of view, propagated back with the zero-sum sign flip;
  3. the positions enter a replay buffer holding the last `buffer_iterations` iterations;
  4. `updates_per_iteration` Adam steps on minibatches sampled from the buffer:
        loss = cross_entropy(search_policy, logits) + value_weight * (outcome - value)^2

Evaluation plays the searching agent against a uniformly random player and, for tic-tac-toe, a
perfect minimax player (`perfect_tictactoe_table`), half the games as first mover.

Example:
    >>> init, update = make_alphazero(config)
    >>> state = init(jax.random.key(0)); state, metrics = jax.jit(update)(state)
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models.rl import PolicyValueNet
from depthlab.research.datasets import require
from depthlab.train.optim import make_optimizer
from depthlab.train.state import TrainState

GAMES = ("tic_tac_toe", "connect_four", "go_9x9")


def make_game(name: str):
    """The pgx environment `name` (tic_tac_toe, connect_four, go_9x9)."""
    pgx = require("pgx", "rl", f"the board game {name!r}")
    if name not in GAMES:
        raise ValueError(f"unknown game {name!r}; valid games: {', '.join(GAMES)}")
    return pgx.make(name)


@flax.struct.dataclass
class AZState:
    """Agent, replay buffer and PRNG key. `step` counts iterations."""

    step: jax.Array
    agent: TrainState            # params + batch_stats (model_state) + Adam state
    buffer: dict                 # {"obs": [K, N, *board], "policy": [K, N, A], "value": [K, N], "valid": [K, N]}
    rng: jax.Array


def make_network(config: ml_collections.ConfigDict, num_actions: int) -> PolicyValueNet:
    m = config.model
    return PolicyValueNet(num_actions=num_actions, channels=m.channels, num_blocks=m.num_blocks,
                          value_hidden=m.value_hidden)


def make_search(config: ml_collections.ConfigDict, env, network: PolicyValueNet, num_simulations: int,
                gumbel_scale: float) -> Callable:
    """search(variables, rng, states) -> mctx PolicyOutput for a batch of pgx states."""
    mctx = require("mctx", "rl", "AlphaZero search")

    def apply(variables, obs):
        logits, value = network.apply(variables, obs, train=False)
        return logits, value

    def recurrent_fn(variables, rng, action, state):
        mover = state.current_player
        keys = jax.random.split(rng, action.shape[0])
        state = jax.vmap(env.step)(state, action, keys)
        logits, value = apply(variables, state.observation)
        logits = jnp.where(state.legal_action_mask, logits, jnp.finfo(logits.dtype).min)
        reward = state.rewards[jnp.arange(action.shape[0]), mover]
        # The next node belongs to the opponent: its value counts negatively for the mover (discount -1);
        # a finished game has no future (value 0, discount 0).
        value = jnp.where(state.terminated, 0.0, value)
        discount = jnp.where(state.terminated, 0.0, -1.0)
        return mctx.RecurrentFnOutput(reward=reward, discount=discount, prior_logits=logits, value=value), state

    def search(variables, rng, state):
        logits, value = apply(variables, state.observation)
        root = mctx.RootFnOutput(prior_logits=logits, value=value, embedding=state)
        return mctx.gumbel_muzero_policy(
            params=variables, rng_key=rng, root=root, recurrent_fn=recurrent_fn, num_simulations=num_simulations,
            invalid_actions=~state.legal_action_mask, max_num_considered_actions=config.az.considered_actions,
            gumbel_scale=gumbel_scale)

    return search


def outcome_targets(rewards: jax.Array, terminated: jax.Array) -> jax.Array:
    """Value targets [time, batch]: the final outcome from each mover's point of view.

    rewards[t] is what the player who moved at t received at once; moves alternate, so the value of
    the position before move t is  z_t = r_t - z_{t+1}  (zero-sum), and z_t = r_t at the final move.
    """

    def backward(next_z, inputs):
        r, done = inputs
        z = r - jnp.where(done, 0.0, next_z)
        return z, z

    _, z = jax.lax.scan(backward, jnp.zeros_like(rewards[0]), (rewards, terminated), reverse=True)
    return z


def make_alphazero(config: ml_collections.ConfigDict) -> tuple[Callable, Callable]:
    """(init(rng) -> AZState, update(AZState) -> (AZState, metrics)); both pure and jittable."""
    az = config.az
    env = make_game(config.game)
    network = make_network(config, env.num_actions)
    search = make_search(config, env, network, az.num_simulations, gumbel_scale=1.0)
    tx = make_optimizer(config.optim)
    obs_shape = tuple(env.observation_shape)
    per_iteration = az.selfplay_games * az.max_moves

    def init(rng: jax.Array) -> AZState:
        rng, net_key, agent_key = jax.random.split(rng, 3)
        variables = network.init(net_key, jnp.zeros((1,) + obs_shape), train=False)
        agent = TrainState.create(apply_fn=network.apply, params=variables["params"], tx=tx, rng=agent_key,
                                  model_state={"batch_stats": variables["batch_stats"]})
        k = az.buffer_iterations
        buffer = {"obs": jnp.zeros((k, per_iteration) + obs_shape, jnp.bool_),
                  "policy": jnp.zeros((k, per_iteration, env.num_actions)),
                  "value": jnp.zeros((k, per_iteration)),
                  "valid": jnp.zeros((k, per_iteration), jnp.bool_)}
        return AZState(step=jnp.zeros((), jnp.int32), agent=agent, buffer=buffer, rng=rng)

    def selfplay(agent: TrainState, rng: jax.Array) -> tuple[dict, dict]:
        variables = {"params": agent.params, **agent.model_state}
        init_key, opening_key, rng = jax.random.split(rng, 3)
        state = jax.vmap(env.init)(jax.random.split(init_key, az.selfplay_games))
        # Exploration: each game opens with 0..random_opening_moves uniformly random moves, so that the
        # agent meets openings its own (soon deterministic) play never chooses. Those positions are not
        # stored, and every stored position's outcome then follows from searched moves only.
        openings = jax.random.randint(opening_key, (az.selfplay_games,), 0, az.random_opening_moves + 1)

        def move(state, inputs):
            t, key = inputs
            search_key, random_key, step_key = jax.random.split(key, 3)
            out = search(variables, search_key, state)
            random_action = jax.random.categorical(random_key, jnp.where(state.legal_action_mask, 0.0, -jnp.inf))
            searched = t >= openings
            action = jnp.where(searched, out.action, random_action)
            mover = state.current_player
            next_state = jax.vmap(env.step)(state, action, jax.random.split(step_key, az.selfplay_games))
            record = {"obs": state.observation, "policy": out.action_weights,
                      "reward": next_state.rewards[jnp.arange(az.selfplay_games), mover],
                      "terminated": next_state.terminated,
                      "playing": ~(state.terminated | state.truncated),
                      "valid": ~(state.terminated | state.truncated) & searched}
            return next_state, record

        moves = (jnp.arange(az.max_moves), jax.random.split(rng, az.max_moves))
        final, traj = jax.lax.scan(move, state, moves)
        value = outcome_targets(traj["reward"], traj["terminated"])
        data = {"obs": traj["obs"], "policy": traj["policy"], "value": value, "valid": traj["valid"]}
        data = jax.tree.map(lambda x: x.reshape((per_iteration,) + x.shape[2:]), data)
        lengths = traj["playing"].sum(0)
        stats = {"selfplay/game_length": lengths.mean(),
                 "selfplay/draw_rate": (final.terminated & (jnp.abs(final.rewards).sum(-1) == 0)).mean(),
                 "selfplay/finished_rate": final.terminated.mean()}
        return data, stats

    def loss_fn(params, model_state, batch):
        (logits, value), updates = network.apply({"params": params, **model_state}, batch["obs"], train=True,
                                                 mutable=["batch_stats"])
        policy_loss = optax.softmax_cross_entropy(logits, batch["policy"]).mean()
        value_loss = ((value - batch["value"]) ** 2).mean()
        loss = policy_loss + az.value_weight * value_loss
        return loss, (updates, {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss})

    def sgd_step(agent: TrainState, batch: dict):
        grads, (updates, metrics) = jax.grad(loss_fn, has_aux=True)(agent.params, agent.model_state, batch)
        return agent.apply_gradients(grads, model_state=dict(updates)), metrics

    def update(state: AZState) -> tuple[AZState, dict]:
        rng, play_key, sample_key = jax.random.split(state.rng, 3)
        data, stats = selfplay(state.agent, play_key)
        slot = state.step % az.buffer_iterations
        buffer = jax.tree.map(lambda b, d: b.at[slot].set(d), state.buffer, data)
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), buffer)
        weights = flat["valid"].astype(jnp.float32)
        idx = jax.random.choice(sample_key, weights.shape[0], (az.updates_per_iteration, az.batch_size),
                                p=weights / weights.sum())
        batches = jax.tree.map(lambda x: x[idx], {k: flat[k] for k in ("obs", "policy", "value")})
        agent, metrics = jax.lax.scan(sgd_step, state.agent, batches)
        metrics = {**jax.tree.map(jnp.mean, metrics), **stats,
                   "buffer_positions": weights.sum()}
        return AZState(step=state.step + 1, agent=agent, buffer=buffer, rng=rng), metrics

    return init, update


# ---------------------------------------------------------------------------------------------------
# Evaluation: the searching agent against a random player and (tic-tac-toe) a perfect player


def tictactoe_index(obs: jax.Array) -> jax.Array:
    """Table index of tic-tac-toe positions from pgx observations [..., 3, 3, 2] (mover's view):
    sum_i c_i 3^i with c = 0 empty, 1 the mover's mark, 2 the opponent's."""
    cells = obs[..., 0].reshape(obs.shape[:-3] + (9,)) * 1 + obs[..., 1].reshape(obs.shape[:-3] + (9,)) * 2
    return (cells.astype(jnp.int32) * (3 ** jnp.arange(9))).sum(-1)


_LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))


@functools.lru_cache(maxsize=1)
def perfect_tictactoe_table() -> np.ndarray:
    """[3**9, 9] bool: the moves that keep the minimax value of each position (mover's view), by a
    memoised negamax over every position reachable in play. Unreachable rows are all False."""
    table = np.zeros((3**9, 9), bool)
    values: dict[tuple, int] = {}

    def negamax(board: tuple) -> int:   # value for the player to move: 1 win, 0 draw, -1 loss
        if board in values:
            return values[board]
        if any(all(board[i] == 2 for i in line) for line in _LINES):
            result = -1                  # the opponent has just completed a line
        elif all(board):
            result = 0
        else:
            scores = {}
            for move in (i for i in range(9) if board[i] == 0):
                child = tuple({0: 0, 1: 2, 2: 1}[c] for c in board[:move] + (1,) + board[move + 1:])
                scores[move] = -negamax(child)
            result = max(scores.values())
            index = sum(c * 3**i for i, c in enumerate(board))
            for move, score in scores.items():
                table[index, move] = score == result
        values[board] = result
        return result

    negamax((0,) * 9)
    for first in range(9):   # positions where the other player opened (agent moving second)
        negamax(tuple(2 if i == first else 0 for i in range(9)))
    return table


def make_match(config: ml_collections.ConfigDict, opponent: str, num_games: int,
               num_simulations: int | None = None) -> Callable:
    """match(agent, rng) -> {"win", "draw", "loss"} rates of the searching agent (greedy search,
    gumbel_scale 0) against `opponent` ("random" or "perfect"), first mover in half the games."""
    env = make_game(config.game)
    network = make_network(config, env.num_actions)
    sims = num_simulations or config.az.eval_simulations
    search = make_search(config, env, network, sims, gumbel_scale=0.0)
    if opponent == "perfect":
        if config.game != "tic_tac_toe":
            raise ValueError(f"a perfect player exists only for tic_tac_toe, not {config.game!r}; use 'random'")
        table = jnp.asarray(perfect_tictactoe_table())
    elif opponent != "random":
        raise ValueError(f"unknown opponent {opponent!r}; valid: random, perfect")
    max_moves = config.az.max_moves

    def match(agent: TrainState, rng: jax.Array) -> dict:
        variables = {"params": agent.params, **agent.model_state}
        init_key, rng = jax.random.split(rng)
        state = jax.vmap(env.init)(jax.random.split(init_key, num_games))
        agent_player = jnp.where(jnp.arange(num_games) < num_games // 2, state.current_player,
                                 1 - state.current_player)

        def move(carry, key):
            state, score = carry
            search_key, opp_key, step_key = jax.random.split(key, 3)
            agent_action = search(variables, search_key, state).action
            if opponent == "perfect":
                allowed = table[tictactoe_index(state.observation)] & state.legal_action_mask
            else:
                allowed = state.legal_action_mask
            opp_logits = jnp.where(allowed, 0.0, -jnp.inf)
            opp_action = jax.random.categorical(opp_key, opp_logits)
            action = jnp.where(state.current_player == agent_player, agent_action, opp_action)
            state = jax.vmap(env.step)(state, action, jax.random.split(step_key, num_games))
            return (state, score + state.rewards[jnp.arange(num_games), agent_player]), None

        (_, score), _ = jax.lax.scan(move, (state, jnp.zeros(num_games)), jax.random.split(rng, max_moves))
        first = jnp.arange(num_games) < num_games // 2
        return {"win": (score > 0).mean(), "draw": (score == 0).mean(), "loss": (score < 0).mean(),
                "loss_as_first": ((score < 0) & first).sum(), "loss_as_second": ((score < 0) & ~first).sum()}

    return match


def play_sample_game(config: ml_collections.ConfigDict, agent: TrainState, rng: jax.Array) -> list[str]:
    """One self-play game with greedy search, as text boards (tic-tac-toe and connect four) or moves."""
    env = make_game(config.game)
    network = make_network(config, env.num_actions)
    search = jax.jit(make_search(config, env, network, config.az.eval_simulations, gumbel_scale=0.0))
    step = jax.jit(jax.vmap(env.step))
    variables = {"params": agent.params, **agent.model_state}
    init_key, rng = jax.random.split(rng)
    state = jax.vmap(env.init)(init_key[None])
    lines = []
    for _ in range(config.az.max_moves):
        if bool(state.terminated[0] | state.truncated[0]):
            break
        rng, key = jax.random.split(rng)
        action = search(variables, key, state).action
        player = int(state.current_player[0])
        state = step(state, action, key[None])
        lines.append(f"player {player} plays {int(action[0])}")
        board = _board_text(config.game, state)
        if board:
            lines.append(board)
    rewards = np.asarray(state.rewards[0])
    lines.append("draw" if rewards.sum() == 0 and not rewards.any() else f"player {int(rewards.argmax())} wins")
    return lines


def _board_text(game: str, state: Any) -> str:
    if game == "tic_tac_toe":
        board = np.asarray(state._x.board[0]).reshape(3, 3)
        return "\n".join(" ".join({-1: ".", 0: "X", 1: "O"}[int(c)] for c in row) for row in board)
    if game == "connect_four":
        board = np.asarray(state._x.board[0]).reshape(6, 7)
        return "\n".join(" ".join({-1: ".", 0: "X", 1: "O"}[int(c)] for c in row) for row in board)
    return ""


def perfect_play_lines(config: ml_collections.ConfigDict, agent: TrainState) -> dict:
    """Exhaustive check against perfect play (tic-tac-toe): the agent searches greedily (deterministic
    with gumbel_scale 0); at every perfect-player turn *each* minimax-optimal move is followed. Returns
    {"lines": games enumerated, "lost": of them lost, "lost_as_first", "lost_as_second"}; "lost" = 0
    means no perfect player, whatever its tie-breaking, beats the agent from either seat."""
    if config.game != "tic_tac_toe":
        raise ValueError(f"perfect play is only known for tic_tac_toe, not {config.game!r}")
    env = make_game(config.game)
    network = make_network(config, env.num_actions)
    search = jax.jit(make_search(config, env, network, config.az.eval_simulations, gumbel_scale=0.0))
    step = jax.jit(jax.vmap(env.step))
    table = perfect_tictactoe_table()
    variables = {"params": agent.params, **agent.model_state}
    key = jax.random.key(0)
    counts = {"lines": 0, "lost": 0, "lost_as_first": 0, "lost_as_second": 0}

    def explore(state, agent_player: int, seat: str) -> None:
        if bool(state.terminated[0]):
            counts["lines"] += 1
            if float(state.rewards[0, agent_player]) < 0:
                counts["lost"] += 1
                counts[f"lost_as_{seat}"] += 1
            return
        if int(state.current_player[0]) == agent_player:
            actions = [int(search(variables, key, state).action[0])]
        else:
            index = int(tictactoe_index(state.observation)[0])
            actions = np.flatnonzero(table[index] & np.asarray(state.legal_action_mask[0])).tolist()
        for action in actions:
            explore(step(state, jnp.array([action], jnp.int32)), agent_player, seat)

    state = jax.vmap(env.init)(key[None])
    first = int(state.current_player[0])
    explore(state, first, "first")
    explore(state, 1 - first, "second")
    return counts
