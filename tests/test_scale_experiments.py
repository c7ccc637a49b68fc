"""The scaling table's experiments (language/gpt_pretrain, vision/imagenet_resnet): smoke runs that learn, the
presets' shapes, and the scaling-table script's rows."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from depthlab.models.pretrained import gpt2_config
from depthlab.research.language import gpt_pretrain
from depthlab.research.runner import run_experiment
from depthlab.research.vision import imagenet_resnet


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_synthetic_windows_follow_the_recurrence_and_depend_on_seed_and_step():
    a = next(gpt_pretrain.synthetic_windows(97, 4, 12, seed=3, start_step=5))
    b = next(gpt_pretrain.synthetic_windows(97, 4, 12, seed=3, start_step=5))
    c = next(gpt_pretrain.synthetic_windows(97, 4, 12, seed=3, start_step=6))
    assert a["inputs"].shape == a["targets"].shape == (4, 12) and a["inputs"].dtype == np.int32
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])
    np.testing.assert_array_equal(a["targets"], (gpt_pretrain.A * a["inputs"] + gpt_pretrain.C) % 97)


@pytest.mark.parametrize("preset,layers,width", [("gpt2", 12, 768), ("gpt2-xl", 48, 1600), ("7b", 32, 4096)])
def test_large_presets_have_the_published_shapes(preset, layers, width):
    c = gpt_pretrain.get_config(preset)
    assert (c.model.num_layers, c.model.embed_dim) == (layers, width)
    assert c.model.dtype == "bfloat16" and c.model.scan_layers and c.mesh.strategy == "fsdp"
    if preset.startswith("gpt2"):
        assert c.data.context == gpt2_config(preset)["max_len"] == 1024
        assert c.data.vocab_size == 50257
    else:
        assert (c.data.context, c.data.vocab_size, c.model.mlp_dim) == (2048, 32000, 16384)


def test_gpt_pretrain_smoke_loss_falls(tmp_path):
    run_experiment("language/gpt_pretrain", preset="smoke", overrides={"train.steps": 40, "optim.learning_rate": 3e-3},
                   workdir=str(tmp_path))
    losses = [m["loss"] for m in _metrics(tmp_path) if "loss" in m]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.2, losses
    assert any("eval/perplexity" in m for m in _metrics(tmp_path))


def test_synthetic_images_are_uint8_and_class_coloured():
    batch = next(imagenet_resnet.synthetic_images(5, 16, 32, seed=0))
    assert batch["inputs"].shape == (32, 16, 16, 3) and batch["inputs"].dtype == np.uint8
    means = batch["inputs"].reshape(32, -1, 3).mean(1)
    same = batch["labels"][:, None] == batch["labels"][None, :]
    dist = np.abs(means[:, None] - means[None, :]).sum(-1)
    assert dist[same].mean() < dist[~same].mean()


def test_resnet50_preset_is_imagenet_shaped():
    c = imagenet_resnet.get_config("resnet50")
    assert (c.model.depth, c.model.num_classes, c.data.image_size, c.model.dtype) == (50, 1000, 224, "bfloat16")


@pytest.mark.slow   # 32 s loaded; ResNet-50's shapes and compile stay fast
def test_imagenet_resnet_smoke_runs_and_evaluates(tmp_path):
    run_experiment("vision/imagenet_resnet", preset="smoke", overrides={"train.steps": 12}, workdir=str(tmp_path))
    metrics = _metrics(tmp_path)
    assert np.isfinite([m["loss"] for m in metrics if "loss" in m]).all()
    assert 0.0 <= [m for m in metrics if "eval/accuracy" in m][-1]["eval/accuracy"] <= 1.0


def _scaling_table():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "scaling_table.py")
    spec = importlib.util.spec_from_file_location("scaling_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling_table"] = module      # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_scaling_table_rows_shard_big_models_and_scale_the_batch():
    table = _scaling_table()
    xl = next(m for m in table.MODELS if m.preset == "gpt2-xl")
    over = table.row_overrides(xl, 64)
    assert over["mesh.strategy"] == "fsdp" and over["data.batch_size"] == 8 * 64
    assert "mesh.strategy" not in table.row_overrides(xl, 1)
    cmd = table.row_command(xl, "v5p:4x4x4", 64, "python")
    assert cmd[:5] == ["python", "-m", "depthlab.research", "compile", "language/gpt_pretrain"]
    assert "--config.data.batch_size=512" in cmd and "--json" in cmd
    names = {(m.label, label) for m, label, _, _ in table.all_rows()}
    # every model on every slice, but a fixed-fsdp (hybrid) mesh only where the slice has more chips than its fsdp
    hybrid = next(m for m in table.MODELS if m.key == "gpt2-xl-hybrid")
    assert len(names) == (len(table.MODELS) - 1) * len(table.TOPOLOGIES) + 1
    assert {label for m, label, _, _ in table.all_rows() if m is hybrid} == {"v5e-256"}
    assert table.row_overrides(hybrid, 256)["mesh.fsdp"] == 64


def test_scaling_table_formats_a_failed_row_with_its_reason():
    table = _scaling_table()
    row = {"model": "m", "slice": "v5e-8", "topology": "v5e:2x4", "status": "timeout", "wall_seconds": 9.0,
           "reason": "not compiled within 5 s"}
    assert "timeout" in table.format_row(row) and "not compiled within 5 s" in table.format_row(row)
