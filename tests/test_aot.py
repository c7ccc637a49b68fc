"""AOT compilation of real experiments for TPU topologies on this CPU (libtpu, no TPU): memory per chip,
FSDP's savings and collectives, the compiled shardings against `place`'s, the does-not-fit error."""
import argparse
import json
import os

import pytest

# Compile-only libtpu may load next to another process holding libtpu's lockfile (a parallel test worker).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from depthlab.research import aot as research_aot  # noqa: E402
from depthlab.train import aot  # noqa: E402

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason="libtpu is not installed (pip install 'depthlab[tpu]')")
FSDP = {"mesh.strategy": "fsdp", "mesh.fsdp": -1, "mesh.data": 1}
# digits_mlp with 1024-wide layers: 1.1M parameters, most of them in one 1024x1024 matrix.
WIDE_MLP = {"model.features": (1024, 1024, 10), "data.batch_size": 64}


# ---------------------------------------------------------------------------------------------- no libtpu

@pytest.mark.parametrize("name, expected", [
    ("v5e:2x2", ("v5e", "2x2")), ("v5e-8", ("v5e", "2x4")), ("v5litepod-256", ("v5e", "16x16")),
    ("v4-32", ("v4", "2x2x4")), ("v4:2x2x2", ("v4", "2x2x2")), ("v5p-128", ("v5p", "4x4x4")),
    ("v6e-1", ("v6e", "1x1")), ("v3-8", ("v3", "2x2")), ("V2:4x4", ("v2", "4x4")),
])
def test_parse_topology_names_and_aliases(name, expected):
    assert aot.parse_topology(name) == expected


@pytest.mark.parametrize("name", ["v9:2x2", "v5e:2x2x2", "v4:2x2", "v5e-7", "tpu", "h100:8"])
def test_unknown_topology_is_one_line_with_examples(name):
    with pytest.raises(aot.TopologyError) as e:
        aot.parse_topology(name)
    assert "\n" not in str(e.value) and "v5e:2x2" in str(e.value)


def test_missing_libtpu_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    with pytest.raises(aot.TopologyError, match=r"depthlab\[tpu\]"):
        aot.topology_devices("v5e:2x2")
    args = argparse.Namespace(experiment="vision/digits_mlp", topology="v5e:2x2", preset="smoke", num_slices=1,
                              json=False)
    assert research_aot.command(args, []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'depthlab[tpu]'" in err


HLO = """HloModule m, entry_computation_layout={()->()}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter (input: f32[1024,1024]) -> f32[256,1024] {
  %input = f32[1024,1024]{1,0} parameter(0)
  %all-reduce.2 = f32[1024,1024]{1,0:T(8,128)} all-reduce(%input), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[256,1024]{1,0} dynamic-slice(%all-reduce.2, %c, %c), dynamic_slice_sizes={256,1024}
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%cond2 (c: (s32[], f32[16])) -> pred[] {
  %limit = s32[] constant(5)
  %c = (s32[], f32[16]) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body2 (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]) parameter(0)
  %x = f32[16]{0} get-tuple-element(%p), index=1
  %ag = f32[16]{0} all-gather(%x), replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %t = (s32[], f32[16]) tuple(%i, %ag)
}

ENTRY %main (w: f32[256,1024]) -> f32[1024,1024] {
  %w = f32[256,1024]{1,0} parameter(0)
  %ags = (f32[256,1024]{1,0}, bf16[1024,1024]{1,0}) all-gather-start(%w), replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={0}
  %agd = bf16[1024,1024]{1,0} all-gather-done(%ags)
  %f = f32[256,1024]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter
  %loop = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %scan = (s32[], f32[16]) while(%init2), condition=%cond2, body=%body2
  ROOT %cp = f32[1024,1024]{1,0} collective-permute(%agd), source_target_pairs={{0,1},{1,0}}
}
"""


def test_parse_collectives_counts_async_fused_and_looped_ones():
    c = aot.parse_collectives(HLO, num_devices=4)
    # one async all-gather in ENTRY, and one in a scan loop whose trip count only its condition states (i < 5)
    assert c["all-gather"] == {"count": 1 + 5, "bytes": 1024 * 1024 * 2 + 5 * 16 * 4,
                               "moved": (1024 * 1024 * 2 + 5 * 16 * 4) * 3 / 4}
    # the all-reduce + dynamic-slice fusion is a reduce-scatter of the fusion's (shard) result
    assert c["reduce-scatter"]["count"] == 1 and c["reduce-scatter"]["bytes"] == 256 * 1024 * 4
    # the while body's all-reduce runs its known trip count (3) of times; the one in the fusion is not counted
    assert c["all-reduce"]["count"] == 3 and c["all-reduce"]["bytes"] == 3 * 8 * 4
    assert c["collective-permute"]["count"] == 1 and c["all-to-all"]["count"] == 0


# ---------------------------------------------------------------------------------------------- libtpu

@pytest.fixture(scope="module")
def mlp_reports():
    """digits_mlp (1024 wide) on v5e:2x2, data-parallel and FSDP."""
    if not aot.libtpu_available():
        pytest.skip("libtpu is not installed (pip install 'depthlab[tpu]')")
    return {strategy: research_aot.compile_experiment("vision/digits_mlp", "v5e:2x2", preset="smoke",
                                                      overrides={**WIDE_MLP, **extra})
            for strategy, extra in (("replicated", {}), ("fsdp", FSDP))}


@needs_libtpu
def test_fsdp_over_4_chips_holds_at_most_0_3_of_the_replicated_state(mlp_reports):
    dp, fsdp = mlp_reports["replicated"], mlp_reports["fsdp"]
    assert dp.chip.name == "v5e" and dp.num_devices == 4 and fsdp.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert fsdp.state_bytes == dp.state_bytes
    assert fsdp.state_bytes_per_device <= 0.3 * dp.state_bytes_per_device
    assert fsdp.train.memory["argument"] <= 0.3 * dp.train.memory["argument"]
    assert fsdp.train.memory["total"] < dp.train.memory["total"]
    assert dp.fits and fsdp.fits


@needs_libtpu
def test_fsdp_gathers_weights_and_scatters_gradients_instead_of_all_reducing_them(mlp_reports):
    dp, fsdp = mlp_reports["replicated"].train.collectives, mlp_reports["fsdp"].train.collectives
    params_bytes = mlp_reports["fsdp"].num_params * 4
    assert dp["all-reduce"]["bytes"] >= params_bytes            # data parallel: the gradients, all-reduced
    assert fsdp["all-gather"]["count"] > 0 and fsdp["reduce-scatter"]["count"] > 0
    # no all-reduce of (anything near) the full parameters under FSDP: only scalars and small leaves
    assert fsdp["all-reduce"]["bytes"] < 0.05 * params_bytes


@needs_libtpu
def test_compiled_state_shardings_equal_place_and_no_large_parameter_is_replicated(mlp_reports):
    for report in mlp_reports.values():
        assert report.sharding_mismatches == []
    assert mlp_reports["fsdp"].replicated_parameters == []
    assert any("1024, 1024" in p for p in mlp_reports["replicated"].replicated_parameters)


@needs_libtpu
def test_report_table_and_json_label_estimates(mlp_reports):
    report = mlp_reports["fsdp"]
    text = research_aot.format_report(report)
    assert "step time (estimate)" in text and "MFU (estimate)" in text and "reduce-scatter" in text
    assert "4 TPU v5 lite chip(s)" in text and "fits" in text
    data = json.loads(research_aot.to_json(report))
    est = data["estimate"]
    assert est["step_seconds"] == pytest.approx(max(est["compute_seconds"], est["memory_seconds"])
                                                + est["collective_seconds"])
    assert 0 < est["mfu"] < 1 and data["model_flops_source"] == "XLA's count"
    assert report.train.flops > 0 and report.train.bytes_accessed > 0
    assert report.eval is not None and report.eval.flops > 0


def test_roofline_floors_xla_flops_at_the_model_flops_and_labels_it():
    chip = aot.CHIPS["v5e"]
    step = aot.StepReport(lower_seconds=0, compile_seconds=0, memory={}, flops=1e9, bytes_accessed=1e6,
                          optimal_seconds=None, collectives={})
    plain = aot.roofline(step, chip, 4, 4e9, 100)
    assert plain["flops_per_device"] == 1e9 and not plain["flops_floored"]
    # a scanned loop counted once by XLA: the model FLOPs per device (here 8x XLA's) are the floor
    floored = aot.roofline(step, chip, 4, 32e9, 100, min_flops_per_device=8e9)
    assert floored["flops_floored"] and floored["compute_seconds"] == pytest.approx(8e9 / chip.peak_flops)
    assert floored["mfu"] == pytest.approx(32e9 / (4 * chip.peak_flops * floored["step_seconds"]))


@needs_libtpu
def test_char_gpt_compiles_for_v4_with_fsdp_and_counts_tokens():
    report = research_aot.compile_experiment("language/char_gpt", "v4:2x2x2", preset="smoke", overrides=FSDP)
    assert report.chip.name == "v4" and report.num_devices == 8 and report.num_hosts == 2
    assert report.mesh["fsdp"] == 8 and report.sharding_mismatches == [] and report.replicated_parameters == []
    assert report.item_name == "tokens" and report.items_per_step == 8 * 32
    assert report.model_flops_source.startswith("6N")
    # 6 N T per token at least (N without position embeddings)
    assert report.model_flops_per_step >= 6 * (report.num_params - 32 * 32) * report.items_per_step
    c = report.train.collectives
    assert c["all-gather"]["count"] > 0
    # The blocks' activations stay batch-sharded (train.parallel.with_activation_sharding): XLA gathers weights
    # instead of all-reducing activations (unbound: 7.2x the parameters' bytes all-reduced per step; bound: the
    # small replicated leaves' gradients only, about 1x).
    assert c["all-reduce"]["bytes"] < 2 * 4 * report.num_params


@needs_libtpu
def test_single_chip_and_multi_slice_topologies():
    one = research_aot.compile_experiment("vision/digits_mlp", "v5e:1x1", preset="smoke")
    assert one.num_devices == 1 and one.mesh["data"] == 1 and one.estimate["collective_seconds"] == 0
    assert sum(v["count"] for v in one.train.collectives.values()) == 0
    two = research_aot.compile_experiment("vision/digits_mlp", "v5e:2x2", preset="smoke", num_slices=2)
    assert two.num_devices == 8 and two.num_slices == 2 and two.mesh["data"] == 8
    assert two.train.collectives["all-reduce"]["count"] > 0


@needs_libtpu
def test_a_config_that_does_not_fit_exits_2_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(experiment="vision/digits_mlp", topology="v5e:2x2", preset="smoke", num_slices=1,
                              json=False)
    # a 49152-wide hidden layer: 2.4e9 parameters, 9.7 GB, 29 GB with Adam's moments, on 16 GiB chips
    assert research_aot.command(args, ["model.features=(49152, 49152, 10)"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and captured.out == ""
    assert "does not fit" in err and "16 GiB" in err and "mesh.strategy=fsdp" in err and "data.batch_size" in err
    assert list(tmp_path.iterdir()) == []
