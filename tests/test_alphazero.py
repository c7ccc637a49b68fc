"""AlphaZero: the perfect tic-tac-toe player (checked against an independent minimax), value targets,
and one tiny self-play + training iteration."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("pgx")
pytest.importorskip("mctx")

from depthlab.research.rl import alphazero_training, alphazero_tictactoe  # noqa: E402

LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


def _winner(board):
    for a, b, c in LINES:
        if board[a] != "." and board[a] == board[b] == board[c]:
            return board[a]
    return None


def _minimax(board, me, cache={}):
    """Plain minimax over boards of 'x'/'o'/'.' from the point of view of `me`, who is to move."""
    key = (board, me)
    if key not in cache:
        other = "o" if me == "x" else "x"
        if _winner(board) == other:
            cache[key] = -1
        elif "." not in board:
            cache[key] = 0
        else:
            cache[key] = max(-_minimax(board[:i] + me + board[i + 1:], other) for i in range(9) if board[i] == ".")
    return cache[key]


def _reachable():
    """Every position reachable in play with the game still open, and who is to move."""
    seen, frontier = set(), [("." * 9, "x")]
    while frontier:
        board, me = frontier.pop()
        if (board, me) in seen or _winner(board) or "." not in board:
            continue
        seen.add((board, me))
        other = "o" if me == "x" else "x"
        frontier += [(board[:i] + me + board[i + 1:], other) for i in range(9) if board[i] == "."]
    return seen


def test_perfect_table_matches_independent_minimax():
    table = alphazero_training.perfect_tictactoe_table()
    positions = _reachable()
    assert len(positions) == 4520  # non-terminal positions of tic-tac-toe
    for board, me in positions:
        other = "o" if me == "x" else "x"
        index = sum({".": 0, me: 1, other: 2}[c] * 3**i for i, c in enumerate(board))
        best = _minimax(board, me)
        expected = [board[i] == "." and -_minimax(board[:i] + me + board[i + 1:], other) == best for i in range(9)]
        np.testing.assert_array_equal(table[index], expected, err_msg=f"{board} {me} to move")
    # The pgx observation of the empty board maps to row 0; every opening move keeps the draw.
    obs = jnp.zeros((3, 3, 2), bool)
    assert int(alphazero_training.tictactoe_index(obs)) == 0 and table[0].all()


def test_outcome_targets_alternate_sign():
    # Two games over 4 moves: game 0 won by the 3rd mover at move 3 (index 2); game 1 drawn at index 3.
    rewards = jnp.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    terminated = jnp.array([[False, False], [False, False], [True, False], [True, True]])
    z = alphazero_training.outcome_targets(rewards, terminated)
    np.testing.assert_allclose(z[:3, 0], [1.0, -1.0, 1.0])   # the winner's moves +1, the loser's -1
    np.testing.assert_allclose(z[:, 1], 0.0)


def _tiny_config():
    config = alphazero_tictactoe.get_config()
    config.unlock()
    config.model.update({"channels": 8, "num_blocks": 1, "value_hidden": 8})
    config.az.update({"selfplay_games": 8, "num_simulations": 8, "updates_per_iteration": 2, "batch_size": 16,
                      "buffer_iterations": 2, "eval_games": 8, "eval_simulations": 8})
    return config


def test_selfplay_iteration_and_matches():
    config = _tiny_config()
    init, update = alphazero_training.make_alphazero(config)
    state = jax.jit(init)(jax.random.key(0))
    update = jax.jit(update)
    state, metrics = update(state)
    state, metrics = update(state)
    assert int(state.step) == 2
    # Every tic-tac-toe game ends within 9 moves; at least 5 moves are needed for a win.
    assert float(metrics["selfplay/finished_rate"]) == 1.0
    assert 5 <= float(metrics["selfplay/game_length"]) <= 9
    assert np.isfinite(float(metrics["loss"]))
    valid = np.asarray(state.buffer["valid"])
    assert valid.any(axis=1).all()            # both buffer slots hold positions
    policy = np.asarray(state.buffer["policy"])[valid]
    np.testing.assert_allclose(policy.sum(-1), 1.0, rtol=1e-5)
    value = np.asarray(state.buffer["value"])[valid]
    assert set(np.unique(value)) <= {-1.0, 0.0, 1.0}
    # Against a perfect player, an untrained agent can win no game.
    result = jax.jit(alphazero_training.make_match(config, "perfect", 8))(state.agent, jax.random.key(1))
    assert float(result["win"]) == 0.0
    np.testing.assert_allclose(float(result["win"] + result["draw"] + result["loss"]), 1.0)


def test_perfect_player_never_loses_to_random():
    # The evaluation machinery itself: the table player (as "agent" stand-in, via two table players)
    # is exercised by checking random-vs-perfect outcomes directly with pgx.
    import pgx

    env = pgx.make("tic_tac_toe")
    table = jnp.asarray(alphazero_training.perfect_tictactoe_table())
    n = 200

    def play(key):
        init_key, key = jax.random.split(key)
        state = jax.vmap(env.init)(jax.random.split(init_key, n))
        perfect_player = state.current_player.at[: n // 2].set(1 - state.current_player[: n // 2])

        def move(carry, key):
            state, score = carry
            k1, k2 = jax.random.split(key)
            best = table[alphazero_training.tictactoe_index(state.observation)] & state.legal_action_mask
            a_perfect = jax.random.categorical(k1, jnp.where(best, 0.0, -jnp.inf))
            a_random = jax.random.categorical(k2, jnp.where(state.legal_action_mask, 0.0, -jnp.inf))
            action = jnp.where(state.current_player == perfect_player, a_perfect, a_random)
            state = jax.vmap(env.step)(state, action)
            return (state, score + state.rewards[jnp.arange(n), perfect_player]), None

        (_, score), _ = jax.lax.scan(move, (state, jnp.zeros(n)), jax.random.split(key, 9))
        return score

    score = np.asarray(jax.jit(play)(jax.random.key(0)))
    assert (score >= 0).all()
    assert (score > 0).mean() > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_config_never_loses_to_perfect_play(seed, default_threefry):
    """The default recipe, trained as `depthlab run` does (JAX's default threefry, init from the seed),
    loses none of the exhaustively enumerated perfect-play lines, as first or as second player."""
    config = alphazero_tictactoe.get_config()
    init, update = alphazero_training.make_alphazero(config)
    state, update = jax.jit(init)(jax.random.key(seed)), jax.jit(update)
    for _ in range(config.train.steps):
        state, _ = update(state)
    lines = alphazero_training.perfect_play_lines(config, state.agent)
    assert (lines["lost_as_first"], lines["lost_as_second"]) == (0, 0), (seed, lines)
    result = jax.jit(alphazero_training.make_match(config, "random", 100))(state.agent, jax.random.key(1))
    assert float(result["win"]) >= 0.85 and float(result["loss"]) == 0.0, (seed, result)
