"""Energy-efficiency study: masks and cost counts (fast); the smoke run and the findings (int8 ~ float, distillation) are slow."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthlab.research.theory import energy_efficiency as ee


def test_magnitude_masks_keep_the_largest_weights_and_every_bias():
    kernel = jax.random.normal(jax.random.key(0), (10, 10))
    params = {"QuantDense_0": {"kernel": kernel, "bias": jnp.zeros(10)}}
    masks = ee.magnitude_masks(params, 0.9)
    kept = np.asarray(kernel)[np.asarray(masks["QuantDense_0"]["kernel"]) == 1]
    assert len(kept) == 10 and np.abs(kept).min() == np.sort(np.abs(np.asarray(kernel)).ravel())[90]
    assert np.all(np.asarray(masks["QuantDense_0"]["bias"]) == 1)


def test_costs_count_macs_bits_and_xla_flops():
    model = ee.make_model((4, 8), (16,), 8, 8)
    params = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))["params"]
    macs = ee.layer_macs(params, (4, 8))
    assert macs == {"QuantConv_0": 8 * 8 * 9 * 4, "QuantConv_1": 4 * 4 * 9 * 4 * 8, "QuantDense_0": 32 * 16,
                    "QuantDense_1": 16 * 10}
    c8 = ee.cost(model, params, (4, 8), 8, 8, batch=4)
    c32 = ee.cost(ee.make_model((4, 8), (16,)), params, (4, 8), batch=4)
    assert c8["kMACs"] == c32["kMACs"] == pytest.approx(sum(macs.values()) / 1e3)
    assert c8["size (kbit)"] < 0.4 * c32["size (kbit)"] and c8["GBOPs"] == pytest.approx(c32["GBOPs"] / 16)
    # XLA counts a MAC as 2 FLOPs but skips the kernel taps that fall on SAME padding (~16% of them here)
    assert 1.5 * sum(macs.values()) < c32["XLA MFLOPs"] * 1e6 < 2.5 * sum(macs.values())
    masks = jax.tree.map(jnp.ones_like, params)
    masks["QuantConv_1"]["kernel"] = masks["QuantConv_1"]["kernel"].at[..., :4].set(0.0)  # half of conv 2
    sparse = ee.cost(ee.make_model((4, 8), (16,)), params, (4, 8), batch=4, masks=masks)
    assert sparse["kMACs"] == pytest.approx((sum(macs.values()) - macs["QuantConv_1"] / 2) / 1e3)


@pytest.mark.slow  # seven compiled trainers: ~40 s on 2 cores
def test_smoke_run_writes_the_accuracy_vs_cost_table(tmp_path):
    summary = ee.run(ee.get_config("smoke"), str(tmp_path))
    methods = [r["method"] for r in summary["rows"]]
    assert methods[0] == "float32" and any("int8" in m for m in methods) and "small CNN alone" in methods
    assert summary["float_acc"] > 0.6
    assert os.path.exists(tmp_path / "accuracy_vs_cost.png")


@pytest.fixture(scope="module")
def default_summary(tmp_path_factory):
    """The default setting (2 seeds, ~2.5 CPU-minutes), shared by the two findings below."""
    return ee.run(ee.get_config(), str(tmp_path_factory.mktemp("energy")))


@pytest.mark.slow
def test_int8_qat_is_within_one_point_of_float(default_summary):
    assert default_summary["int8_acc"] >= default_summary["float_acc"] - 0.01, default_summary


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="does not hold at CPU scale: default run measured small CNN alone 92.2% vs "
                                        "distilled 90.8% (2 seeds, 600 steps, T=4, alpha=0.9); see docs/theory.md")
def test_distillation_beats_the_small_net_alone(default_summary):
    assert default_summary["student_distilled_acc"] > default_summary["student_alone_acc"], default_summary
