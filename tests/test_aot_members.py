"""`depthlab compile --members N`: N seeds AOT-compiled for a TPU slice as the one program of `depthlab sweep
--together` (libtpu on this CPU, no TPU): the stacked state really has a member axis, and the figures per member
(memory, estimated member-steps/s, FLOPs) are consistent with the whole step's."""
import argparse
import json
import os

import pytest

# Compile-only libtpu may load next to another process holding libtpu's lockfile (a parallel test worker).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from depthlab.research import aot as research_aot  # noqa: E402
from depthlab.research import cli  # noqa: E402
from depthlab.train import aot  # noqa: E402

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason="libtpu is not installed (pip install 'depthlab[tpu]')")
MEMBERS = 4


def _args(**kw):
    base = dict(experiment="vision/digits_mlp", topology="v5e:2x2", preset="smoke", num_slices=1, json=False,
                members=MEMBERS)
    return argparse.Namespace(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- no libtpu

def test_member_configs_are_the_base_seed_plus_i():
    from depthlab.research.runner import build_config
    config = build_config("vision/digits_mlp", "smoke", {"seed": 7})
    configs = research_aot.member_configs(config, 3)
    assert [int(c.seed) for c in configs] == [7, 8, 9]
    assert int(config.seed) == 7                                   # the base config is left alone
    assert configs[0].model.to_dict() == config.model.to_dict()


def test_members_below_one_is_a_one_line_error(capsys):
    assert research_aot.command(_args(members=0), []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--members must be >= 1" in err


# ---------------------------------------------------------------------------------------------- libtpu

@pytest.fixture(scope="module")
def reports():
    """digits_mlp (smoke) on v5e:2x2: one run, and 4 members together."""
    if not aot.libtpu_available():
        pytest.skip("libtpu is not installed (pip install 'depthlab[tpu]')")
    return {"single": research_aot.compile_experiment("vision/digits_mlp", "v5e:2x2", preset="smoke"),
            "group": research_aot.compile_experiment("vision/digits_mlp", "v5e:2x2", preset="smoke",
                                                     members=MEMBERS)}


@needs_libtpu
def test_the_stacked_state_holds_every_member_on_every_chip(reports):
    single, group = reports["single"], reports["group"]
    assert single.members == {} and group.members["count"] == MEMBERS
    assert group.mesh == single.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert group.sharding_mismatches == []
    # 4 members' states, plus the group's step and failed_at[4] (int32): a member axis, not one shared state
    assert MEMBERS * single.state_bytes <= group.state_bytes <= MEMBERS * single.state_bytes + 64
    assert group.state_bytes_per_device == group.state_bytes              # members are replicated, never split
    assert group.num_params == MEMBERS * single.num_params
    assert group.members["params_per_member"] == single.num_params
    assert abs(group.members["state_bytes_per_member"] - single.state_bytes) <= 16
    # the arguments per chip hold the 4 members' states; the compiled step does about 4 runs' work
    assert group.train.memory["argument"] >= MEMBERS * single.state_bytes
    assert group.train.flops >= 3 * single.train.flops
    # the gradients of every member are all-reduced over the 4 data-parallel chips
    assert group.train.collectives["all-reduce"]["bytes"] >= MEMBERS * single.num_params * 4


@needs_libtpu
def test_member_figures_are_consistent_estimates(reports):
    group = reports["group"]
    m, est = group.members, group.estimate
    assert group.items_per_step == MEMBERS * 64 and m["items_per_member_step"] == 64   # smoke batch 64 a member
    assert m["member_steps_per_second"] == pytest.approx(MEMBERS / est["step_seconds"])
    assert m["items_per_second"] == pytest.approx(MEMBERS * 64 / est["step_seconds"])
    assert m["items_per_second_per_member"] == pytest.approx(64 / est["step_seconds"])
    assert m["memory_per_chip_per_member"] == pytest.approx(group.memory["total"] / MEMBERS)
    assert m["flops_per_step"] == pytest.approx(group.train.flops * group.num_devices)
    assert m["flops_per_member_step"] == pytest.approx(m["flops_per_step"] / MEMBERS) and m["flops_per_step"] > 0
    assert m["seeds"] == [0, MEMBERS - 1]
    data = json.loads(research_aot.to_json(group))
    assert data["members"]["member_steps_per_second"] == pytest.approx(m["member_steps_per_second"])
    text = research_aot.format_report(group)
    for label in ("members", "memory per member", "member-steps/s (estimate)", "examples/s (estimate)",
                  "FLOPs per step (XLA)", "step time (estimate)"):
        assert f"\n{label}" in text
    assert "85,002 per member x 4" in text
    assert "memory per member" not in research_aot.format_report(reports["single"])


@needs_libtpu
def test_cli_prints_the_member_figures(capsys):
    rc = cli.main(["compile", "vision/digits_mlp", "--topology", "v5e:1x1", "--preset", "smoke", "--members", "2",
                   "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    m = data["members"]
    assert m["count"] == 2 and data["num_devices"] == 1 and data["items_per_step"] == 2 * 64
    assert m["member_steps_per_second"] == pytest.approx(2 / data["estimate"]["step_seconds"])
    assert m["state_bytes_per_member"] == pytest.approx(data["state_bytes"] / 2)


@needs_libtpu
def test_members_that_cannot_go_together_exit_2_in_one_line(monkeypatch, capsys):
    from depthlab.research import together
    monkeypatch.setattr(together, "member_check",
                        lambda experiments, configs, prng_impl="threefry": ("their batches differ in shape", None))
    assert research_aot.command(_args(topology="v5e:1x1", members=2), []) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and len(err.splitlines()) == 1
    assert "2 members of vision/digits_mlp cannot train together: their batches differ in shape" in err


@needs_libtpu
def test_char_gpt_members_count_each_members_tokens_and_model_flops():
    import flax.linen as nn
    import jax

    from depthlab.research.registry import load_experiment
    from depthlab.research.runner import build_config

    group = research_aot.compile_experiment("language/char_gpt", "v5e:1x1", preset="smoke", members=2)
    config = build_config("language/char_gpt", "smoke", None)
    shape = research_aot.transformer_shape(config)
    member = nn.meta.unbox(jax.eval_shape(load_experiment("language/char_gpt").make_experiment(config).init,
                                          jax.random.key(0)))
    one = research_aot.transformer_flops(shape)(member)                 # one run's 6N+12LHQT per token
    assert group.item_name == "tokens" and group.items_per_step == 2 * shape["batch"] * shape["context"]
    assert group.members["items_per_member_step"] == shape["batch"] * shape["context"]
    assert group.model_flops_per_step == pytest.approx(2 * one) and group.model_flops_source.startswith("2 members")
