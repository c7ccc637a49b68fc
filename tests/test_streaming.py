"""Streaming input (train/streaming/) and the converters (research/datasets/convert.py): batch i is a pure
function of (seed, i) with or without Grain workers, 2 processes' rows make the 1-process batch, `fit`
resumes bit for bit, and bad files fail with one line naming the file."""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from depthlab.research.datasets import convert
from depthlab.train import (Experiment, TrainState, default_optim_config, default_train_config, fit, losses,
                            make_eval_step, make_optimizer, make_train_step, streaming)
from depthlab.train.metric_writers import read_metrics


def _arrays(n=96, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 4, n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny ArrayRecord dataset (3 train shards of PNG-encoded 8x8 digits-like images, 1 test shard)."""
    root = tmp_path_factory.mktemp("ds")
    x, y = _arrays()
    np.savez(root / "d.npz", x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    convert.convert_npz(str(root / "d.npz"), str(root / "ar"), shards=3, progress=False)
    return {"root": root, "x": x, "y": y, "train": str(root / "ar" / "train-*.array_record"),
            "test": str(root / "ar" / "test-*.array_record")}


def _take(iterator, n):
    out = [next(iterator) for _ in range(n)]
    iterator.close()
    return out


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_record_codec_round_trip():
    features = {"image": b"\x89PNG...", "label": 3, "name": "cat", "box": np.arange(6, dtype=np.float32).reshape(2, 3)}
    back = streaming.decode_record(streaming.encode_record(features))
    assert back["image"] == features["image"] and back["label"] == 3 and back["name"] == "cat"
    np.testing.assert_array_equal(back["box"], features["box"])
    assert back["box"].dtype == np.float32


def test_every_record_source_implements_the_source_protocol(dataset):
    for cls in (streaming.ArrayRecordSource, streaming.ParquetSource, streaming.HFSource, streaming.TFDSSource):
        assert issubclass(cls, streaming.Source), cls
    source = streaming.open_source(dataset["train"])
    assert isinstance(source, streaming.Source) and len(source) == 96
    assert source.where(40).startswith("record ") and set(source.read([3, 40])[1]) == {"image", "label"}

    class NoWhere:                          # what the pipelines need, less `where`: not a Source
        def __len__(self):
            return 1

        def read(self, keys):
            return [{}]
    assert not isinstance(NoWhere(), streaming.Source)
    assert not issubclass(streaming.TokenFile, streaming.Source)     # read as token windows, not records


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch(dataset):
    source = streaming.ArrayRecordSource(dataset["train"])
    assert len(source) == 96 and len(source.paths) == 3
    decode = streaming.ImageExample()
    full = _take(streaming.stream_batches(source, 16, seed=0, decode=decode), 12)
    assert full[0]["inputs"].shape == (16, 8, 8, 1) and full[0]["inputs"].dtype == np.float32
    _equal(_take(streaming.stream_batches(source, 16, seed=0, start_step=7, decode=decode), 5), full[7:])
    # One epoch is 6 batches: every record exactly once (images decoded back to the uint8 originals).
    images = np.concatenate([b["inputs"] for b in full[:6]])[..., 0]
    codes = sorted(map(bytes, np.round(images * 255).astype(np.uint8)))
    assert codes == sorted(map(bytes, dataset["x"]))
    assert not np.array_equal(full[0]["inputs"], full[6]["inputs"])            # epoch 2 is reshuffled
    other = _take(streaming.stream_batches(source, 16, seed=1, decode=decode), 1)
    assert not np.array_equal(other[0]["inputs"], full[0]["inputs"])


def _shift(example, rng):
    """A per-example augmentation: a random roll, drawn from the rng of the example's stream position."""
    dy, dx = rng.integers(-2, 3, size=2)
    return {**example, "inputs": np.roll(example["inputs"], (dy, dx), axis=(0, 1))}


def test_worker_processes_give_the_same_batches(dataset):
    source = streaming.ArrayRecordSource(dataset["train"])
    kwargs = dict(seed=3, decode=streaming.ImageExample(), transform=_shift)
    inline = _take(streaming.stream_batches(source, 16, start_step=4, **kwargs), 6)
    _equal(_take(streaming.stream_batches(source, 16, start_step=4, num_workers=2, **kwargs), 6), inline)


def test_two_processes_read_their_rows_of_the_one_process_batches(dataset):
    source = streaming.ArrayRecordSource(dataset["train"])
    kwargs = dict(seed=0, start_step=2, decode=streaming.ImageExample(), transform=_shift)
    one = _take(streaming.stream_batches(source, 16, process_index=0, process_count=1, **kwargs), 8)
    parts = [_take(streaming.stream_batches(source, 16, process_index=p, process_count=2, **kwargs), 8)
             for p in range(2)]
    assert parts[0][0]["inputs"].shape == (8, 8, 8, 1)
    _equal([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)], one)
    # Grain's ShardOptions say the same as process_index/process_count.
    import grain
    shard = streaming.stream_batches(source, 16, shard_options=grain.sharding.ShardOptions(1, 2), **kwargs)
    _equal(_take(shard, 8), parts[1])
    # Evaluation: each process its rows of the padded, in-order pass.
    test = streaming.ArrayRecordSource(dataset["test"])
    whole = list(streaming.stream_eval_batches(test, 8, decode=streaming.ImageExample(), process_count=1,
                                               process_index=0))
    halves = [list(streaming.stream_eval_batches(test, 8, decode=streaming.ImageExample(), process_index=p,
                                                 process_count=2)) for p in range(2)]
    _equal([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)], whole)
    assert [float(b["mask"].sum()) for b in whole] == [8, 8, 4]
    np.testing.assert_array_equal(np.round(whole[0]["inputs"][..., 0] * 255), dataset["x"][:8])


def test_parquet_source_gives_the_batches_of_the_same_records(dataset, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [r for path in streaming.ArrayRecordSource(dataset["train"]).paths
               for r in streaming.ArrayRecordSource(path).read(range(len(streaming.ArrayRecordSource(path))))]
    table = pa.table({"image": [r["image"] for r in records], "label": [r["label"] for r in records]})
    pq.write_table(table.slice(0, 50), tmp_path / "a.parquet", row_group_size=16)
    pq.write_table(table.slice(50), tmp_path / "b.parquet", row_group_size=16)
    source = streaming.open_source(f"parquet:{tmp_path}/*.parquet")
    assert isinstance(source, streaming.ParquetSource) and isinstance(source, streaming.Source) and len(source) == 96
    kwargs = dict(seed=0, decode=streaming.ImageExample())
    _equal(_take(streaming.stream_batches(source, 16, **kwargs), 7),
           _take(streaming.stream_batches(streaming.ArrayRecordSource(dataset["train"]), 16, **kwargs), 7))


def test_token_file_windows_equal_in_memory_random_windows(tmp_path):
    from depthlab.research.datasets import text

    ids = np.random.default_rng(0).integers(0, 300, 5000)
    ids.astype(np.uint16).tofile(tmp_path / "train.bin")
    tokens = streaming.TokenFile(str(tmp_path / "train.bin"))
    assert len(tokens) == 5000
    memory = text.random_windows(ids.astype(np.int32), 8, 16, seed=2, start_step=5)
    _equal(_take(streaming.token_batches(tokens, 8, 16, seed=2, start_step=5), 4), [next(memory) for _ in range(4)])
    parts = [_take(streaming.token_batches(tokens, 8, 16, seed=2, process_index=p, process_count=2), 3)
             for p in range(2)]
    whole = _take(streaming.token_batches(tokens, 8, 16, seed=2), 3)
    _equal([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)], whole)
    with open(tmp_path / "meta.json", "w") as f:
        json.dump({"dtype": "uint32"}, f)
    ids.astype(np.uint32).tofile(tmp_path / "train.bin")
    np.testing.assert_array_equal(streaming.TokenFile(str(tmp_path / "train.bin")).tokens, ids)


# ----------------------------------------------------------------------------------------------
# fit: exact resumption with worker processes
# ----------------------------------------------------------------------------------------------
class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _loss(logits, batch):
    mask = batch.get("mask")
    return (losses.softmax_cross_entropy(logits, batch["labels"], mask=mask),
            {"accuracy": losses.accuracy(logits, batch["labels"], mask=mask)})


def _streaming_experiment(dataset, num_workers, steps):
    config = ml_collections.ConfigDict({"seed": 0, "train": default_train_config(), "optim": default_optim_config()})
    config.train.update(steps=steps, log_every=2, eval_every=4, checkpoint_every=4, progress=False,
                        tensorboard=False, async_checkpoint=False)
    config.optim.update(learning_rate=0.05)
    model, tx = _Linear(), make_optimizer(config.optim)
    train, test = streaming.ArrayRecordSource(dataset["train"]), streaming.ArrayRecordSource(dataset["test"])
    decode = streaming.ImageExample()

    def init(rng):
        return TrainState.create(apply_fn=model.apply, params=model.init(rng, np.zeros((1, 8, 8, 1)))["params"],
                                 tx=tx, rng=rng)

    experiment = Experiment(
        init=init, train_step=make_train_step(model, _loss), eval_step=make_eval_step(model, _loss),
        train_batches=lambda start: streaming.stream_batches(train, 16, 0, start, decode=decode, transform=_shift,
                                                             num_workers=num_workers),
        eval_batches=lambda: streaming.stream_eval_batches(test, 8, decode=decode))
    return experiment, config


def _strip_perf(records):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def test_fit_with_workers_resumes_bit_for_bit(dataset, tmp_path):
    # A run to step 4 with a Grain worker process, then the same config to step 8 (it resumes from the
    # checkpoint at 4 and reads batches from step 4 on), against an uninterrupted 8-step run (without workers:
    # the batches do not depend on them). The slow SIGKILL variant below runs 2 workers.
    first = fit(*_streaming_experiment(dataset, 1, 4), tmp_path / "resumed")
    assert int(first.state.step) == 4
    resumed = fit(*_streaming_experiment(dataset, 1, 8), tmp_path / "resumed")
    straight = fit(*_streaming_experiment(dataset, 0, 8), tmp_path / "straight")
    assert int(resumed.state.step) == int(straight.state.step) == 8
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(straight.state.params))
    a, b = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in a] == [2, 4, 6, 8] and _strip_perf(a) == _strip_perf(b)
    assert "eval/accuracy" in a[-1]


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_streaming import _streaming_experiment
from depthlab.train import fit
if __name__ == "__main__":
    fit(*_streaming_experiment({dataset!r}, 2, 400), {workdir!r})
"""


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _children(pid):
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == pid]


def _checkpoints(workdir):
    folder = workdir / "checkpoints"
    return [int(d) for d in os.listdir(folder) if d.isdigit()] if folder.is_dir() else []


@pytest.mark.slow
def test_sigkill_with_workers_resumes_bit_for_bit(dataset, tmp_path):
    # A run with 2 Grain workers killed (SIGKILL: no clean-up, the workers orphaned) after a checkpoint, then
    # run again: it resumes from the newest intact checkpoint and ends as an uninterrupted run does.
    ds = {"train": dataset["train"], "test": dataset["test"]}
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=os.path.dirname(__file__), dataset=ds, workdir=str(tmp_path / "k")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not any(step >= 40 for step in _checkpoints(tmp_path / "k")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert workers, "the run should have Grain worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_checkpoints(tmp_path / "k")) < 400        # killed mid-run
    deadline = time.time() + 30                            # its orphaned workers notice and exit
    while any(os.path.exists(f"/proc/{pid}") and _ppid(pid) == 1 for pid in workers):
        assert time.time() < deadline, f"Grain workers {workers} outlived the killed run"
        time.sleep(0.2)
    rerun = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "Resuming" in rerun.stdout, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    straight = fit(*_streaming_experiment(ds, 0, 400), tmp_path / "straight")
    assert _strip_perf(read_metrics(tmp_path / "k")) == _strip_perf(read_metrics(tmp_path / "straight"))
    finished = fit(*_streaming_experiment(ds, 0, 400), tmp_path / "k")     # "already finished": its final state
    chex.assert_trees_all_equal(jax.device_get(finished.state.params), jax.device_get(straight.state.params))


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_preempts_cleanly_with_workers(dataset, tmp_path):
    # Ctrl-C reaches the training process and its Grain workers alike: the run checkpoints and says it was
    # preempted; the workers leave the signal to it (no KeyboardInterrupt tracebacks) and are stopped with it.
    ds = {"train": dataset["train"], "test": dataset["test"]}
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=os.path.dirname(__file__), dataset=ds, workdir=str(tmp_path / "k")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 240
    while not _checkpoints(tmp_path / "k"):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0 and "SIGINT: preempted at step" in out, out[-3000:]
    assert "KeyboardInterrupt" not in out, out[-3000:]
    deadline = time.time() + 15
    while [p for p in workers if os.path.exists(f"/proc/{p}") and _ppid(p) == 1]:
        assert time.time() < deadline, f"processes {workers} outlived the preempted run"
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file (and the record) and the fix
# ----------------------------------------------------------------------------------------------
def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_files_and_empty_or_corrupt_shards(dataset, tmp_path):
    with pytest.raises(streaming.DataSourceError, match="no file matches") as e:
        streaming.ArrayRecordSource(str(tmp_path / "nothing-*.array_record"))
    assert "depthlab data convert" in _one_line(e)
    from array_record.python.array_record_module import ArrayRecordWriter
    empty = tmp_path / "empty.array_record"
    ArrayRecordWriter(str(empty), "group_size:1").close()
    with pytest.raises(streaming.DataSourceError, match="empty shard") as e:
        streaming.ArrayRecordSource(f"{dataset['train']},{empty}")
    assert str(empty) in _one_line(e)
    damaged = tmp_path / "damaged.array_record"
    blob = bytearray(open(streaming.ArrayRecordSource(dataset["train"]).paths[0], "rb").read())
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    damaged.write_bytes(bytes(blob))
    with pytest.raises(streaming.DataSourceError, match="not a readable ArrayRecord file") as e:
        streaming.ArrayRecordSource(str(damaged))
    assert str(damaged) in _one_line(e)
    with pytest.raises(streaming.DataSourceError, match="no such token file"):
        streaming.TokenFile(str(tmp_path / "train.bin"))
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(streaming.DataSourceError, match="whole number of uint16"):
        streaming.TokenFile(str(tmp_path / "odd.bin"))
    with pytest.raises(streaming.DataSourceError, match="not a readable Parquet file"):
        (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
        streaming.ParquetSource(str(tmp_path / "bad.parquet"))


def _write(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()


def _png(shape, value=0):
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.full(shape, value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_corrupt_record_missing_key_and_mixed_sizes_name_the_record(tmp_path):
    enc = streaming.encode_record
    decode = streaming.ImageExample()
    good = [enc({"image": _png((8, 8)), "label": 1}) for _ in range(10)]
    _write(tmp_path / "corrupt.array_record", good[:7] + [b"\xc1 not a record"] + good[:2])
    source = streaming.ArrayRecordSource(str(tmp_path / "corrupt.array_record"))
    with pytest.raises(streaming.DataSourceError, match="record 7 of .*corrupt.array_record is corrupt") as e:
        _take(streaming.stream_batches(source, 10, 0, decode=decode), 1)
    assert "depthlab data convert" in _one_line(e)
    _write(tmp_path / "badpng.array_record", good[:3] + [enc({"image": b"\x89PNG broken", "label": 0})])
    with pytest.raises(streaming.DataSourceError, match="record 3 of .*badpng.array_record: its image bytes"):
        _take(streaming.stream_batches(streaming.ArrayRecordSource(str(tmp_path / "badpng.array_record")), 4, 0,
                                       decode=decode), 1)
    _write(tmp_path / "nolabel.array_record", [enc({"image": _png((8, 8))})] * 4)
    with pytest.raises(streaming.DataSourceError, match="record 0 of .*nolabel.array_record has no feature 'label' "
                                                        r"\(it has image\)") as e:
        streaming.stream_batches(streaming.ArrayRecordSource(str(tmp_path / "nolabel.array_record")), 2, 0,
                                 decode=decode)   # fails when built, before any training
    assert "data.label_key" in _one_line(e)
    _write(tmp_path / "mixed.array_record", good[:5] + [enc({"image": _png((9, 8)), "label": 0})] + good[:5])
    with pytest.raises(streaming.DataSourceError, match=r"mixed shapes: record 5 of .*mixed.array_record has "
                                                        r"'inputs' of shape \(9, 8, 1\)") as e:
        _take(streaming.stream_batches(streaming.ArrayRecordSource(str(tmp_path / "mixed.array_record")), 11, 0,
                                       decode=decode), 1)
    assert "--size HxW" in _one_line(e)


def test_bad_records_are_skipped_only_when_asked_and_then_counted(tmp_path):
    enc = streaming.encode_record
    records = [enc({"image": _png((8, 8), 10 * i), "label": i % 4}) for i in range(12)]
    records[3], records[8] = b"\xc1 not a record", enc({"image": b"\x89PNG broken", "label": 0})
    _write(tmp_path / "c.array_record", records)
    source, decode = streaming.ArrayRecordSource(str(tmp_path / "c.array_record")), streaming.ImageExample()
    with pytest.raises(streaming.DataSourceError, match="is corrupt"):
        _take(streaming.stream_batches(source, 12, 0, decode=decode), 1)       # never silently
    batches = _take(streaming.stream_batches(source, 12, 0, decode=decode, skip_bad_records=True), 3)
    assert [int(b["skipped"].sum()) for b in batches] == [2, 2, 2]              # both bad ones, every epoch
    values = np.round(np.concatenate([b["inputs"][:, 0, 0, 0] for b in batches]) * 255).astype(int)
    assert not set(values.tolist()) & {30, 80}                                   # never the bad records
    again = _take(streaming.stream_batches(source, 12, 0, decode=decode, skip_bad_records=True), 3)
    _equal(batches, again)                                                       # still a function of (seed, step)
    evals = list(streaming.stream_eval_batches(source, 12, decode=decode, skip_bad_records=True))
    np.testing.assert_array_equal(evals[0]["mask"], [1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1])


@pytest.mark.slow   # 28 s loaded; skipping on the 12-record file stays fast
def test_mnist_resnet_counts_skipped_records_in_its_metrics(tmp_path):
    from depthlab.research import run_experiment
    enc = streaming.encode_record
    for split, n in (("train", 40), ("test", 8)):
        records = [enc({"image": _png((8, 8), i), "label": i % 4}) for i in range(n)]
        records[5] = b"\xc1 not a record"
        _write(tmp_path / f"{split}-00000-of-00001.array_record", records)
    overrides = {"data.source": f"arrayrecord:{tmp_path}/train-*.array_record", "data.num_workers": 0,
                 "data.batch_size": 8, "data.eval_batch_size": 8, "train.steps": 10, "train.log_every": 5,
                 "train.eval_every": 10, "train.checkpoint_every": 10, "train.progress": False}
    with pytest.raises(streaming.DataSourceError, match="record 5 of .*train-00000-of-00001.array_record is corrupt"):
        run_experiment("vision/mnist_resnet", preset="smoke", workdir=str(tmp_path / "stop"), overrides=overrides)
    result = run_experiment("vision/mnist_resnet", preset="smoke", workdir=str(tmp_path / "run"),
                            overrides={**overrides, "data.skip_bad_records": True})
    records = read_metrics(tmp_path / "run")
    skipped = [r["data/skipped_records"] for r in records if "data/skipped_records" in r]
    assert len(skipped) == 2 and sum(skipped) * 5 == 2.0     # 10 steps x 8 = two epochs of 40: once each
    assert result["metrics"]["step"] == 10


def test_worker_errors_reach_the_training_process(tmp_path):
    enc = streaming.encode_record
    good = [enc({"image": _png((8, 8)), "label": 1}) for _ in range(8)]
    _write(tmp_path / "c.array_record", good + [b"\xc1 junk"] + good)
    source = streaming.ArrayRecordSource(str(tmp_path / "c.array_record"))
    with pytest.raises(ValueError, match="record 8 of .*c.array_record is corrupt"):
        _take(streaming.stream_batches(source, 17, 0, decode=streaming.ImageExample(), num_workers=1), 1)


# ----------------------------------------------------------------------------------------------
# Converters and `depthlab data convert`
# ----------------------------------------------------------------------------------------------
def _image_folder(root, sizes=((8, 8),) * 2):
    from PIL import Image
    for c, name in enumerate(("cat", "dog")):
        os.makedirs(root / name)
        for i in range(6):
            shape = sizes[c] if i == 0 else sizes[0]
            Image.fromarray(np.full(shape + (3,), 40 * c + i, np.uint8)).save(root / name / f"{i}.png")


def test_convert_image_folder_and_stream_it(tmp_path, capsys):
    _image_folder(tmp_path / "photos")
    summary = convert.convert(str(tmp_path / "photos"), str(tmp_path / "out"), shards=2, test_fraction=0.25)
    assert summary["classes"] == ["cat", "dog"] and summary["records"] == 12 and summary["image_shape"] == [8, 8, 3]
    assert summary["splits"]["train"]["records"] == 9 and summary["splits"]["test"]["records"] == 3
    assert "12 records" in capsys.readouterr().out
    source = streaming.ArrayRecordSource(str(tmp_path / "out" / "train-*.array_record"))
    batch = _take(streaming.stream_batches(source, 9, 0, decode=streaming.ImageExample()), 1)[0]
    assert batch["inputs"].shape == (9, 8, 8, 3) and sorted(set(batch["labels"].tolist())) == [0, 1]
    # Mixed sizes: one line naming two images; --size resizes them.
    _image_folder(tmp_path / "mixed", sizes=((8, 8), (10, 12)))
    with pytest.raises(streaming.DataSourceError, match=r"mixed image sizes: .*dog/0.png is 10x12x3 .*--size"):
        convert.convert(str(tmp_path / "mixed"), str(tmp_path / "m"), progress=False)
    assert convert.convert(str(tmp_path / "mixed"), str(tmp_path / "m"), size=(8, 8), progress=False)["records"] == 12


def test_cli_data_convert_text_and_npz(tmp_path, capsys):
    from depthlab.research.cli import main
    (tmp_path / "t.txt").write_text("to be or not to be, that is the question\n" * 50)
    assert main(["data", "convert", str(tmp_path / "t.txt"), "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "tokens:" in out and "vocabulary" in out
    meta = json.load(open(tmp_path / "tok" / "meta.json"))
    assert meta["dtype"] == "uint16"
    tokens = streaming.TokenFile(str(tmp_path / "tok" / "train.bin"))
    tok = convert.load_tokenizer(str(tmp_path / "tok"))
    assert tok.decode(tokens.tokens[:12]) == "to be or not"
    x, y = _arrays(20)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    assert main(["data", "convert", str(tmp_path / "d.npz"), "--out", str(tmp_path / "ar"), "--shards", "2"]) == 0
    assert len(streaming.ArrayRecordSource(str(tmp_path / "ar" / "train-*.array_record"))) == 20
    assert main(["data", "convert", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")]) == 2
    assert "no such .npz file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Hugging Face `datasets` from local files, and prepared TFDS directories (no hub, no TensorFlow)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """`datasets` with its cache in tmp_path and the hub switched off: any download attempt would fail."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"), raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def test_hf_parquet_and_json_give_the_batches_of_the_same_records(dataset, tmp_path, offline_hf):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = streaming.ArrayRecordSource(dataset["train"])
    rows = records.read(range(len(records)))
    pq.write_table(pa.table({"image": [r["image"] for r in rows], "label": [r["label"] for r in rows]}),
                   tmp_path / "train.parquet")
    source = streaming.open_source(f"hf:parquet:{tmp_path}/train*.parquet")
    assert isinstance(source, streaming.HFSource) and isinstance(source, streaming.Source) and len(source) == 96
    kwargs = dict(seed=0, decode=streaming.ImageExample())
    _equal(_take(streaming.stream_batches(source, 16, **kwargs), 7), _take(streaming.stream_batches(records, 16, **kwargs), 7))
    # JSON lines: plain features, as decode=None gives them.
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"x": [i, i + 1], "label": i % 3}) + "\n")
    batch = _take(streaming.stream_batches(streaming.open_source(f"hf:json:{tmp_path}/train.jsonl"), 10, 0), 1)[0]
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(batch["x"][:, 1] - batch["x"][:, 0], np.ones(10))
    # Bad input: one line naming the spec and the fix; never a download.
    with pytest.raises(streaming.DataSourceError, match="no file matches") as e:
        streaming.open_source(f"hf:json:{tmp_path}/missing-*.jsonl")
    _one_line(e)
    with pytest.raises(streaming.DataSourceError, match="builder 'squad' is not one that reads local files"):
        streaming.open_source("hf:squad:train")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(streaming.DataSourceError, match=r"`datasets` cannot load hf:json:.*bad.jsonl") as e:
        streaming.open_source(f"hf:json:{tmp_path}/bad.jsonl")
    _one_line(e)


def test_mnist_resnet_reads_a_hugging_face_image_folder(tmp_path, offline_hf):
    from depthlab.research import runner
    from depthlab.research.vision import mnist_resnet
    _image_folder(tmp_path / "photos" / "train")
    _image_folder(tmp_path / "photos" / "test")
    config = runner.build_config("vision/mnist_resnet", "smoke", [f"data.source=hf:imagefolder:{tmp_path}/photos/train",
                                                                  "data.batch_size=6", "data.eval_batch_size=12",
                                                                  "data.num_workers=1"])
    experiment = mnist_resnet.make_experiment(config)       # held-out split: photos/test, found beside it
    batches = experiment.train_batches(0)                    # decoded in a Grain worker process
    batch = next(batches)
    batches.close()
    assert batch["inputs"].shape == (6, 8, 8, 3) and batch["inputs"].dtype == np.float32
    assert set(batch["labels"].tolist()) <= {0, 1}
    evals = list(experiment.eval_batches())
    assert [float(b["mask"].sum()) for b in evals] == [12.0]
    values = sorted(np.round(evals[0]["inputs"][:, 0, 0, 0] * 255).astype(int).tolist())
    assert values == sorted([40 * c + i for c in range(2) for i in range(6)])   # every image once, exactly
    with pytest.raises(streaming.DataSourceError, match="no such image folder"):
        mnist_resnet.make_experiment(runner.build_config("vision/mnist_resnet", "smoke", [
            f"data.source=hf:imagefolder:{tmp_path}/nowhere/train"]))


def _prepare_tfds(data_dir):
    """A tiny TFDS dataset prepared here, in ArrayRecord, without TensorFlow (uint8 tensors: TFDS's Image
    feature needs TensorFlow to *encode*; reading never does)."""
    import tensorflow_datasets as tfds

    class DepthlabToyDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["a", "b", "c", "d"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 52)}

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                yield i, {"image": np.full((8, 8, 1), i, np.uint8), "label": i % 4}

    DepthlabToyDigits(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "depthlab_toy_digits"


def test_tfds_prepared_directory_streams_without_tensorflow(tmp_path, monkeypatch):
    from depthlab.research import runner
    from depthlab.research.vision import mnist_resnet
    name = _prepare_tfds(tmp_path / "tfds")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    source = streaming.open_source(f"tfds:{name}")
    assert isinstance(source, streaming.TFDSSource) and isinstance(source, streaming.Source)
    assert len(source) == 40 and source.classes == ["a", "b", "c", "d"]
    seen = np.concatenate([b["inputs"][:, 0, 0, 0] for b in _take(streaming.stream_batches(
        source, 8, 0, decode=streaming.ImageExample()), 5)])
    np.testing.assert_array_equal(np.sort(np.round(seen * 255)), np.arange(40))     # one epoch: each example once
    config = runner.build_config("vision/mnist_resnet", "smoke", [f"data.source=tfds:{name}", "data.batch_size=8",
                                                                  "data.eval_batch_size=12"])
    experiment = mnist_resnet.make_experiment(config)
    assert [float(b["mask"].sum()) for b in experiment.eval_batches()] == [12.0]    # the test split
    with pytest.raises(streaming.DataSourceError, match=r"no prepared TFDS dataset 'cifar10' .*tfds build cifar10") as e:
        streaming.open_source("tfds:cifar10")
    _one_line(e)


# ----------------------------------------------------------------------------------------------
# Experiments: --config.data.source=arrayrecord:PATTERN / tokens:PATH
# ----------------------------------------------------------------------------------------------
def test_mnist_resnet_reads_arrayrecord_files_through_its_config(dataset):
    from depthlab.research import runner
    from depthlab.research.vision import mnist_resnet
    config = runner.build_config("vision/mnist_resnet", "smoke", [f"data.source=arrayrecord:{dataset['train']}",
                                                                  "data.batch_size=16", "data.eval_batch_size=20"])
    experiment = mnist_resnet.make_experiment(config)
    batches = experiment.train_batches(3)                 # the test split is found beside it (train -> test)
    batch = next(batches)
    batches.close()
    assert batch["inputs"].shape == (16, 8, 8, 1) and batch["labels"].dtype == np.int32
    assert [float(b["mask"].sum()) for b in experiment.eval_batches()] == [20.0]
    config = runner.build_config("vision/mnist_resnet", "smoke", [f"data.source=arrayrecord:{dataset['train']}",
                                                                  "model.num_classes=3"])
    with pytest.raises(ValueError, match="has 4 classes but model.num_classes is 3"):
        mnist_resnet.make_experiment(config)


@pytest.mark.slow
def test_mnist_resnet_trains_from_arrayrecord_files(dataset, tmp_path):
    from depthlab.research import run_experiment
    result = run_experiment("vision/mnist_resnet", preset="smoke", workdir=str(tmp_path / "run"), overrides={
        "data.source": f"arrayrecord:{dataset['train']}", "data.num_workers": 0, "data.batch_size": 16,
        "data.eval_batch_size": 20,
        "train.steps": 6, "train.log_every": 3, "train.eval_every": 6, "train.checkpoint_every": 6,
        "train.progress": False})
    assert result["metrics"]["step"] == 6 and 0.0 <= result["metrics"]["eval/accuracy"] <= 1.0
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["data"]["source"].startswith("arrayrecord:")
    with pytest.raises(ValueError, match="set --config.data.eval_source"):
        run_experiment("vision/mnist_resnet", preset="smoke", workdir=str(tmp_path / "x"), overrides={
            "data.source": f"arrayrecord:{dataset['root']}/ar/test-*.array_record"})


def test_char_gpt_trains_from_a_token_file(tmp_path):
    from depthlab.research import run_experiment
    (tmp_path / "t.txt").write_text("".join(f"line {i}: the quick brown fox\n" for i in range(300)))
    convert.convert(str(tmp_path / "t.txt"), str(tmp_path / "tok"), progress=False)
    result = run_experiment("language/char_gpt", preset="smoke", workdir=str(tmp_path / "run"), overrides={
        "data.source": f"tokens:{tmp_path / 'tok'}", "train.steps": 4, "train.log_every": 2,
        "train.eval_every": 4, "train.checkpoint_every": 4, "train.progress": False, "sample.length": 8})
    assert result["metrics"]["step"] == 4 and np.isfinite(result["metrics"]["eval/loss"])
    with pytest.raises(streaming.DataSourceError, match="no such token file"):
        run_experiment("language/char_gpt", preset="smoke", workdir=str(tmp_path / "y"),
                       overrides={"data.source": f"tokens:{tmp_path / 'missing.bin'}"})
    # A corpus without a newline cannot encode the default sample prompt ("\n"): one line before training, not
    # after it (issue 28's late failure), and nothing written.
    (tmp_path / "flat.txt").write_text("the quick brown fox " * 300)
    convert.convert(str(tmp_path / "flat.txt"), str(tmp_path / "flat"), progress=False)
    with pytest.raises(ValueError, match=r"sample.prompt='\\n' cannot be encoded.*--config.sample.prompt"):
        run_experiment("language/char_gpt", preset="smoke", workdir=str(tmp_path / "z"),
                       overrides={"data.source": f"tokens:{tmp_path / 'flat'}"})
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_benchmark_runs_at_its_smallest_setting(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import importlib
    rows = importlib.import_module("streaming").main(["--size", "tiny"])
    assert all(r["images/s"] > 0 for r in rows) and any("wait share" in r for r in rows)
